"""Synthetic images from a model's own BatchNorm statistics (no data, no generator model).

Every BatchNorm2d layer stores the running mean and variance of its input over the training set.
Images whose activations reproduce those statistics look, to the network, like training data.
The BN loss, as in ZeroQ (Cai et al., CVPR 2020) and Genie (Jeong et al., CVPR 2023), is

    L_BN = sum over BN layers l of  ||mu_l(x) - mu_l^BN||_2 + ||sigma_l(x) - sigma_l^BN||_2

with mu/sigma the per-channel mean / standard deviation of the layer's input over the batch
(biased variance; sigma = sqrt(var + eps) on both sides). Methods:

* ``zeroq`` -- optimize the pixels directly (Adam), ZeroQ's "distilled data".
* ``genie`` -- Genie's generator path: a small generator (latent -> image; linear, two upsampling
  conv stages, tanh, a final BN -- with a learned affine, unlike Genie's affine-free one, so model
  inputs need not be N(0, 1)) is trained *jointly* with its per-batch latent codes. The latent is
  multiplied by a learned embedding of the (soft) target, as in the GDFQ generator Genie builds on.
  As in Genie, generator and latents have separate learning rates (``lr`` for the generator, 5x
  for the latents; default 0.01). With one rate of 0.05 for both (and width 64) the generator's
  last convolution drove its tanh into saturation (CIFAR ResNet-20, 32 images, 200 iterations:
  95% of its inputs past |2.5|, mean |tanh| 0.99 -- near-binary images; now 19%, 0.68), so the
  images lost their variation: on ResNet-20 (one batch of 32, 200 iterations, single / mixup) a
  pairwise image distance of 44 / 36 (dgh 75) and a BN loss of 58 / 71 (dgh 14 / 35); on the tiny
  test net hit rate 0.5 and near-identical image pairs (0.83 and none now). Measured now on
  ResNet-20 (64 images, batch 32, 200 iterations): single labels hit rate 1.0, mixup 0.99 of the
  softmax mass on the two targets;
  pairwise distance 92 / 91 (dgh 75 / 75); set BN loss 6.4 / 19 (dgh 14 / 35); 1.4x dgh's time
  per iteration on one CPU thread. The output is clamped to ``clamp_range`` like the pixel methods.
  Its convolutions are "swing convolutions": during optimization the input is reflect-padded and
  randomly shifted by up to ``swing`` pixels before the convolution, which removes the fixed
  spatial artifacts a generator trained on a single batch otherwise bakes in.
* ``hast`` -- pixels plus a hard-sample focal-weighted cross-entropy (HAST, Li et al., CVPR 2023,
  "Hard Sample Matters a Lot in Zero-Shot Quantization"): the target term is weighted by
  (1 - p_target)^gamma, so the optimization keeps working on the images the model still finds hard
  instead of making every image trivially confident.
* ``dgh`` -- DGH (Dikstein et al., WACV 2025, "Data Generation for Hardware-Friendly Post-Training
  Quantization"): (1) the BN statistics are those of the *whole* generated set, not of one batch:
  per-layer first/second moments of every batch are cached and a batch's loss uses the set-level
  mean/variance in which only its own contribution carries gradient (the others are the cached
  values from their last step); (2) an output distribution-stretching loss on the logits: we use the
  inverse mean logit range, 1 / (mean_i(max_c z_ic - min_c z_ic) + eps) -- the "min-max difference"
  form of the ODS loss (as in Sony MCT's data generation) -- which widens the output distribution
  that no BN layer constrains. DGH's third ingredient, augmenting the images before the model the
  way training did, is available to every method as ``jitter`` (random flip + circular shift) but
  is off by default: on CIFAR ResNet-20 a 2-pixel jitter kept 100-iteration runs from reaching
  their targets (target probability mass 0.02, below chance), and 500-iteration runs were not
  measured.

The optimized objective uses L_BN divided by the number of BN layers (the layer mean, as ZeroQ's
reference implementation does), so the weights of the target and stretching terms do not depend on
the depth of the model: with the plain sum, a 19-BN-layer CIFAR ResNet-20 ignores its targets
(hit rate at chance after 100 iterations), with the mean it reaches them. Loss histories and
:func:`bn_statistics_loss` report L_BN itself (the sum).

Targets: ``single`` (one class per image, cross-entropy) or ``mixup`` (k classes per image with
Dirichlet or uniform weights, soft cross-entropy) -- the mixup-class idea applied to inversion.
Classes are dealt so every class is targeted equally often. The target term is used by every
method (weight ``ce_weight``; ZeroQ's original objective is the BN term alone: ``ce_weight=0``).
Its default depends on the label mode: 1 for single labels, 0.5 for mixup. A soft target keeps
pulling against the BN term where a one-hot target saturates: with weight 1, 128 mixup images
(dgh, ResNet-20, 200 iterations) ended at a set BN loss of 33.6 against 15.3 for single labels, at
0.5 at 18.7 with the same target mass (0.998). In the data-free benchmark
(bench/results/cifar10_datafree.md, W2A4 qdrop, 3 seeds) that moved mixup from 0.3 points below
single labels to about 2 points above (W3A3 +1.3, W4A4 +1.0). With ``genie`` mixup labels did not
pay off at any weight tried (W2A4, seed 0: mixup 76.2 / 77.1 / 78.4 at weight 1 / 0.5 / 0.25,
single labels 78.6 / 79.8 at 1 / 0.5; 3 seeds at 0.5: single 79.7, mixup 78.0): its one generator
per batch fits soft targets less well (0.85 top-1 agreement with the dominant target vs 0.99 for
dgh). Prefer ``dgh`` for mixup labels; genie with single labels at weight 0.5 is on par with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .prompts import balanced_class_groups, image_seed

METHODS = ("zeroq", "genie", "hast", "dgh")
LABEL_MODES = ("single", "mixup")
WEIGHT_MODES = ("dirichlet", "uniform")
DEFAULT_LR = {"zeroq": 0.25, "hast": 0.25, "dgh": 0.25, "genie": 0.01}
DEFAULT_CE_WEIGHT = {"single": 1.0, "mixup": 0.5}  # see the module notes


def resolve_ce_weight(label_mode: str, ce_weight: "float | None") -> float:
    """``ce_weight``, or the label mode's default where it is None."""
    return DEFAULT_CE_WEIGHT[label_mode] if ce_weight is None else ce_weight
# genie: ``lr`` is the generator's rate; the latent codes move GENIE_LATENT_LR_SCALE times faster
# (Genie keeps separate rates for the two). At a generator rate of 0.05-0.1 the generator's tanh
# saturated and the images lost their variation (ResNet-20, width 64, 0.05 vs 0.01: half the
# pairwise distance, ~6x the BN loss).
GENIE_LATENT_LR_SCALE = 5.0


# ----------------------------------------------------------------------------- BN statistics

def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm2d (and SyncBatchNorm) layers with running statistics, in module order."""
    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))
              and m.track_running_stats and m.running_mean is not None and m.running_var is not None]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm2d layer with running statistics: "
                         f"BN-statistics inversion and the BN-sensitivity filter need one")
    return layers


class BNCapture:
    """Forward pre-hooks that keep each BN layer's input of the last forward (with its graph)."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        self.inputs: list["torch.Tensor | None"] = [None] * len(self.layers)
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args):
            self.inputs[i] = args[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per layer: (sum of x, sum of x^2, count) per channel over batch and space."""
        out = []
        for x in self.inputs:
            xf = x.float()
            out.append((xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), x.shape[0] * x.shape[2] * x.shape[3]))
        return out

    def loss_from_moments(self, moments) -> torch.Tensor:
        """ZeroQ/Genie BN loss from per-layer (sum, sum of squares, count)."""
        total = 0.0
        for layer, (s1, s2, n) in zip(self.layers, moments):
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0)
            rm, rv = layer.running_mean.float(), layer.running_var.float()
            total = total + torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(
                torch.sqrt(var + layer.eps) - torch.sqrt(rv + layer.eps))
        return total

    def batch_loss(self) -> torch.Tensor:
        """BN loss of the last forward's batch: per-batch statistics (mean/var over batch and space)."""
        # From sums of x and x^2: on CPU, Tensor.var over dims (0, 2, 3) (forward + backward) took
        # ~4x as long and was 18% of a ResNet-20 genie iteration.
        return self.loss_from_moments(self.moments())


@torch.no_grad()
def bn_statistics_loss(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """BN loss of a whole image set (statistics accumulated over all of it), in eval mode.

    ``images`` are in the model's input space (normalized). Lower means the set's activation
    statistics are closer to the running statistics the model was trained with.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with BNCapture(model) as cap:
            acc = None
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size].to(device))
                mom = [(a.double(), b.double(), n) for a, b, n in cap.moments()]
                acc = mom if acc is None else [(a0 + a, b0 + b, n0 + n) for (a0, b0, n0), (a, b, n) in zip(acc, mom)]
            if acc is None:
                raise ValueError("images is empty")
            return float(cap.loss_from_moments(acc))
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- targets

def make_targets(num_images: int, num_classes: int, label_mode: str = "single", mixup_k: int = 2,
                 weights: str = "dirichlet", dirichlet_alpha: float = 1.0, seed: int = 0
                 ) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Balanced target classes per image and their mixing weights (sum 1)."""
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {list(LABEL_MODES)}, got {label_mode!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    if dirichlet_alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    k = 1
    if label_mode == "mixup":
        if not isinstance(mixup_k, int) or not 2 <= mixup_k <= num_classes:
            raise ValueError(f"mixup_k must be an int in [2, {num_classes}] (number of classes), got {mixup_k!r}")
        k = mixup_k
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x626E]))
    classes = balanced_class_groups(num_classes, num_images, k, rng)
    if k == 1:
        return classes, [(1.0,)] * num_images
    ws = []
    for _ in range(num_images):
        w = np.full(k, 1.0 / k) if weights == "uniform" else rng.dirichlet(np.full(k, float(dirichlet_alpha)))
        ws.append(tuple(float(x) for x in w / w.sum()))
    return classes, ws


def soft_labels(classes: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(classes), num_classes)
    for i, (cs, ws) in enumerate(zip(classes, weights)):
        for c, w in zip(cs, ws):
            if not 0 <= int(c) < num_classes:
                raise ValueError(f"target class {c} of image {i} is outside [0, {num_classes})")
            out[i, int(c)] += float(w)
    return out


def _target_loss(logits: torch.Tensor, target: torch.Tensor, focal_gamma: "float | None") -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    if focal_gamma is None:
        return -(target * logp).sum(dim=1).mean()
    weight = (1 - logp.exp()).pow(focal_gamma)  # HAST: hard (low-probability) targets weigh more
    return -(target * weight * logp).sum(dim=1).mean()


def _stretch_loss(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    z = logits.float().flatten(1)
    return 1.0 / ((z.max(dim=1).values - z.min(dim=1).values).mean() + eps)


# ----------------------------------------------------------------------------- Genie generator

class SwingConv2d(nn.Module):
    """3x3 convolution whose input is reflect-padded and randomly shifted while ``swing`` is on."""

    def __init__(self, cin: int, cout: int, width: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)
        self.width, self.swing, self.rng = width, True, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swing and self.width > 0:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.width,) * 4, mode="reflect")
            i, j = torch.randint(0, 2 * self.width + 1, (2,), generator=self.rng).tolist()
            x = x[..., i:i + h, j:j + w]
        return self.conv(x)


class GenieGenerator(nn.Module):
    """latent [n, latent_dim] (+ soft target [n, classes]) -> image [n, C, H, W], after Genie / GDFQ.

    With ``num_classes`` the latent is multiplied by a learned embedding of the target, as in the
    GDFQ generator Genie builds on; a soft (mixup) target embeds as the weighted mix of its classes.
    """

    def __init__(self, latent_dim: int, shape: Sequence[int], width: int = 16, swing: int = 1,
                 num_classes: "int | None" = None):
        # width 16 (Genie/GDFQ: 64): on ResNet-20 widths 16, 24, 32 and 64 gave similar hit rates,
        # diversity and BN loss, at 1.4x, 1.7x, 2.0x and 4.0x dgh's time per iteration (1 CPU thread).
        super().__init__()
        c, h, w = shape
        self.label_emb = None
        if num_classes:
            self.label_emb = nn.Linear(num_classes, latent_dim, bias=False)
            nn.init.normal_(self.label_emb.weight)  # like nn.Embedding: N(0, 1) rows
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.out_hw = (h, w)
        self.fc = nn.Linear(latent_dim, 2 * width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.conv1, self.bn1 = SwingConv2d(2 * width, 2 * width, swing), nn.BatchNorm2d(2 * width)
        self.conv2, self.bn2 = SwingConv2d(2 * width, width, swing), nn.BatchNorm2d(width)
        self.conv3 = SwingConv2d(width, c, swing)
        # Genie ends in an affine-free BN (unit-variance output, like normalized inputs); a learnable
        # affine (initialized to identity) also fits inputs whose statistics are not N(0, 1).
        self.out_bn = nn.BatchNorm2d(c)

    def set_swing(self, on: bool, rng: "torch.Generator | None" = None) -> None:
        for m in (self.conv1, self.conv2, self.conv3):
            m.swing, m.rng = on, rng

    def forward(self, z: torch.Tensor, target: "torch.Tensor | None" = None,
                bounds: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
        """``bounds`` (lower, upper), broadcastable to the image, clamps the output (gradient 0
        outside, as the pixel methods' projection), so what is optimized is what is stored."""
        if self.label_emb is not None:
            if target is None:
                raise ValueError("this generator is conditional: pass the soft targets")
            z = z * self.label_emb(target.to(z.dtype))
        x = self.bn0(self.fc(z).view(z.shape[0], -1, self.h0, self.w0))
        x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, scale_factor=2, mode="nearest"))), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.out_bn(torch.tanh(self.conv3(x)))[..., :self.out_hw[0], :self.out_hw[1]]
        if bounds is not None:
            x = torch.max(torch.min(x, bounds[1]), bounds[0])
        return x


# ----------------------------------------------------------------------------- inversion

@dataclasses.dataclass
class InversionResult:
    """``images`` in the model's input space ``[N, C, H, W]`` (CPU float32); ``labels`` soft labels
    ``[N, num_classes]``; ``classes``/``weights`` the targets per image; ``bn_loss_history`` the BN
    loss per iteration (mean over batches; for ``dgh`` the set-level loss)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[tuple[int, ...]]
    weights: list[tuple[float, ...]]
    bn_loss_history: list[float]
    method: str
    label_mode: str


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _augment(x: torch.Tensor, rng: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip + circular shift (differentiable in x): the usual training augmentation."""
    if bool(torch.rand((), generator=rng) < 0.5):
        x = x.flip(-1)
    if max_shift > 0:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=rng).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x


def _check_args(method, label_mode, num_images, iters, batch_size, input_shape):
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {list(LABEL_MODES)}, got {label_mode!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (batch statistics need 2 images), got {batch_size!r}")
    if len(tuple(input_shape)) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")


def invert_bn(model: nn.Module, num_images: int, method: str = "dgh", label_mode: str = "single", *,
              mixup_k: int = 2, iters: int = 500, batch_size: int = 32, lr: "float | None" = None,
              seed: int = 0, input_shape: Sequence[int] = (3, 224, 224),
              device: "str | torch.device | None" = None, progress: bool = True,
              targets: "tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]] | None" = None,
              weights: str = "dirichlet", dirichlet_alpha: float = 1.0, ce_weight: "float | None" = None,
              focal_gamma: float = 2.0, stretch_weight: float = 1.0, tv_weight: float = 0.0,
              jitter: int = 0, latent_dim: int = 256,
              clamp_range: "tuple[Sequence[float], Sequence[float]] | None" = None) -> InversionResult:
    """Invert ``model``'s BatchNorm statistics into ``num_images`` images (see the module docs).

    ``lr`` defaults per method (pixels 0.25, genie 0.01 for the generator and 5x that for the
    latents), cosine-annealed over ``iters``. ``ce_weight`` defaults per label mode
    (``DEFAULT_CE_WEIGHT``: single 1, mixup 0.5).
    ``targets`` overrides the sampled targets with explicit (classes, weights) per image.
    ``tv_weight`` adds a total-variation image prior; ``jitter`` > 0 turns on the flip + shift
    augmentation (max shift in pixels; off by default, see the module notes). ``clamp_range=(mean, std)`` keeps optimized
    pixels inside the normalized image of [0, 1] (so storing them as 8-bit PNG loses nothing to
    clamping). The model is used in eval mode; its parameters are not changed.
    """
    _check_args(method, label_mode, num_images, iters, batch_size, input_shape)
    from tqdm.auto import tqdm

    shape = tuple(int(s) for s in input_shape)
    device = torch.device(device) if device is not None else model_device(model)
    lr = float(DEFAULT_LR[method] if lr is None else lr)
    ce_weight = resolve_ce_weight(label_mode, ce_weight)
    if not isinstance(jitter, int) or jitter < 0:
        raise ValueError(f"jitter must be an int >= 0 (max shift in pixels), got {jitter!r}")
    for name, value in (("ce_weight", ce_weight), ("stretch_weight", stretch_weight), ("tv_weight", tv_weight)):
        if not float(value) >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be a number >= 0 (a loss weight), got {value!r}")
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"model must return logits of shape [batch, classes], got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        num_classes = out.shape[1]
        if targets is None:
            classes, mix = make_targets(num_images, num_classes, label_mode, mixup_k, weights, dirichlet_alpha, seed)
        else:
            classes = [tuple(int(c) for c in cs) for cs in targets[0]]
            mix = [tuple(float(w) for w in ws) for ws in targets[1]]
            if len(classes) != num_images or len(mix) != num_images:
                raise ValueError(f"targets must give classes and weights for all {num_images} images")
        labels = soft_labels(classes, mix, num_classes)
        bounds = None
        if clamp_range is not None:
            m = torch.as_tensor(clamp_range[0], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
            s = torch.as_tensor(clamp_range[1], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
            bounds = ((0 - m) / s, (1 - m) / s)
        opts = dict(method=method, iters=iters, lr=lr, ce_weight=ce_weight,
                    focal_gamma=focal_gamma if method == "hast" else None, tv_weight=tv_weight,
                    jitter=jitter, bounds=bounds, latent_dim=latent_dim, shape=shape, device=device)
        n_batches = -(-num_images // batch_size)
        bar = tqdm(total=iters * n_batches, desc=f"bn-inversion ({method})", unit="it", disable=not progress,
                   leave=False)
        with BNCapture(model) as cap, bar:
            if method == "dgh":
                images, history = _invert_set(model, cap, labels, batch_size, seed, stretch_weight, bar, **opts)
            else:
                images, sums = [], [0.0] * iters
                for b in range(n_batches):
                    sl = slice(b * batch_size, min((b + 1) * batch_size, num_images))
                    x, hist = _invert_batch(model, cap, labels[sl].to(device), image_seed(seed, b), bar, **opts)
                    images.append(x)
                    sums = [a + h for a, h in zip(sums, hist)]
                images = torch.cat(images)
                history = [s / n_batches for s in sums]
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return InversionResult(images=images, labels=labels, classes=classes, weights=mix, bn_loss_history=history,
                           method=method, label_mode=label_mode)


def _prior_loss(x: torch.Tensor, tv_weight: float) -> "torch.Tensor | float":
    if tv_weight <= 0:
        return 0.0
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return tv_weight * tv


def _invert_batch(model, cap, target, batch_seed, bar, *, method, iters, lr, ce_weight, focal_gamma,
                  tv_weight, jitter, bounds, latent_dim, shape, device):
    """Optimize one batch independently (zeroq, hast: pixels; genie: generator + latents)."""
    n = target.shape[0]
    rng = torch.Generator().manual_seed(batch_seed)
    if method == "genie":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)  # generator init is reproducible per batch
            gen = GenieGenerator(latent_dim, shape, num_classes=target.shape[1]).to(device)
        z = torch.randn(n, latent_dim, generator=rng).to(device).requires_grad_(True)
        gen.set_swing(True, rng)
        params = [{"params": gen.parameters()}, {"params": [z], "lr": lr * GENIE_LATENT_LR_SCALE}]
        make = lambda: gen(z, target, bounds)  # noqa: E731
    else:
        x = torch.randn(n, *shape, generator=rng).to(device)
        if bounds is not None:
            x = torch.max(torch.min(x, bounds[1]), bounds[0])
        x.requires_grad_(True)
        params = [x]
        make = lambda: x  # noqa: E731
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9) if method == "genie" else (0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    history = []
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        img = make()
        logits = model(_augment(img, rng, jitter) if jitter else img)
        bn = cap.batch_loss()
        loss = bn / len(cap.layers) + _prior_loss(img, tv_weight)
        if ce_weight:
            loss = loss + ce_weight * _target_loss(logits, target, focal_gamma)
        loss.backward()
        opt.step()
        sched.step()
        if bounds is not None and method != "genie":
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, bounds[1]), bounds[0]))
        history.append(bn.item())
        bar.update(1)
    with torch.no_grad():
        if method == "genie":
            gen.set_swing(False)
            out = gen(z, target, bounds)  # generator BN in train mode: the same normalization the loss saw
        else:
            out = x.detach()
    return out.detach().float().cpu(), history


class SetStatistics:
    """DGH's set-level BN statistics: per-layer first/second moments of every batch of the set.

    ``loss_with(b, live)`` is the BN loss of the *whole set* in which batch ``b`` contributes its
    live moments (with gradient) and every other batch its cached ones; ``update(b, moments)``
    replaces batch ``b``'s cache. Sums are float64 so that the running totals do not drift.
    """

    def __init__(self, cap: BNCapture, batch_moments: list):
        self.cap = cap
        self.cache = [[(a.detach().double(), q.detach().double(), n) for a, q, n in m] for m in batch_moments]
        self.totals = [tuple(sum(v) for v in zip(*per_layer)) for per_layer in zip(*self.cache)]

    def loss_with(self, b: int, live) -> torch.Tensor:
        moments = [(t1 - c1 + s1.double(), t2 - c2 + s2.double(), tn - cn + n)
                   for (t1, t2, tn), (c1, c2, cn), (s1, s2, n) in zip(self.totals, self.cache[b], live)]
        return self.cap.loss_from_moments(moments).float()

    def update(self, b: int, live) -> None:
        fresh = [(a.detach().double(), q.detach().double(), n) for a, q, n in live]
        self.totals = [(t1 - c1 + f1, t2 - c2 + f2, tn - cn + fn) for (t1, t2, tn), (c1, c2, cn), (f1, f2, fn)
                       in zip(self.totals, self.cache[b], fresh)]
        self.cache[b] = fresh

    def loss(self) -> float:
        return float(self.cap.loss_from_moments(self.totals))


def _invert_set(model, cap, labels, batch_size, seed, stretch_weight, bar, *, method, iters, lr, ce_weight,
                focal_gamma, tv_weight, jitter, bounds, latent_dim, shape, device):
    """DGH: all images optimized against the statistics of the whole set (one sweep per iteration)."""
    n = labels.shape[0]
    rng = torch.Generator().manual_seed(image_seed(seed, 0x64676800))
    xs, opts, scheds, starts = [], [], [], list(range(0, n, batch_size))
    for start in starts:
        x = torch.randn(min(batch_size, n - start), *shape, generator=rng).to(device)
        if bounds is not None:
            x = torch.max(torch.min(x, bounds[1]), bounds[0])
        xs.append(x.requires_grad_(True))
        opts.append(torch.optim.Adam([xs[-1]], lr=lr))
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], iters))
    moments = []
    with torch.no_grad():
        for x in xs:
            model(x)
            moments.append(cap.moments())
    stats = SetStatistics(cap, moments)
    history = []
    for _ in range(iters):
        for b, x in enumerate(xs):
            opts[b].zero_grad(set_to_none=True)
            logits = model(_augment(x, rng, jitter) if jitter else x)
            live = cap.moments()
            bn = stats.loss_with(b, live)
            # A batch moves only its share (len(x) / n) of the set-level moments, so the BN term's
            # gradient shrinks with the set size while the per-batch target terms do not: scale it
            # back by n / len(x). Unscaled, a 512-image set ended with a 5x higher BN loss than a
            # 64-image one (150 vs 28 on ResNet-20 after 200 iterations).
            loss = bn * (n / len(x)) / len(cap.layers) + _prior_loss(x, tv_weight)
            if ce_weight:
                loss = loss + ce_weight * _target_loss(logits, labels[starts[b]:starts[b] + len(x)].to(device), None)
            if stretch_weight:
                loss = loss + stretch_weight * _stretch_loss(logits)
            loss.backward()
            opts[b].step()
            scheds[b].step()
            stats.update(b, live)
            if bounds is not None:
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, bounds[1]), bounds[0]))
            bar.update(1)
        history.append(stats.loss())  # set-level loss from the moments of this sweep
    return torch.cat([x.detach().float().cpu() for x in xs]), history


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, shapes, values): which model a set was inverted from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def generate_bn_inversion_set(out_dir, model: nn.Module, *, num_images: int, input_shape: Sequence[int],
                              mean: Sequence[float], std: Sequence[float], method: str = "dgh",
                              label_mode: str = "single", mixup_k: int = 2, weights: str = "dirichlet",
                              dirichlet_alpha: float = 1.0, iters: int = 500, batch_size: int = 32,
                              lr: "float | None" = None, seed: int = 0, shard_size: int = 256,
                              class_names: "Sequence[str] | None" = None, model_id: "str | None" = None,
                              device: "str | torch.device | None" = None, overwrite: bool = False,
                              progress: bool = True, rank: "int | None" = None, world_size: "int | None" = None,
                              **method_kwargs):
    """Generate (or resume) a BN-inversion synthetic set in ``out_dir``; returns ``out_dir`` (a Path).

    Targets for the whole set are dealt up front (balanced over classes); each shard is then
    inverted as one unit (``invert_bn`` with the shard's targets and a per-shard seed), so a resumed
    run reproduces an uninterrupted one shard for shard. For ``dgh`` the set-level statistics are
    those of a shard: use ``shard_size >= num_images`` to optimize the entire set jointly.
    Images are stored de-normalized with ``mean``/``std`` (recorded in the manifest) and clamped to
    [0, 1]; pixels are kept inside that range during optimization (``clamp_range``). Extra
    ``method_kwargs`` (ce_weight, focal_gamma, stretch_weight, tv_weight, jitter, latent_dim) go
    to :func:`invert_bn` and into the recorded config.
    """
    from pathlib import Path

    from .diffusion import check_rank
    from .store import SyntheticSetWriter, fill_set, to_uint8, to_unit_range

    _check_args(method, label_mode, num_images, iters, batch_size, input_shape)
    shape = tuple(int(s) for s in input_shape)
    if shape[0] not in (1, 3):
        raise ValueError(f"input_shape must have 1 or 3 channels to be stored as PNG, got {shape[0]}")
    if len(mean) != shape[0] or len(std) != shape[0] or any(float(s) <= 0 for s in std):
        raise ValueError(f"mean and std need {shape[0]} values each (std > 0), got {list(mean)} and {list(std)}")
    allowed = {"ce_weight", "focal_gamma", "stretch_weight", "tv_weight", "jitter", "latent_dim"}
    unknown = set(method_kwargs) - allowed
    if unknown:
        raise TypeError(f"unknown invert_bn option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    rank, world_size = check_rank(rank, world_size)
    # recorded resolved, so the manifest says what was used
    method_kwargs["ce_weight"] = resolve_ce_weight(label_mode, method_kwargs.get("ce_weight"))
    device = torch.device(device) if device is not None else model_device(model)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        num_classes = int(model(torch.zeros(2, *shape, device=device)).shape[1])
        model.train(was_training)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, the model has {num_classes} outputs")
    classes, mix = make_targets(num_images, num_classes, label_mode, mixup_k, weights, dirichlet_alpha, seed)
    shard_seed = lambda s: image_seed(seed, 0x5348000 + s)  # noqa: E731
    entries = []
    for i, (cs, ws) in enumerate(zip(classes, mix)):
        e = {"classes": list(cs), "weights": list(ws), "seed": shard_seed(i // shard_size)}
        if class_names is not None:
            e["class_names"] = [class_names[c] for c in cs]
        entries.append(e)
    config = {"source": "bn-inversion", "model_id": model_id, "model_sha256": model_fingerprint(model),
              "method": method, "label_mode": label_mode, "mixup_k": mixup_k if label_mode == "mixup" else None,
              "weights": weights, "dirichlet_alpha": dirichlet_alpha, "iters": iters, "batch_size": batch_size,
              "lr": lr, "seed": seed, "num_images": num_images, "input_shape": list(shape),
              "mean": [float(m) for m in mean], "std": [float(s) for s in std],
              "options": {k: method_kwargs[k] for k in sorted(method_kwargs)}}
    from .. import __version__

    meta = {"source": "bn-inversion", "generator": {"id": f"bn-inversion/{method}", "library": "dfqkern",
                                                    "version": __version__, "model_id": model_id},
            "class_names": list(class_names) if class_names is not None else None, "num_classes": num_classes,
            "label_type": "soft",
            "normalization": {"mean": config["mean"], "std": config["std"], "clamped": True}}
    writer = SyntheticSetWriter(out_dir, entries=entries, config=config, meta=meta, channels=shape[0],
                                shard_size=shard_size, overwrite=overwrite)

    def produce(indices):
        start, stop = indices[0], indices[-1] + 1  # whole shards: a contiguous range
        res = invert_bn(model, stop - start, method, label_mode, mixup_k=mixup_k, iters=iters,
                        batch_size=min(batch_size, max(2, stop - start)), lr=lr,
                        seed=shard_seed(start // shard_size), input_shape=shape, device=device,
                        progress=progress, targets=(classes[start:stop], mix[start:stop]),
                        clamp_range=(mean, std), **method_kwargs)
        yield list(range(start, stop)), to_uint8(to_unit_range(res.images, mean, std))

    fill_set(writer, produce, rank=rank, world_size=world_size, progress=progress,
             desc=f"bn-inversion set ({method})", whole_shards=True)
    return Path(out_dir)
