"""Synthetic images from a model's own BatchNorm statistics (no data, no generator model).

Every BatchNorm2d layer stores the running mean and variance of its input over the training set.
Images whose activations reproduce those statistics look, to the network, like training data.
The BN loss, as in ZeroQ (Cai et al., CVPR 2020) and Genie (Jeong et al., CVPR 2023), is

    L_BN = sum over BN layers l of  ||mu_l(x) - mu_l^BN||_2 + ||sigma_l(x) - sigma_l^BN||_2

with mu/sigma the per-channel mean / standard deviation of the layer's input over the batch
(biased variance; sigma = sqrt(var + eps) on both sides). Methods (``BNInversionConfig.method``):

* ``zeroq`` -- optimize the pixels directly (Adam), ZeroQ's "distilled data": no labels by default
  and ZeroQ's input prior (``input_prior_weight``, 1 for zeroq): the input counts as one more BN
  layer whose statistics are those of normalized data, per-image per-channel mean 0 and std 1.
* ``genie`` -- Genie's generator path as the paper has it: per batch, a fresh small generator
  (latent -> image; linear, two upsampling conv stages, tanh, a final BN with a learned affine, so
  model inputs need not be N(0, 1)) is trained jointly with its learned latent codes, on the BN loss
  alone by default (no labels). Genie's "swing convolution" is applied to the *pretrained model*:
  every strided Conv2d sees its input reflect-padded by one pixel and randomly shifted during the
  optimization (:class:`ModelSwing`), which removes the aliasing artifacts a stride otherwise lets the
  images exploit. Generator and latents have separate learning rates (``lr`` and
  ``GENIE_LATENT_LR_SCALE * lr``). With labels (``label_mode`` single / mixup) the generator is
  conditional as in genie-labels. The output is clamped like the pixel methods'.
* ``genie-labels`` -- dfqkern's earlier labelled variant (recorded as ``genie`` by older sets): the
  latent is multiplied by a learned embedding of the (soft) target, as in the GDFQ generator Genie
  builds on, and the swing convolutions are the generator's own convolutions, not the model's.
* ``hast`` -- pixels plus a hard-sample focal-weighted cross-entropy (HAST, Li et al., CVPR 2023):
  the target term is weighted by (1 - p_target)^gamma, so the optimization keeps working on the
  images the model still finds hard instead of making every image trivially confident.
* ``dgh`` -- DGH (Dikstein et al., WACV 2025): (1) the BN statistics are those of the *whole*
  generated set: a batch's loss uses the set-level moments in which only its own contribution
  carries gradient (:class:`SetStatistics`; a set-level unit is a shard of the stored set, by
  default the whole set when it fits in memory, see :func:`plan_shards`); (2) an output
  distribution-stretching loss, the inverse mean logit range 1 / (mean_i(max_c z_ic - min_c z_ic) +
  eps) (the "min-max difference" form, as in Sony MCT's data generation). DGH's third ingredient,
  training-style augmentation, is ``augment`` (``dgh``: smoothing + random crop + flip; ``flip-shift``;
  off by default) with ``jitter`` the max shift in pixels.

The optimized objective divides L_BN by the number of BN layers (as ZeroQ's reference
implementation does), so the weights of the other terms do not depend on the model's depth; loss
histories and :func:`bn_statistics_loss` report L_BN itself (the sum).

Targets: ``none`` (no labels; zeroq and genie by default), ``single`` (one class per image,
cross-entropy) or ``mixup`` (k classes per image with Dirichlet or uniform weights, soft
cross-entropy), dealt so every class is targeted equally often and weighted by ``ce_weight`` in
every method (default per label mode). Prefer ``dgh`` for mixup labels. The measurements behind the defaults are in
``bench/results/bn_inversion_notes.md``.

The ViT methods ``psaq`` and ``dfq-vit`` (no BatchNorm: patch-similarity entropy of the attention
outputs, :mod:`~dfqkern.datagen.vit_inversion`) run through :func:`invert_bn` and
:func:`generate_bn_inversion_set` too (same targets, shards, resume and manifest); their loss
history is the mean patch-similarity entropy.
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

from .._version import __version__
from .config import (AUTO_BATCH, BN_METHODS, DEFAULT_CE_WEIGHT, DEFAULT_LR, DEFAULT_SHARD_SIZE,  # noqa: F401
                     DGH_MEMORY_FRACTION, LABEL_MODES, METHODS, VIT_METHODS, WEIGHT_MODES, BNInversionConfig,
                     check_target_options)
from .distributed import all_reduce_sums, is_collective, split_evenly
from .prompts import (BN_SHARD_STREAM, BN_TARGET_STREAM, DGH_INIT_STREAM, balanced_class_groups, image_seed,
                      stream_rng)
from .resources import (activation_bytes_per_image, auto_batch_size, autocast, check_precision,  # noqa: F401
                        free_memory_bytes, grad_scaler)

# genie: the latent codes move this many times faster than the generator (``lr``), as Genie keeps
# separate rates for the two; one fast rate for both saturated the generator's tanh.
GENIE_LATENT_LR_SCALE = 5.0
GENIE_METHODS = ("genie", "genie-labels")


# ----------------------------------------------------------------------------- BN statistics

def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm2d (and SyncBatchNorm) layers with running statistics, in module order."""
    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))
              and m.track_running_stats and m.running_mean is not None and m.running_var is not None]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm2d layer with running statistics: "
                         f"BN-statistics inversion and the BN-sensitivity filter need one (for a vision transformer "
                         f"use method {' or '.join(VIT_METHODS)})")
    return layers


def bn_moment_loss(layers: Sequence[nn.Module], moments) -> torch.Tensor:
    """ZeroQ/Genie BN loss from per-layer (sum, sum of squares, count) per channel. Sums of shape
    ``[..., C]`` give one loss per leading index (e.g. one per left-out image)."""
    total = 0.0
    for layer, (s1, s2, n) in zip(layers, moments):
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        rm, rv = layer.running_mean.float(), layer.running_var.float()
        total = total + torch.linalg.vector_norm(mean - rm, dim=-1) + torch.linalg.vector_norm(
            torch.sqrt(var + layer.eps) - torch.sqrt(rv + layer.eps), dim=-1)
    return total


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
        return bn_moment_loss(self.layers, moments)

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

_DEFAULTS = BNInversionConfig()


def make_targets(num_images: int, num_classes: int, label_mode: str = _DEFAULTS.effective_label_mode,
                 mixup_k: int = _DEFAULTS.mixup_k, weights: str = _DEFAULTS.weights,
                 dirichlet_alpha: float = _DEFAULTS.dirichlet_alpha, seed: int = _DEFAULTS.seed
                 ) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Balanced target classes per image and their mixing weights (sum 1); empty for ``none``."""
    check_target_options(label_mode, weights, dirichlet_alpha)
    if label_mode == "none":
        return [()] * num_images, [()] * num_images
    k = 1
    if label_mode == "mixup":
        if not isinstance(mixup_k, int) or not 2 <= mixup_k <= num_classes:
            raise ValueError(f"mixup_k must be an int in [2, {num_classes}] (number of classes), got {mixup_k!r}")
        k = mixup_k
    rng = stream_rng(seed, BN_TARGET_STREAM)
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


def target_loss(logits: torch.Tensor, target: torch.Tensor, focal_gamma: "float | None") -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    if focal_gamma is None:
        return -(target * logp).sum(dim=1).mean()
    weight = (1 - logp.exp()).pow(focal_gamma)  # HAST: hard (low-probability) targets weigh more
    return -(target * weight * logp).sum(dim=1).mean()


_target_loss = target_loss  # its earlier name (tests/datagen/test_datagen_bn_inversion.py)


def _stretch_loss(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    z = logits.float().flatten(1)
    return 1.0 / ((z.max(dim=1).values - z.min(dim=1).values).mean() + eps)


# ----------------------------------------------------------------------------- Genie generator

def _swing(x: torch.Tensor, width: int, rng: "torch.Generator | None") -> torch.Tensor:
    """Reflect-pad by ``width`` and crop back at a random offset: a random shift of up to ``width``
    pixels that fills the border with the image's reflection (Genie's swing, DGH's random crop)."""
    width = min(width, x.shape[-2] - 1, x.shape[-1] - 1)  # reflect padding needs a wider input
    if width <= 0:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (width,) * 4, mode="reflect")
    i, j = torch.randint(0, 2 * width + 1, (2,), generator=rng).tolist()
    return x[..., i:i + h, j:j + w]


class SwingConv2d(nn.Module):
    """3x3 convolution whose input is reflect-padded and randomly shifted while ``swing`` is on."""

    def __init__(self, cin: int, cout: int, width: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)
        self.width, self.swing, self.rng = width, True, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_swing(x, self.width, self.rng) if self.swing else x)


class ModelSwing:
    """Genie's swing convolution on a pretrained model: while active, every ``Conv2d`` with a stride
    above 1 sees its input reflect-padded by ``width`` and randomly shifted (one draw per conv and
    forward, from ``rng``). Forward pre-hooks: the model's modules and weights are not replaced."""

    def __init__(self, model: nn.Module, rng: torch.Generator, width: int = 1):
        self.rng, self.width = rng, width
        self._handles = [m.register_forward_pre_hook(self._hook) for m in model.modules()
                         if isinstance(m, nn.Conv2d) and any(s > 1 for s in m.stride)]

    def _hook(self, module, args):
        return (_swing(args[0], self.width, self.rng), *args[1:])

    def __enter__(self) -> "ModelSwing":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class GenieGenerator(nn.Module):
    """latent [n, latent_dim] (+ soft target [n, classes]) -> image [n, C, H, W], after Genie / GDFQ.

    With ``num_classes`` the latent is multiplied by a learned embedding of the target, as in the
    GDFQ generator Genie builds on; a soft (mixup) target embeds as the weighted mix of its classes.
    """

    def __init__(self, latent_dim: int, shape: Sequence[int], width: int = 16, swing: int = 1,
                 num_classes: "int | None" = None):
        # width 16 (Genie/GDFQ: 64): wider was no better and up to 3x slower (bench/results/bn_inversion_notes.md)
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
    owned: "range | None" = None  # distributed dgh: the indices (of the call's images) ``images`` holds


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _augment(x: torch.Tensor, rng: torch.Generator, mode: str, max_shift: int) -> torch.Tensor:
    """The images as the model sees them during inversion (differentiable in x), ``AUGMENTS``:
    ``flip-shift``: random horizontal flip + circular shift; ``dgh``: 3x3 Gaussian (binomial)
    smoothing, reflect-padded random crop (shift), random flip; ``none``: x itself."""
    if mode == "none":
        return x
    if mode == "dgh":
        k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
        k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
        x = _swing(F.conv2d(F.pad(x, (1,) * 4, mode="replicate"), k, groups=x.shape[1]), max_shift, rng)
        return x.flip(-1) if bool(torch.rand((), generator=rng) < 0.5) else x
    if bool(torch.rand((), generator=rng) < 0.5):
        x = x.flip(-1)
    if max_shift > 0:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=rng).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x


def _check_set_shape(num_images, input_shape) -> tuple[int, ...]:
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if len(tuple(input_shape)) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


def invert_bn(model: nn.Module, num_images: int, method: "str | None" = None, label_mode: "str | None" = None, *,
              config: "BNInversionConfig | None" = None, input_shape: Sequence[int] = (3, 224, 224),
              device: "str | torch.device | None" = None, progress: bool = True,
              targets: "tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]] | None" = None,
              clamp_range: "tuple[Sequence[float], Sequence[float]] | None" = None,
              part: "tuple[int, int] | None" = None, **options) -> InversionResult:
    """Invert ``model``'s BatchNorm statistics into ``num_images`` images (see the module docs).

    The options are a :class:`~dfqkern.datagen.config.BNInversionConfig`: ``config``, with
    ``method``, ``label_mode`` and any other of its fields given as keywords (``iters=...``)
    replacing its values. ``lr`` is cosine-annealed over ``iters``.
    ``targets`` overrides the sampled targets with explicit (classes, weights) per image.
    ``clamp_range=(mean, std)`` keeps optimized pixels inside the normalized image of [0, 1] (so
    storing them as 8-bit PNG loses nothing to clamping). The model is used in eval mode; its
    parameters are not changed. ``precision`` (a config field) autocasts the model's forward.

    ``part=(rank, world_size)`` (dgh only, every rank of a running torch.distributed group calling
    with the same arguments): this rank optimizes its batches of the set (:func:`dgh_batches`) against
    the statistics of the whole set, summed over the ranks; ``images`` then holds its images only,
    the indices ``owned`` of the ``num_images``.
    """
    given = {k: v for k, v in (("method", method), ("label_mode", label_mode)) if v is not None}
    cfg = BNInversionConfig.build(config, **given, **options)
    shape = _check_set_shape(num_images, input_shape)
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else model_device(model)
    check_precision(cfg.precision, device)
    if part is not None and part[1] > 1 and (cfg.method != "dgh" or not is_collective()):
        raise ValueError(f"part={part}: splitting one set over ranks is for dgh (set-level statistics) inside a "
                         f"running torch.distributed group; method {cfg.method!r}, group running: {is_collective()}")
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad(), autocast(cfg.precision, device):  # also: the model runs at this precision
            out = model(torch.zeros(2, *shape, device=device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"model must return logits of shape [batch, classes], got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        num_classes = out.shape[1]
        if targets is None:
            classes, mix = make_targets(num_images, num_classes, cfg.effective_label_mode, cfg.mixup_k,
                                        cfg.weights, cfg.dirichlet_alpha, cfg.seed)
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
        run = _Run(cfg, bounds, shape, device)
        n_batches = -(-num_images // cfg.batch_size)
        if cfg.method == "dgh" and part is not None:
            n_batches = len(dgh_batches(num_images, cfg.batch_size, *part))
        bar = tqdm(total=cfg.iters * n_batches, desc=f"bn-inversion ({cfg.method})", unit="it",
                   disable=not progress, leave=False)
        vit = cfg.method in VIT_METHODS
        if vit:
            from .vit_inversion import PatchCapture, invert_vit_batch
        with (PatchCapture(model, cfg.patch_source, cfg.method) if vit else BNCapture(model)) as cap, bar:
            owned = None
            if cfg.method == "dgh":
                images, history, owned = _invert_set(model, cap, labels, bar, run, part or (0, 1))
            else:
                images, sums = [], [0.0] * cfg.iters
                for b in range(n_batches):
                    sl = slice(b * cfg.batch_size, min((b + 1) * cfg.batch_size, num_images))
                    x, hist = (invert_vit_batch if vit else _invert_batch)(
                        model, cap, labels[sl].to(device), image_seed(cfg.seed, b), bar, run)
                    images.append(x)
                    sums = [a + h for a, h in zip(sums, hist)]
                images = torch.cat(images)
                history = [s / n_batches for s in sums]
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return InversionResult(images=images, labels=labels, classes=classes, weights=mix, bn_loss_history=history,
                           method=cfg.method, label_mode=cfg.effective_label_mode,
                           owned=owned if part is not None and part[1] > 1 else None)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the optimization loops read: the options plus the pixel bounds, image shape and device."""
    cfg: BNInversionConfig
    bounds: "tuple[torch.Tensor, torch.Tensor] | None"
    shape: tuple[int, ...]
    device: torch.device

    def target_loss(self, logits: torch.Tensor, target: torch.Tensor) -> "torch.Tensor | float":
        weight = self.cfg.effective_ce_weight
        if not weight:
            return 0.0
        focal = self.cfg.focal_gamma if self.cfg.method == "hast" else None
        return weight * target_loss(logits, target, focal)

    def model_input(self, img: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return _augment(img, rng, self.cfg.effective_augment, self.cfg.jitter)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's logits under the configured precision (autocast); float32 out, so every
        loss is computed in float32 (the BN moments are summed in float32 by :class:`BNCapture`)."""
        with autocast(self.cfg.precision, self.device):
            return model(x).float()

    def clamp_(self, x: torch.Tensor) -> None:
        if self.bounds is not None:
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, self.bounds[1]), self.bounds[0]))


def input_prior(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ZeroQ's input prior: the (normalized) input treated as one more BN layer with running mean 0
    and std 1, per image and channel over space (as ZeroQ's reference code), mean over images."""
    xf = x.float().flatten(2)
    std = torch.sqrt(xf.var(dim=2, unbiased=False) + eps)
    return (torch.linalg.vector_norm(xf.mean(dim=2), dim=1) + torch.linalg.vector_norm(std - 1, dim=1)).mean()


def prior_loss(x: torch.Tensor, cfg: BNInversionConfig, num_bn_layers: int) -> "torch.Tensor | float":
    """Image priors: total variation (``tv_weight``), L2 (``l2_weight``, mean squared pixel) and ZeroQ's
    input prior, which is scaled like one more BN layer of the layer-mean BN term."""
    loss, tv_weight = 0.0, cfg.effective_tv_weight
    if tv_weight > 0:
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        loss = loss + tv_weight * tv
    if cfg.l2_weight > 0:
        loss = loss + cfg.l2_weight * x.float().pow(2).mean()
    if cfg.effective_input_prior_weight > 0:
        loss = loss + cfg.effective_input_prior_weight * input_prior(x) / num_bn_layers
    return loss


def _invert_batch(model, cap, target, batch_seed, bar, run: _Run):
    """Optimize one batch independently (zeroq, hast: pixels; genie, genie-labels: generator + latents)."""
    import contextlib

    cfg, n = run.cfg, target.shape[0]
    lr = cfg.effective_lr
    rng = torch.Generator().manual_seed(batch_seed)
    genie = cfg.method in GENIE_METHODS
    swing = contextlib.nullcontext()
    if genie:
        legacy = cfg.method == "genie-labels"  # swing inside the generator, always conditional
        conditional = legacy or cfg.effective_label_mode != "none"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)  # generator init is reproducible per batch
            gen = GenieGenerator(cfg.latent_dim, run.shape, swing=1 if legacy else 0,
                                 num_classes=target.shape[1] if conditional else None).to(run.device)
        z = torch.randn(n, cfg.latent_dim, generator=rng).to(run.device).requires_grad_(True)
        if legacy:
            gen.set_swing(True, rng)
        else:
            swing = ModelSwing(model, rng)
        params = [{"params": gen.parameters()}, {"params": [z], "lr": lr * GENIE_LATENT_LR_SCALE}]
        make = lambda: gen(z, target if conditional else None, run.bounds)  # noqa: E731
    else:
        x = torch.randn(n, *run.shape, generator=rng).to(run.device)
        run.clamp_(x)
        x.requires_grad_(True)
        params = [x]
        make = lambda: x  # noqa: E731
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9) if genie else (0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters)
    scaler = grad_scaler(cfg.precision, run.device)
    history = []
    with swing:
        for _ in range(cfg.iters):
            opt.zero_grad(set_to_none=True)
            img = make()  # the generator (small) stays float32; the model runs at the configured precision
            logits = run.forward(model, run.model_input(img, rng))
            bn = cap.batch_loss()
            loss = bn / len(cap.layers) + prior_loss(img, cfg, len(cap.layers)) + run.target_loss(logits, target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if not genie:
                run.clamp_(x)
            history.append(bn.item())
            bar.update(1)
    with torch.no_grad():
        if genie:
            gen.set_swing(False)
            out = make()  # generator BN in train mode: the same normalization the loss saw
        else:
            out = x.detach()
    return out.detach().float().cpu(), history


class SetStatistics:
    """DGH's set-level BN statistics: per-layer first/second moments of every batch of the set.

    ``loss_with(b, live)`` is the BN loss of the *whole set* in which batch ``b`` contributes its
    live moments (with gradient) and every other batch its cached ones; ``update(b, moments)``
    replaces batch ``b``'s cache. Sums are float64 so that the running totals do not drift.

    With ``collective=True`` (a torch.distributed group running) the batches here are this rank's
    part of the set: the totals are the sums over all ranks (:func:`all_reduce_sums`), other ranks'
    batches entering with the moments of their last :meth:`sync` (once per sweep), this rank's
    with its latest ones. After a sync every rank holds the same totals: those of the whole set.
    """

    def __init__(self, cap: BNCapture, batch_moments: list, collective: bool = False):
        self.cap, self.collective = cap, collective
        self.cache = [[(a.detach().double(), q.detach().double(), n) for a, q, n in m] for m in batch_moments]
        self.totals = self.local_sums()
        if collective:
            self.sync()

    def local_sums(self) -> list:
        """Per layer (sum x, sum x^2, count) over this process's cached batches (zeros if it has none)."""
        sums = []
        for i, layer in enumerate(self.cap.layers):
            zero = torch.zeros_like(layer.running_mean, dtype=torch.float64)
            s1, s2, n = zero, zero.clone(), 0
            for per_batch in self.cache:
                a, q, c = per_batch[i]
                s1, s2, n = s1 + a, s2 + q, n + c
            sums.append((s1, s2, n))
        return sums

    def sync(self) -> None:
        """Totals := the sums over every rank's cached batches (a collective: all ranks call it)."""
        local = self.local_sums()
        flat = all_reduce_sums([t for s1, s2, n in local for t in (s1, s2, torch.tensor([float(n)]))])
        self.totals = [(flat[3 * i], flat[3 * i + 1], int(round(float(flat[3 * i + 2])))) for i in range(len(local))]

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


def dgh_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The image ranges of the batches a dgh set-level unit of ``n`` images is optimized in, and of
    those the ones rank ``rank`` of ``world_size`` optimizes (a contiguous run of batches,
    :func:`split_evenly`); every rank draws the initial pixels of all batches in this order."""
    starts = list(range(0, n, batch_size))
    return [range(starts[b], min(starts[b] + batch_size, n)) for b in split_evenly(len(starts), rank, world_size)]


def _invert_set(model, cap, labels, bar, run: _Run, part: "tuple[int, int]" = (0, 1)):
    """DGH: all images optimized against the statistics of the whole set (one sweep per iteration).
    ``part=(rank, world_size)`` with a process group running: this rank optimizes its batches
    (:func:`dgh_batches`), the statistics are summed over the ranks once per sweep."""
    cfg, n = run.cfg, labels.shape[0]
    rank, world = part
    collective = world > 1
    rng = torch.Generator().manual_seed(image_seed(cfg.seed, DGH_INIT_STREAM))
    mine = dgh_batches(n, cfg.batch_size, rank, world)
    owned = {r.start for r in mine}
    xs, opts, scheds, ranges = [], [], [], []
    for every in dgh_batches(n, cfg.batch_size):  # all ranks draw every batch: the same pixels as one process
        x = torch.randn(len(every), *run.shape, generator=rng)
        if every.start not in owned:
            continue
        x = x.to(run.device)
        run.clamp_(x)
        xs.append(x.requires_grad_(True))
        ranges.append(every)
        opts.append(torch.optim.Adam([xs[-1]], lr=cfg.effective_lr))
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], cfg.iters))
    if collective:  # augmentation draws differ per rank (the init above is shared)
        rng.manual_seed(image_seed(cfg.seed, DGH_INIT_STREAM) + 1 + rank)
    moments = []
    with torch.no_grad():
        for x in xs:
            run.forward(model, x)
            moments.append(cap.moments())
    stats = SetStatistics(cap, moments, collective=collective)
    scaler = grad_scaler(cfg.precision, run.device)
    history = []
    for _ in range(cfg.iters):
        for b, x in enumerate(xs):
            opts[b].zero_grad(set_to_none=True)
            logits = run.forward(model, run.model_input(x, rng))
            live = cap.moments()
            bn = stats.loss_with(b, live)
            # A batch moves only its share (len(x) / n) of the set-level moments, so the BN term's
            # gradient shrinks with the set size while the per-batch target terms do not: scale it
            # back by n / len(x) (unscaled, larger sets ended at a much higher BN loss).
            loss = (bn * (n / len(x)) / len(cap.layers) + prior_loss(x, cfg, len(cap.layers))
                    + run.target_loss(logits, labels[ranges[b].start:ranges[b].stop].to(run.device)))
            if cfg.stretch_weight:
                loss = loss + cfg.stretch_weight * _stretch_loss(logits)
            scaler.scale(loss).backward()
            scaler.step(opts[b])
            scaler.update()
            scheds[b].step()
            stats.update(b, live)
            run.clamp_(x)
            bar.update(1)
        if collective:
            stats.sync()
        history.append(stats.loss())  # set-level loss from the moments of this sweep
    own = range(ranges[0].start, ranges[-1].stop) if ranges else range(0)
    images = torch.cat([x.detach().float().cpu() for x in xs]) if xs else torch.empty(0, *run.shape)
    return images, history, own


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


def shard_batch_size(batch_size: int, shard_images: int) -> int:
    """The batch size a shard of ``shard_images`` is inverted with (never above the shard, at least 2)."""
    return min(batch_size, max(2, shard_images))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How a BN-inversion set is made: split into shards (each inverted as one unit), over
    ``world_size`` ranks, ``batch_size`` images per optimizer step at ``precision``.

    ``collective``: dgh with several ranks in a torch.distributed group: every shard is split over
    the ranks by batches and its BN statistics are summed over them; otherwise whole shards are
    dealt to the ranks round-robin. ``unit_bytes`` = the images one rank holds of one shard with
    their gradient and Adam's two moments (4 float32 copies), ``activation_bytes`` the estimated
    activations of one batch (None: not estimated), ``free_bytes`` the free memory seen (None:
    unknown), ``budget_bytes`` the part of it a dgh shard may use."""
    shard_size: int
    num_images: int
    method: str
    unit_bytes: int
    free_bytes: "int | None"
    budget_bytes: "int | None"
    reason: str
    batch_size: int = BNInversionConfig.default("batch_size")
    batch_reason: str = "as given"
    precision: str = "fp32"
    world_size: int = 1
    collective: bool = False
    activation_bytes: "int | None" = None
    device: "str | None" = None

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_images(self, shard: int) -> int:
        return min(self.shard_size, self.num_images - shard * self.shard_size)

    def rank_part(self, shard: int, rank: int) -> int:
        """Images of ``shard`` that ``rank`` optimizes and writes."""
        m = self.shard_images(shard)
        if self.collective:
            return sum(len(r) for r in dgh_batches(m, shard_batch_size(self.batch_size, m), rank, self.world_size))
        return m if shard % self.world_size == rank else 0

    def rank_images(self) -> list[int]:
        """Images each rank generates (and writes): disjoint, summing to ``num_images``."""
        return [sum(self.rank_part(s, r) for s in range(self.num_shards)) for r in range(self.world_size)]

    def rank_shards(self) -> list[list[int]]:
        """The shards each rank works on (collective: every shard, a part of each)."""
        return [[s for s in range(self.num_shards) if self.rank_part(s, r)] for r in range(self.world_size)]

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        text = (f"{self.method}: {self.num_shards} shard(s) of up to {self.shard_size} images ({self.reason}); "
                f"batch size {self.batch_size} ({self.batch_reason}); precision {self.precision}"
                + (f" on {self.device}" if self.device else ""))
        if self.world_size > 1:
            how = ("each shard split over the ranks, its BN statistics summed over them" if self.collective
                   else "whole shards dealt round-robin")
            parts = ", ".join(f"rank {r}: {n} images in {len(sh)} shard(s)"
                              for r, (n, sh) in enumerate(zip(self.rank_images(), self.rank_shards())))
            text += f"; {self.world_size} ranks, {how}: {parts}"
        if self.method == "dgh":
            scope = "the whole set" if self.shard_size >= self.num_images else f"each {self.shard_size}-image shard"
            text += f"; BN statistics of {scope}"
        free = "unknown" if self.free_bytes is None else mib(self.free_bytes)
        act = "not estimated" if self.activation_bytes is None else mib(self.activation_bytes)
        text += (f"; memory per rank: estimated {mib(self.unit_bytes)} for the images of a shard and their optimizer "
                 f"state, {act} for one batch of activations (free memory {free})")
        return text


def resolve_batch_size(batch_size, *, model: "nn.Module | None", input_shape: Sequence[int],
                       device: "str | torch.device", precision: str = "fp32", out_dir=None,
                       reserved_bytes: int = 0, free_bytes: "int | None" = None) -> tuple[int, str]:
    """``(batch size, why)``: an int as given; ``"auto"``: the batch size an unfinished or finished set
    in ``out_dir`` was started with (so it resumes), else on CUDA the largest batch whose estimated
    activations (:func:`~dfqkern.datagen.resources.activation_bytes_per_image`) and pixel state fit
    in the free memory less ``reserved_bytes`` (:func:`~dfqkern.datagen.resources.auto_batch_size`),
    else (CPU) :class:`BNInversionConfig`'s default batch size."""
    from .store import recorded_run

    if batch_size != AUTO_BATCH:
        return batch_size, "as given"
    prev = (recorded_run(out_dir) or {}).get("config") if out_dir is not None else None
    if isinstance(prev, dict) and isinstance(prev.get("batch_size"), int):
        return prev["batch_size"], "auto: as the set in the output directory was started"
    default = BNInversionConfig.default("batch_size")
    if torch.device(device).type != "cuda" and free_bytes is None:
        return default, "auto: the CPU default"
    if model is None:
        raise ValueError("batch_size 'auto' needs the model (its activation memory per image)")
    per_image = activation_bytes_per_image(model, input_shape, precision, device) + 4 * 4 * math.prod(input_shape)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    if free is None:
        return default, "auto: free memory unknown, the default"
    return (auto_batch_size(free, per_image, reserved_bytes=reserved_bytes, minimum=2),
            f"auto: fits the free memory at {per_image / 2**20:.2f} MiB per image")


def plan_shards(config: "BNInversionConfig | None" = None, *, num_images: int, input_shape: Sequence[int],
                device: "str | torch.device | None" = None, shard_size: "int | None" = None, out_dir=None,
                free_bytes: "int | None" = None, model: "nn.Module | None" = None,
                world_size: "int | None" = None, collective: "bool | None" = None, **options) -> ShardPlan:
    """The plan of a BN-inversion set. Shard size: ``shard_size`` when given; else the one an
    unfinished or finished set in ``out_dir`` was started with (so a resumed run matches it); else
    for ``dgh`` the whole set when each rank's part of its pixels and Adam state fits in
    ``DGH_MEMORY_FRACTION`` of the free memory (or the largest multiple of the batch size that
    does), for the other methods ``DEFAULT_SHARD_SIZE``. ``batch_size="auto"``: see
    :func:`resolve_batch_size` (needs ``model``). ``world_size`` None: from the launcher
    (:func:`~dfqkern.datagen.distributed.dist_info`); ``collective`` None: dgh with several ranks
    (dfqkern generate starts the process group under torchrun). ``model`` also gives the activation
    estimate."""
    from .distributed import check_rank
    from .store import recorded_run

    batch_option = options.pop("batch_size", None)
    precision = options.get("precision", (config or BNInversionConfig()).precision)
    shape = _check_set_shape(num_images, input_shape)
    dev = torch.device(device or "cpu")
    check_precision(precision, dev)
    _, world = check_rank(0, world_size) if world_size is not None else check_rank(None, None)
    method = options.get("method", (config or BNInversionConfig()).method)
    collective = (method == "dgh" and world > 1) if collective is None else bool(collective)
    per_image = 4 * 4 * math.prod(shape)
    free = free_memory_bytes(dev) if free_bytes is None else free_bytes
    budget = None if free is None else int(free * DGH_MEMORY_FRACTION)
    prev = recorded_run(out_dir) if out_dir is not None else None
    # dgh holds a shard's images during its whole run: the batch must fit beside (a rank's part of) them
    resident = -(-num_images // world) * per_image if method == "dgh" and collective else 0
    if batch_option is None:
        batch, batch_reason = (config or BNInversionConfig()).batch_size, "default"
    else:
        batch, batch_reason = resolve_batch_size(batch_option, model=model, input_shape=shape, device=dev,
                                                 precision=precision, out_dir=out_dir, reserved_bytes=resident,
                                                 free_bytes=free_bytes)
    cfg = BNInversionConfig.build(config, batch_size=batch, **options)

    def part_bytes(size: int) -> int:  # the images one rank holds of a shard of ``size``
        if not collective:
            return min(size, num_images) * per_image
        m = min(size, num_images)
        return max(sum(len(b) for b in dgh_batches(m, shard_batch_size(cfg.batch_size, m), k, world))
                   for k in range(world)) * per_image

    if shard_size is not None:
        size, reason = shard_size, "as given"
    elif prev and prev.get("num_images") == num_images and isinstance(prev.get("shard_size"), int):
        size, reason = prev["shard_size"], "as the set in the output directory was started"
    elif cfg.method != "dgh":
        size, reason = DEFAULT_SHARD_SIZE, "default; batches are independent"
    elif budget is None or part_bytes(num_images) <= budget:
        size, reason = num_images, "default for dgh: the whole set"
    else:
        fit = max(cfg.batch_size, budget * (world if collective else 1) // per_image // cfg.batch_size
                  * cfg.batch_size)
        size = min(num_images, fit)
        reason = f"the whole set does not fit in {DGH_MEMORY_FRACTION:g} of the free memory"
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {size!r}")
    act = None
    if model is not None:
        act = activation_bytes_per_image(model, shape, cfg.precision, dev if device is not None else None
                                         ) * shard_batch_size(cfg.batch_size, min(size, num_images))
    return ShardPlan(size, num_images, cfg.method, part_bytes(size), free, budget, reason, batch_size=cfg.batch_size,
                     batch_reason=batch_reason, precision=cfg.precision, world_size=world, collective=collective,
                     activation_bytes=act, device=str(dev) if device is not None else None)


def generate_bn_inversion_set(out_dir, model: nn.Module, config: "BNInversionConfig | None" = None, *,
                              num_images: int, input_shape: Sequence[int], mean: Sequence[float],
                              std: Sequence[float], shard_size: "int | None" = None,
                              class_names: "Sequence[str] | None" = None, model_id: "str | None" = None,
                              device: "str | torch.device | None" = None, overwrite: bool = False,
                              progress: bool = True, rank: "int | None" = None, world_size: "int | None" = None,
                              **options):
    """Generate (or resume) a BN-inversion synthetic set in ``out_dir``; returns ``out_dir`` (a Path).

    The options are ``config`` with any :class:`~dfqkern.datagen.config.BNInversionConfig` field
    given as a keyword (``method="dgh", iters=200``) replacing its value; ``config.to_dict()`` is
    recorded in the manifest (``precision`` included). Targets for the whole set are dealt up front
    (balanced over classes); each shard is then inverted as one unit (``invert_bn`` with the shard's
    targets and a per-shard seed), so a resumed run reproduces an uninterrupted one shard for shard.
    For ``dgh`` the set-level statistics are those of a shard; ``shard_size`` None picks it with
    :func:`plan_shards` (the whole set when it fits in memory). ``batch_size="auto"``: see
    :func:`resolve_batch_size`. Images are stored de-normalized with ``mean``/``std`` (recorded in
    the manifest) and clamped to [0, 1]; pixels are kept inside that range during optimization.

    Several ranks (``rank``/``world_size``, default from the launcher) write disjoint images of the
    one set: with a torch.distributed group running, dgh splits every shard over the ranks and sums
    its BN statistics over them (every rank must call this with the same arguments); otherwise
    whole shards are dealt round-robin. The manifest is written once, when the set is complete.
    ``device``: a bare ``cuda`` is ``cuda:LOCAL_RANK``; None the model's device. The model is moved
    to the device.
    """
    from pathlib import Path

    from .distributed import broadcast_module, check_rank, resolve_device, same_on_all_ranks
    from .store import (SyntheticSetError, canonical_digest, SyntheticSetWriter, fill_set, fill_set_split, recorded_run, to_uint8,
                        to_unit_range)

    rank, world_size = check_rank(rank, world_size)
    device = resolve_device(device) if device is not None else model_device(model)
    shape = _check_set_shape(num_images, input_shape)
    collective = is_collective() and world_size > 1
    if options.get("batch_size") == AUTO_BATCH:
        model.to(device)
        resident = -(-num_images // world_size) * 16 * math.prod(shape) if collective else 0
        options["batch_size"] = resolve_batch_size(AUTO_BATCH, model=model, input_shape=shape, device=device,
                                                   precision=options.get("precision", (config or BNInversionConfig()
                                                                                       ).precision),
                                                   out_dir=None if overwrite else out_dir, reserved_bytes=resident)[0]
    cfg = BNInversionConfig.build(config, **options)
    if shape[0] not in (1, 3):
        raise ValueError(f"input_shape must have 1 or 3 channels to be stored as PNG, got {shape[0]}")
    if len(mean) != shape[0] or len(std) != shape[0] or any(float(s) <= 0 for s in std):
        raise ValueError(f"mean and std need {shape[0]} values each (std > 0), got {list(mean)} and {list(std)}")
    check_precision(cfg.precision, device)
    if cfg.method in VIT_METHODS:  # the model must suit the method before the set directory is prepared
        from .vit_inversion import attention_modules

        attention_modules(model, f"method {cfg.method!r}")
    else:
        bn_layers(model)
    split = collective and cfg.method == "dgh"
    if cfg.method == "dgh" and world_size > 1 and not collective:
        import logging

        logging.getLogger(__name__).warning(
            "dgh over %d ranks without a torch.distributed group: whole shards are dealt to the ranks and each "
            "shard's BN statistics are its own (start the processes with torchrun / init_process_group to sum "
            "the statistics of a shard over the ranks)", world_size)
    model.to(device)
    if collective:  # every rank inverts rank 0's weights (a model each rank built may differ: random init)
        broadcast_module(model)
    shard_size = plan_shards(cfg, num_images=num_images, input_shape=shape, device=device, shard_size=shard_size,
                             out_dir=None if overwrite else out_dir, world_size=world_size,
                             collective=split).shard_size
    with torch.no_grad():
        was_training = model.training
        model.eval()
        num_classes = int(model(torch.zeros(2, *shape, device=device)).shape[1])
        model.train(was_training)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, the model has {num_classes} outputs")
    classes, mix = make_targets(num_images, num_classes, cfg.effective_label_mode, cfg.mixup_k, cfg.weights,
                                cfg.dirichlet_alpha, cfg.seed)
    shard_seed = lambda s: image_seed(cfg.seed, BN_SHARD_STREAM + s)  # noqa: E731
    entries = []
    for i, (cs, ws) in enumerate(zip(classes, mix)):
        e = {"classes": list(cs), "weights": list(ws), "seed": shard_seed(i // shard_size)}
        if class_names is not None:
            e["class_names"] = [class_names[c] for c in cs]
        entries.append(e)
    record = {"source": "bn-inversion", "model_id": model_id, "model_sha256": model_fingerprint(model),
              **cfg.to_dict(), "num_images": num_images, "input_shape": list(shape),
              "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    old = (recorded_run(out_dir) or {}).get("config")
    if isinstance(old, dict) and old != record and {**old, **cfg.to_dict()} == record and cfg.same_record(old):
        record = old  # an older record of the same run: keep it, so the set resumes and its manifest keeps its keys
    meta = {"source": "bn-inversion", "generator": {"id": f"bn-inversion/{cfg.method}", "library": "dfqkern",
                                                    "version": __version__, "model_id": model_id},
            "class_names": list(class_names) if class_names is not None else None, "num_classes": num_classes,
            "label_type": "none" if cfg.effective_label_mode == "none" else "soft",
            "normalization": {"mean": record["mean"], "std": record["std"], "clamped": True},
            # how the run that finished the set was spread (not part of the resume check)
            "distributed": {"world_size": world_size, "split_shards": split}}
    if collective and not same_on_all_ranks(canonical_digest([record, entries])):
        raise SyntheticSetError(f"the ranks were given different sets to make in {str(out_dir)!r} (options, number "
                                f"of images or classes differ from rank 0's): start every rank with the same arguments")
    make_writer = lambda replace: SyntheticSetWriter(out_dir, entries=entries, config=record, meta=meta,  # noqa: E731
                                                    channels=shape[0], shard_size=shard_size, overwrite=replace)
    if not split:
        writer = make_writer(overwrite)
    else:  # rank 0 prepares the directory (clears it with overwrite, refuses another run's) before the others
        from .distributed import any_rank

        error = None
        if rank == 0:
            try:
                writer = make_writer(overwrite)
            except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
                error = err
        if any_rank([error is not None])[0]:
            raise error if error is not None else SyntheticSetError(f"rank 0 could not prepare {str(out_dir)!r} "
                                                                    f"(see its error)")
        if rank != 0:
            writer = make_writer(False)

    def produce(indices):
        start, stop = indices[0], indices[-1] + 1  # whole shards: a contiguous range
        shard_cfg = dataclasses.replace(cfg, batch_size=shard_batch_size(cfg.batch_size, stop - start),
                                        seed=shard_seed(start // shard_size))
        res = invert_bn(model, stop - start, config=shard_cfg, input_shape=shape, device=device, progress=progress,
                        targets=(classes[start:stop], mix[start:stop]), clamp_range=(mean, std),
                        part=(rank, world_size) if split else None)
        own = res.owned if res.owned is not None else range(stop - start)
        yield [start + i for i in own], to_uint8(to_unit_range(res.images, mean, std))

    desc = f"bn-inversion set ({cfg.method})"
    if split:
        fill_set_split(writer, produce, rank=rank, progress=progress, desc=desc)
    else:
        fill_set(writer, produce, rank=rank, world_size=world_size, progress=progress, desc=desc, whole_shards=True)
    return Path(out_dir)
