"""Helpers for tests that build small float models (import by name: pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator, *, mean: float = 0.1, var: float = 0.5,
                 weight: "float | None" = None, bias: "float | None" = None) -> nn.Module:
    """Non-trivial BatchNorm2d statistics, in place, so that folding has something to get wrong: per layer
    ``running_mean = N(0, 1) * mean``, ``running_var = U(0, 1) + var`` and, for affine layers when given,
    ``weight = U(0, 1) + weight``, ``bias = N(0, 1) * bias``, drawn from ``generator`` in that order."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * mean)
            m.running_var.copy_(torch.rand(c, generator=generator) + var)
            if m.affine and weight is not None:
                m.weight.copy_(torch.rand(c, generator=generator) + weight)
            if m.affine and bias is not None:
                m.bias.copy_(torch.randn(c, generator=generator) * bias)
    return model
