"""The no-regression guard: reconstruction never hands back something worse than where it started.

Calibration holds out a slice of the calibration images (never used as training batches). Each unit's
output error on them is measured before and after its reconstruction; a unit that ends worse keeps
its starting point. The whole model's output error on them is measured at the observer start and at
the end; if the end is worse, every quantizer returns to the observer start.

What a quantizer learns lives in a few tensors and the rounding mode; :class:`QuantizerState`
records them and puts them back, so reverting needs no deep copy of the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import ActQuantizer, WeightQuantizer

MAX_HELDOUT = 256  # held-out images: at most this many ...
HELDOUT_FRACTION = 8  # ... and at most 1/8 of the set
MIN_IMAGES_FOR_HELDOUT = 16  # below this every image trains, and the guard measures on training images


def heldout_count(n: int) -> int:
    """How many of ``n`` calibration images are held out of the reconstruction batches."""
    return 0 if n < MIN_IMAGES_FOR_HELDOUT else min(MAX_HELDOUT, n // HELDOUT_FRACTION)


def heldout_split(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)``: its first :func:`heldout_count` entries are held out."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _clone(t):
    return None if t is None else t.detach().clone()


class QuantizerState:
    """A snapshot of every weight / activation quantizer in ``module``: scales, zero points, rounding."""

    def __init__(self, module: nn.Module):
        self.weights = [(q, q.scale.detach().clone(), q.zero_point.clone(), q.rounding, _clone(q.alpha),
                         _clone(q.base)) for q in module.modules() if isinstance(q, WeightQuantizer)]
        self.acts = [(q, q.scale.detach().clone(), q.zero_point.clone())
                     for q in module.modules() if isinstance(q, ActQuantizer)]

    @torch.no_grad()
    def restore(self) -> None:
        for q, scale, zp, rounding, alpha, base in self.weights:
            q.scale.copy_(scale)
            q.zero_point.copy_(zp)
            q.reset_rounding()
            if rounding != "nearest":
                q.alpha, q.base, q.rounding = nn.Parameter(alpha, requires_grad=False), base, rounding
        for q, scale, zp in self.acts:
            q.scale.copy_(scale)
            q.zero_point.copy_(zp)
