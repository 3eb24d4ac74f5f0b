"""Synthetic images from a model's own BatchNorm statistics (no data, no generator model).

Every BatchNorm2d layer stores the running mean and variance of its input over the training set.
Images whose activations reproduce those statistics look, to the network, like training data.
The BN loss, as in ZeroQ (Cai et al., CVPR 2020) and Genie (Jeong et al., CVPR 2023), is

    L_BN = sum over BN layers l of  ||mu_l(x) - mu_l^BN||_2 + ||sigma_l(x) - sigma_l^BN||_2

with mu/sigma the per-channel mean / standard deviation of the layer's input over the batch
(biased variance; sigma = sqrt(var + eps) on both sides). Methods (``BNInversionConfig.method``):

* ``zeroq`` -- optimize the pixels directly (Adam), ZeroQ's "distilled data".
* ``genie`` -- Genie's generator path: a small generator (latent -> image; linear, two upsampling
  conv stages, tanh, a final BN with a learned affine, so model inputs need not be N(0, 1)) is
  trained jointly with its per-batch latent codes; the latent is multiplied by a learned embedding
  of the (soft) target, as in the GDFQ generator Genie builds on. Generator and latents have
  separate learning rates (``lr`` and ``GENIE_LATENT_LR_SCALE * lr``). Its "swing convolutions"
  reflect-pad and randomly shift their input during optimization, which removes the fixed spatial
  artifacts a generator trained on a single batch otherwise bakes in. The output is clamped like
  the pixel methods'.
* ``hast`` -- pixels plus a hard-sample focal-weighted cross-entropy (HAST, Li et al., CVPR 2023):
  the target term is weighted by (1 - p_target)^gamma, so the optimization keeps working on the
  images the model still finds hard instead of making every image trivially confident.
* ``dgh`` -- DGH (Dikstein et al., WACV 2025): (1) the BN statistics are those of the *whole*
  generated set: a batch's loss uses the set-level moments in which only its own contribution
  carries gradient (:class:`SetStatistics`); (2) an output distribution-stretching loss, the
  inverse mean logit range 1 / (mean_i(max_c z_ic - min_c z_ic) + eps) (the "min-max difference"
  form, as in Sony MCT's data generation). DGH's third ingredient, training-style augmentation,
  is ``jitter`` (random flip + circular shift; off by default).

The optimized objective divides L_BN by the number of BN layers (as ZeroQ's reference
implementation does), so the weights of the other terms do not depend on the model's depth; loss
histories and :func:`bn_statistics_loss` report L_BN itself (the sum).

Targets: ``single`` (one class per image, cross-entropy) or ``mixup`` (k classes per image with
Dirichlet or uniform weights, soft cross-entropy), dealt so every class is targeted equally often
and weighted by ``ce_weight`` in every method (default per label mode; ZeroQ's original objective
is ``ce_weight=0``). Prefer ``dgh`` for mixup labels. The measurements behind the defaults are in
``bench/results/bn_inversion_notes.md``.
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
from .config import (DEFAULT_CE_WEIGHT, DEFAULT_LR, LABEL_MODES, METHODS, WEIGHT_MODES,  # noqa: F401 (re-exported)
                     BNInversionConfig, check_target_options)
from .prompts import (BN_SHARD_STREAM, BN_TARGET_STREAM, DGH_INIT_STREAM, balanced_class_groups, image_seed,
                      stream_rng)

# genie: the latent codes move this many times faster than the generator (``lr``), as Genie keeps
# separate rates for the two; one fast rate for both saturated the generator's tanh.
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

_DEFAULTS = BNInversionConfig()


def make_targets(num_images: int, num_classes: int, label_mode: str = _DEFAULTS.label_mode,
                 mixup_k: int = _DEFAULTS.mixup_k, weights: str = _DEFAULTS.weights,
                 dirichlet_alpha: float = _DEFAULTS.dirichlet_alpha, seed: int = _DEFAULTS.seed
                 ) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Balanced target classes per image and their mixing weights (sum 1)."""
    check_target_options(label_mode, weights, dirichlet_alpha)
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
              clamp_range: "tuple[Sequence[float], Sequence[float]] | None" = None, **options) -> InversionResult:
    """Invert ``model``'s BatchNorm statistics into ``num_images`` images (see the module docs).

    The options are a :class:`~dfqkern.datagen.config.BNInversionConfig`: ``config``, with
    ``method``, ``label_mode`` and any other of its fields given as keywords (``iters=...``)
    replacing its values. ``lr`` is cosine-annealed over ``iters``.
    ``targets`` overrides the sampled targets with explicit (classes, weights) per image.
    ``clamp_range=(mean, std)`` keeps optimized pixels inside the normalized image of [0, 1] (so
    storing them as 8-bit PNG loses nothing to clamping). The model is used in eval mode; its
    parameters are not changed.
    """
    given = {k: v for k, v in (("method", method), ("label_mode", label_mode)) if v is not None}
    cfg = BNInversionConfig.build(config, **given, **options)
    shape = _check_set_shape(num_images, input_shape)
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else model_device(model)
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
            classes, mix = make_targets(num_images, num_classes, cfg.label_mode, cfg.mixup_k, cfg.weights,
                                        cfg.dirichlet_alpha, cfg.seed)
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
        bar = tqdm(total=cfg.iters * n_batches, desc=f"bn-inversion ({cfg.method})", unit="it",
                   disable=not progress, leave=False)
        with BNCapture(model) as cap, bar:
            if cfg.method == "dgh":
                images, history = _invert_set(model, cap, labels, bar, run)
            else:
                images, sums = [], [0.0] * cfg.iters
                for b in range(n_batches):
                    sl = slice(b * cfg.batch_size, min((b + 1) * cfg.batch_size, num_images))
                    x, hist = _invert_batch(model, cap, labels[sl].to(device), image_seed(cfg.seed, b), bar, run)
                    images.append(x)
                    sums = [a + h for a, h in zip(sums, hist)]
                images = torch.cat(images)
                history = [s / n_batches for s in sums]
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return InversionResult(images=images, labels=labels, classes=classes, weights=mix, bn_loss_history=history,
                           method=cfg.method, label_mode=cfg.label_mode)


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
        return weight * _target_loss(logits, target, focal)

    def clamp_(self, x: torch.Tensor) -> None:
        if self.bounds is not None:
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, self.bounds[1]), self.bounds[0]))


def _prior_loss(x: torch.Tensor, tv_weight: float) -> "torch.Tensor | float":
    if tv_weight <= 0:
        return 0.0
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return tv_weight * tv


def _invert_batch(model, cap, target, batch_seed, bar, run: _Run):
    """Optimize one batch independently (zeroq, hast: pixels; genie: generator + latents)."""
    cfg, n = run.cfg, target.shape[0]
    lr = cfg.effective_lr
    rng = torch.Generator().manual_seed(batch_seed)
    if cfg.method == "genie":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)  # generator init is reproducible per batch
            gen = GenieGenerator(cfg.latent_dim, run.shape, num_classes=target.shape[1]).to(run.device)
        z = torch.randn(n, cfg.latent_dim, generator=rng).to(run.device).requires_grad_(True)
        gen.set_swing(True, rng)
        params = [{"params": gen.parameters()}, {"params": [z], "lr": lr * GENIE_LATENT_LR_SCALE}]
        make = lambda: gen(z, target, run.bounds)  # noqa: E731
    else:
        x = torch.randn(n, *run.shape, generator=rng).to(run.device)
        run.clamp_(x)
        x.requires_grad_(True)
        params = [x]
        make = lambda: x  # noqa: E731
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9) if cfg.method == "genie" else (0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters)
    history = []
    for _ in range(cfg.iters):
        opt.zero_grad(set_to_none=True)
        img = make()
        logits = model(_augment(img, rng, cfg.jitter) if cfg.jitter else img)
        bn = cap.batch_loss()
        loss = bn / len(cap.layers) + _prior_loss(img, cfg.tv_weight) + run.target_loss(logits, target)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.method != "genie":
            run.clamp_(x)
        history.append(bn.item())
        bar.update(1)
    with torch.no_grad():
        if cfg.method == "genie":
            gen.set_swing(False)
            out = gen(z, target, run.bounds)  # generator BN in train mode: the same normalization the loss saw
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


def _invert_set(model, cap, labels, bar, run: _Run):
    """DGH: all images optimized against the statistics of the whole set (one sweep per iteration)."""
    cfg, n = run.cfg, labels.shape[0]
    rng = torch.Generator().manual_seed(image_seed(cfg.seed, DGH_INIT_STREAM))
    xs, opts, scheds, starts = [], [], [], list(range(0, n, cfg.batch_size))
    for start in starts:
        x = torch.randn(min(cfg.batch_size, n - start), *run.shape, generator=rng).to(run.device)
        run.clamp_(x)
        xs.append(x.requires_grad_(True))
        opts.append(torch.optim.Adam([xs[-1]], lr=cfg.effective_lr))
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], cfg.iters))
    moments = []
    with torch.no_grad():
        for x in xs:
            model(x)
            moments.append(cap.moments())
    stats = SetStatistics(cap, moments)
    history = []
    for _ in range(cfg.iters):
        for b, x in enumerate(xs):
            opts[b].zero_grad(set_to_none=True)
            logits = model(_augment(x, rng, cfg.jitter) if cfg.jitter else x)
            live = cap.moments()
            bn = stats.loss_with(b, live)
            # A batch moves only its share (len(x) / n) of the set-level moments, so the BN term's
            # gradient shrinks with the set size while the per-batch target terms do not: scale it
            # back by n / len(x) (unscaled, larger sets ended at a much higher BN loss).
            loss = (bn * (n / len(x)) / len(cap.layers) + _prior_loss(x, cfg.tv_weight)
                    + run.target_loss(logits, labels[starts[b]:starts[b] + len(x)].to(run.device)))
            if cfg.stretch_weight:
                loss = loss + cfg.stretch_weight * _stretch_loss(logits)
            loss.backward()
            opts[b].step()
            scheds[b].step()
            stats.update(b, live)
            run.clamp_(x)
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


def generate_bn_inversion_set(out_dir, model: nn.Module, config: "BNInversionConfig | None" = None, *,
                              num_images: int, input_shape: Sequence[int], mean: Sequence[float],
                              std: Sequence[float], shard_size: int = 256,
                              class_names: "Sequence[str] | None" = None, model_id: "str | None" = None,
                              device: "str | torch.device | None" = None, overwrite: bool = False,
                              progress: bool = True, rank: "int | None" = None, world_size: "int | None" = None,
                              **options):
    """Generate (or resume) a BN-inversion synthetic set in ``out_dir``; returns ``out_dir`` (a Path).

    The options are ``config`` with any :class:`~dfqkern.datagen.config.BNInversionConfig` field
    given as a keyword (``method="dgh", iters=200``) replacing its value; ``config.to_dict()`` is
    recorded in the manifest. Targets for the whole set are dealt up front (balanced over classes);
    each shard is then inverted as one unit (``invert_bn`` with the shard's targets and a per-shard
    seed), so a resumed run reproduces an uninterrupted one shard for shard. For ``dgh`` the
    set-level statistics are those of a shard: use ``shard_size >= num_images`` to optimize the
    entire set jointly. Images are stored de-normalized with ``mean``/``std`` (recorded in the
    manifest) and clamped to [0, 1]; pixels are kept inside that range during optimization.
    """
    from pathlib import Path

    from .diffusion import check_rank
    from .store import SyntheticSetWriter, fill_set, recorded_run, to_uint8, to_unit_range

    cfg = BNInversionConfig.build(config, **options)
    shape = _check_set_shape(num_images, input_shape)
    if shape[0] not in (1, 3):
        raise ValueError(f"input_shape must have 1 or 3 channels to be stored as PNG, got {shape[0]}")
    if len(mean) != shape[0] or len(std) != shape[0] or any(float(s) <= 0 for s in std):
        raise ValueError(f"mean and std need {shape[0]} values each (std > 0), got {list(mean)} and {list(std)}")
    rank, world_size = check_rank(rank, world_size)
    device = torch.device(device) if device is not None else model_device(model)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        num_classes = int(model(torch.zeros(2, *shape, device=device)).shape[1])
        model.train(was_training)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, the model has {num_classes} outputs")
    classes, mix = make_targets(num_images, num_classes, cfg.label_mode, cfg.mixup_k, cfg.weights,
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
            "label_type": "soft",
            "normalization": {"mean": record["mean"], "std": record["std"], "clamped": True}}
    writer = SyntheticSetWriter(out_dir, entries=entries, config=record, meta=meta, channels=shape[0],
                                shard_size=shard_size, overwrite=overwrite)

    def produce(indices):
        start, stop = indices[0], indices[-1] + 1  # whole shards: a contiguous range
        shard_cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, max(2, stop - start)),
                                        seed=shard_seed(start // shard_size))
        res = invert_bn(model, stop - start, config=shard_cfg, input_shape=shape, device=device, progress=progress,
                        targets=(classes[start:stop], mix[start:stop]), clamp_range=(mean, std))
        yield list(range(start, stop)), to_uint8(to_unit_range(res.images, mean, std))

    fill_set(writer, produce, rank=rank, world_size=world_size, progress=progress,
             desc=f"bn-inversion set ({cfg.method})", whole_shards=True)
    return Path(out_dir)
