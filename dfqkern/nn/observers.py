"""Range observers: turn tensors into quantization parameters (scale, zero point).

``minmax`` covers the observed range; ``mse`` searches clipping ratios of that range and keeps,
per channel, the one with the smallest Lp reconstruction error (:class:`dfqkern.config.ObserverSpec`
says how). All grid math goes through :mod:`dfqkern.kernels.reference`.
"""
from __future__ import annotations

import torch

from ..config import DEFAULT_OBSERVER, ObserverSpec
from ..kernels import reference as R


def channel_range(x: torch.Tensor, axis: int | None):
    """(min, max) per channel along ``axis``, or over the whole tensor (1-element) for ``axis=None``."""
    x = x.detach().float()
    if axis is None:
        return x.min().reshape(1), x.max().reshape(1)
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _lp_error(x, scale, zp, bits, axis, p):
    err = (R.fake_quant_forward(x, scale, zp, bits, axis) - x).abs().pow(p)
    return R.reduce_to_param(err, axis)


def mse_qparams(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None, lo=None, hi=None,
                spec: ObserverSpec = DEFAULT_OBSERVER):
    """Scale / zero point minimising ``sum |x - fq(x)|^lp`` over clip ratios ``linspace(1, min_clip, grid)``.

    ``lo``/``hi`` default to ``x``'s own range (pass the running range when ``x`` is a sample).
    """
    lp, grid, min_clip = spec.lp, spec.grid, spec.min_clip
    x = x.detach().float()
    if lo is None or hi is None:
        lo, hi = channel_range(x, axis)
    best_scale, best_zp = R.qparams_from_range(lo, hi, bits, symmetric)
    best_err = _lp_error(x, best_scale, best_zp, bits, axis, lp)
    for ratio in torch.linspace(1.0, min_clip, grid)[1:].tolist():
        scale, zp = R.qparams_from_range(lo * ratio, hi * ratio, bits, symmetric)
        err = _lp_error(x, scale, zp, bits, axis, lp)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def weight_qparams(w: torch.Tensor, bits: int, symmetric: bool, observer: str,
                   spec: ObserverSpec = DEFAULT_OBSERVER):
    """Per-output-channel (axis 0) parameters of a weight."""
    if observer == "minmax":
        lo, hi = channel_range(w, 0)
        return R.qparams_from_range(lo, hi, bits, symmetric)
    if observer == "mse":
        return mse_qparams(w, bits, symmetric, 0, spec=spec)
    raise ValueError(f"observer must be 'minmax' or 'mse', got {observer!r}")


class RangeTracker:
    """Accumulates a running per-tensor min/max and a bounded random sample of activation values."""

    def __init__(self, sample_size: int = 1 << 18, seed: int = 0):
        self.lo = self.hi = None
        self.samples: list[torch.Tensor] = []
        self.n_sampled = 0
        self.sample_size = sample_size
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("activations contain NaN or Inf; check the model and the calibration data")
        lo, hi = x.min().cpu(), x.max().cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        budget = self.sample_size // 4  # each batch contributes at most a quarter of the sample
        if x.numel() > budget:
            idx = torch.randint(0, x.numel(), (budget,), generator=self.gen)
            x = x.cpu()[idx]
        self.samples.append(x.cpu())
        self.n_sampled += x.numel()
        while self.n_sampled > self.sample_size and len(self.samples) > 1:  # drop the oldest
            self.n_sampled -= self.samples.pop(0).numel()

    def qparams(self, bits: int, symmetric: bool, observer: str, spec: ObserverSpec = DEFAULT_OBSERVER):
        if self.lo is None:
            raise RuntimeError("no activations were observed; run calibration data through the model first")
        if observer == "minmax":
            return R.qparams_from_range(self.lo.reshape(1), self.hi.reshape(1), bits, symmetric)
        if observer == "mse":
            return mse_qparams(torch.cat(self.samples), bits, symmetric, None, self.lo.reshape(1), self.hi.reshape(1),
                               spec)
        raise ValueError(f"observer must be 'minmax' or 'mse', got {observer!r}")
