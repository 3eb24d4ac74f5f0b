"""Synthetic images for vision transformers, which have no BatchNorm statistics to invert.

PSAQ-ViT (Li et al., ECCV 2022) observes that a trained ViT's self-attention makes the patch tokens
of a real image diverse: the cosine similarities between the tokens of an attention module's output
spread over a wide range, while for noise they bunch together. So images are optimized from Gaussian
noise to maximise the differential entropy of that similarity distribution, plus the target-class
cross-entropy. For one image and one attention module with output tokens ``u_1..u_N``:

    s_ij = <u_i, u_j> / (|u_i| |u_j|)                     for the pairs i < j
    p(t) = 1 / (M h sqrt(2 pi)) * sum_ij exp(-(t - s_ij)^2 / (2 h^2))   (Gaussian KDE, M pairs)
    H    = -integral over [-1, 1] of p(t) log p(t) dt       (Riemann sum on a grid)

and the loss is ``-patch_weight * mean over modules and images of H + ce_weight * CE + priors``.
Methods (``BNInversionConfig.method``):

* ``psaq`` -- the above, pixels optimized with Adam (cosine-annealed ``lr``).
* ``dfq-vit`` -- DFQ-ViT (Tong et al. 2025)'s easy-to-hard synthesis on the same engine: the target
  term is weighted per image by ``(1 - p_target)^gamma(t)`` with ``gamma`` ramped linearly from 0 at
  the first iteration to ``focal_gamma`` at the last, so every image is first pulled toward an easy,
  confidently classified one and the effort then moves to the images the model still finds hard.

Choices where the papers leave room (each switchable where it says so):

* tokens: every token of the sequence, class token included (no model-specific prefix count).
* features: each self-attention module's output (``patch_source="attention"``: ``nn.MultiheadAttention``
  or a module with a fused ``qkv`` Linear, i.e. timm / Swin attention) or its parent block's output
  (``"block"``); windowed attention (Swin) gets one entropy per window, averaged per image.
* pairs: i < j only (the diagonal is always 1); above ``KDE_MAX_PAIRS`` pairs a fixed random subset.
* KDE: Gaussian kernel of fixed bandwidth ``kde_bandwidth`` (default 0.05), density on a grid of
  ``KDE_GRID_POINTS`` points over [-1, 1]; density floored at ``KDE_FLOOR`` inside the log.
* aggregation: mean over modules (the weight does not depend on depth) and over images.
* priors: ``tv_weight`` (total variation; 2 by default, ``DEFAULT_TV_WEIGHT``: without it the images are far
  rougher than real ones and the learned rounding overfits that), ``l2_weight`` (mean squared pixel, off).
* PSAQ-ViT v2's adaptive teacher-student loop is not implemented.

The sets are made by :func:`~dfqkern.datagen.bn_inversion.generate_bn_inversion_set` (same targets,
shards, resume and manifest as the BN methods); this module holds the loss and the per-batch loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PATCH_SOURCES, VIT_METHODS, BNInversionConfig, check_choice

KDE_GRID_POINTS = 64  # grid spacing 2/63 ~ 0.6 of the default bandwidth: the Riemann sum is accurate to ~1e-3
KDE_MAX_PAIRS = 4096  # a 224-px ViT-B/16 has 19306 pairs per image; the subset bounds the KDE's memory
KDE_FLOOR = 1e-12


# ----------------------------------------------------------------------------- the entropy

def patch_similarity_entropy(tokens: torch.Tensor, bandwidth: float = BNInversionConfig.default("kde_bandwidth"),
                             grid_points: int = KDE_GRID_POINTS, max_pairs: int = KDE_MAX_PAIRS) -> torch.Tensor:
    """Differential entropy of the Gaussian KDE of the pairwise cosine similarities of ``tokens``
    (``[B, N, D]``, or ``[B, G, N, D]`` with one entropy per group averaged), one value per image
    (``[B]``, float32, differentiable). See the module docs for the formula."""
    t = tokens.float()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[-2] < 2:
        raise ValueError(f"tokens must be [B, N, D] or [B, G, N, D] with N >= 2 tokens, got {tuple(tokens.shape)}")
    if not bandwidth > 0 or grid_points < 2:
        raise ValueError(f"bandwidth must be > 0 and grid_points >= 2, got {bandwidth!r}, {grid_points!r}")
    n = t.shape[-2]
    f = F.normalize(t, dim=-1)
    sim = f @ f.transpose(-1, -2)  # [B, G, N, N]
    i, j = torch.triu_indices(n, n, 1, device=t.device)
    if len(i) > max_pairs:  # fixed per sequence length: the same pairs every iteration
        keep = torch.randperm(len(i), generator=torch.Generator().manual_seed(n))[:max_pairs].to(t.device)
        i, j = i[keep], j[keep]
    s = sim[..., i, j]  # [B, G, M]
    grid = torch.linspace(-1.0, 1.0, grid_points, device=t.device)
    z = (grid[:, None] - s[..., None, :]) / bandwidth  # [B, G, P, M]
    density = torch.exp(-0.5 * z * z).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))
    step = 2.0 / (grid_points - 1)
    entropy = -(density * torch.log(density.clamp_min(KDE_FLOOR))).sum(-1) * step  # [B, G]
    return entropy.mean(-1)


# ----------------------------------------------------------------------------- where the tokens come from

def attention_modules(model: nn.Module, needed_by: str = "method 'psaq'") -> list[tuple[str, nn.Module]]:
    """The self-attention modules (``nn.MultiheadAttention`` or a module with a fused ``qkv`` Linear:
    timm ViT / DeiT / Swin attention), outermost only, in module order; a ValueError saying what
    needed them (``needed_by``) when there are none."""
    found = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if isinstance(m, nn.MultiheadAttention) or isinstance(getattr(m, "qkv", None), nn.Linear):
            found.append((name, m))
    if not found:
        raise ValueError(f"{needed_by} needs a vision transformer: model ({type(model).__name__}) has no "
                         f"self-attention module (nn.MultiheadAttention or a module with a fused qkv Linear); for a "
                         f"CNN with BatchNorm use the BN methods (zeroq, genie, hast, dgh) and filters (energy, bn)")
    return found


def _batch_first(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return bool(module.batch_first)
    mhas = [m for m in module.children() if isinstance(m, nn.MultiheadAttention)]  # a block holding one
    return bool(mhas[0].batch_first) if mhas else True


class PatchCapture:
    """Forward hooks keeping the output tokens of each attention module (``source="attention"``) or
    of its parent block (``"block"``) during the last forward, with their graph."""

    def __init__(self, model: nn.Module, source: str = "attention", method: str = "psaq"):
        check_choice("patch_source", source, PATCH_SOURCES)
        attn = attention_modules(model, f"method {method!r}")
        if source == "block":
            mods = dict(model.named_modules())
            parents = [name.rpartition(".")[0] for name, _ in attn]
            if any(p == "" for p in parents):
                raise ValueError("patch_source 'block': the attention module is the model itself (no block around it)")
            attn = list(dict((p, mods[p]) for p in parents).items())
        self.names = [name for name, _ in attn]
        self.modules = [m for _, m in attn]
        self.outputs: list = [None] * len(attn)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, i: int):
        def hook(module, args, out):
            self.outputs[i] = out
        return hook

    def clear(self) -> None:
        self.outputs = [None] * len(self.modules)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PatchCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def tokens(self, batch: int) -> list[torch.Tensor]:
        """Per module ``[batch, G, N, D]`` (G windows, 1 for global attention) of the last forward."""
        missing = [n for n, o in zip(self.names, self.outputs) if o is None]
        if missing:
            raise RuntimeError(f"module(s) {missing} did not run in the forward (a fused fast path that bypasses "
                               f"them runs only without gradients; run with an input that requires grad)")
        out = []
        for m, o in zip(self.modules, self.outputs):
            o = o[0] if isinstance(o, (tuple, list)) else o
            if not _batch_first(m):
                o = o.transpose(0, 1)
            if o.dim() == 4:  # [B, H, W, C] (Swin blocks)
                o = o.flatten(1, 2)
            if o.dim() != 3 or o.shape[0] % batch:
                raise RuntimeError(f"cannot read tokens [batch, N, D] from an output of shape {tuple(o.shape)}")
            out.append(o.reshape(batch, o.shape[0] // batch, *o.shape[1:]))  # windows are batch-major
        return out

    def entropy(self, batch: int, bandwidth: float) -> torch.Tensor:
        """Patch-similarity entropy per image ``[batch]``, mean over the captured modules."""
        ents = [patch_similarity_entropy(t, bandwidth) for t in self.tokens(batch)]
        return torch.stack(ents).mean(0)


@torch.no_grad()
def image_patch_entropy(model: nn.Module, x: torch.Tensor, *, source: str = "attention",
                        bandwidth: float = BNInversionConfig.default("kde_bandwidth")) -> torch.Tensor:
    """Patch-similarity entropy per image of the model input ``x`` (float32, CPU), in eval mode. The
    input is marked as requiring grad so a fused encoder fast path does not bypass the hooks."""
    was_training = model.training
    model.eval()
    try:
        with PatchCapture(model, source, "patchsim") as cap, torch.enable_grad():
            model(x.detach().requires_grad_(True))
            return cap.entropy(x.shape[0], bandwidth).detach().cpu()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the optimization

def difficulty_gamma(cfg: BNInversionConfig, iteration: int) -> "float | None":
    """The focal exponent of the target term at ``iteration``: None (plain cross-entropy) for psaq;
    for dfq-vit ``focal_gamma * iteration / (iters - 1)``, easy (0) to hard (``focal_gamma``)."""
    if cfg.method != "dfq-vit":
        return None
    return cfg.focal_gamma * iteration / max(1, cfg.iters - 1)


def invert_vit_batch(model: nn.Module, cap: PatchCapture, target: torch.Tensor, batch_seed: int, bar, run):
    """Optimize one batch of pixels (psaq, dfq-vit) from N(0, 1) noise; returns (images on the CPU,
    mean patch-similarity entropy per iteration). ``run`` is bn_inversion's ``_Run`` (options,
    pixel bounds, augmentation, precision)."""
    from .bn_inversion import prior_loss, target_loss
    from .resources import grad_scaler

    cfg, n = run.cfg, target.shape[0]
    if cfg.method not in VIT_METHODS:
        raise ValueError(f"invert_vit_batch is for the methods {list(VIT_METHODS)}, got {cfg.method!r}")
    rng = torch.Generator().manual_seed(batch_seed)
    x = torch.randn(n, *run.shape, generator=rng).to(run.device)
    run.clamp_(x)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.effective_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters)
    scaler = grad_scaler(cfg.precision, run.device)
    ce = cfg.effective_ce_weight
    history = []
    for it in range(cfg.iters):
        opt.zero_grad(set_to_none=True)
        cap.clear()
        logits = run.forward(model, run.model_input(x, rng))
        ent = cap.entropy(n, cfg.kde_bandwidth)
        loss = -cfg.patch_weight * ent.mean() + prior_loss(x, cfg, 1)
        if ce:
            loss = loss + ce * target_loss(logits, target, difficulty_gamma(cfg, it))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        run.clamp_(x)
        history.append(float(ent.detach().mean()))
        bar.update(1)
    return x.detach().float().cpu(), history
