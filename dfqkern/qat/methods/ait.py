"""AIT (Choi et al., CVPR 2022, "It's all in the teacher"): KL-only student loss and gradient inundation.

The student learns from the teacher's output distribution alone (KL at ``QATConfig.temperature``;
no cross-entropy to the generator's labels, whatever ``ce_weight`` says). Gradient inundation: a
tiny lr barely moves a low-bit weight across a rounding boundary, so the quantized weights never
change. Before each student step, every quantized layer's weight gradient is multiplied by the
smallest factor (>= 1, at most ``max_factor``) with which a plain SGD step ``w - lr * factor * g``
changes the integer code of at least ``flip_ratio`` of the layer's weights.
Choices where the paper leaves room: the rule looks at the plain SGD step (momentum and weight
decay are applied on top by the optimizer, so an inundated gradient also lives on in the momentum);
``flip_ratio`` 1e-4 and ``max_factor`` 1000, the best of three measured (ResNet-20 W3A3, observer
start 65.4 %, 50 warm-up + 50 student steps, 1000 dev images: 1e-2 / 1e4 -> 8.8 %, 1e-3 / 100 -> 65.0 %,
1e-4 / 1000 -> 68.8 %; without inundation 71.5 %, so at that budget it costs accuracy);
``inundation=False`` turns it off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...nn import QuantLayer
from ..losses import kd_kl
from .base import Method


@dataclass(frozen=True)
class AITOptions:
    inundation: bool = True
    flip_ratio: float = 1e-4
    max_factor: float = 1000.0

    def __post_init__(self):
        if not 0.0 < self.flip_ratio <= 1.0:
            raise ValueError(f"flip_ratio must be in (0, 1], got {self.flip_ratio}")
        if not self.max_factor >= 1.0:
            raise ValueError(f"max_factor must be >= 1, got {self.max_factor}")


def flip_factors(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                 lr: float) -> torch.Tensor:
    """Per weight: the factor on ``lr * grad`` at which the SGD step moves ``w / scale`` past the next
    rounding boundary (+inf where the gradient is 0 or the code is already at the end it moves to)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = scale.detach().reshape(shape).float()
    v = w.detach().float() / s + zero_point.reshape(shape).float()  # position in code units
    code = torch.clamp(torch.round(v), 0, 2 ** bits - 1)  # clipped weights sit beyond their code's boundary
    step = -lr * grad.float() / s  # the update in code units
    up = step > 0
    dist = torch.where(up, code + 0.5 - v, v - (code - 0.5))  # to the code's boundary in the step's direction
    at_end = torch.where(up, code >= 2 ** bits - 1, code <= 0)
    factor = dist / step.abs()
    return torch.where((step == 0) | at_end, torch.full_like(factor, math.inf), factor)


def inundation_factor(factors: torch.Tensor, flip_ratio: float, max_factor: float) -> float:
    """The smallest factor (in [1, max_factor]) that flips ``flip_ratio`` of the weights."""
    k = max(1, math.ceil(flip_ratio * factors.numel()))
    need = torch.kthvalue(factors.flatten(), k).values.item()
    # a hair past the boundary, so round-half-to-even at the exact boundary cannot undo the flip
    return float(min(max_factor, max(1.0, need * (1 + 1e-4))))


class AIT(Method):
    name = "ait"
    summary = "KL-only student loss; gradient inundation so quantized weights cross rounding boundaries"
    Options = AITOptions

    def student_loss(self, sb, logits, features):
        kl = kd_kl(logits, sb.teacher.logits, self.cfg.temperature)
        return kl, {"kl": kl.item()}

    def before_student_step(self, student, lr):
        if not self.opts.inundation:
            return {}
        used = []
        for layer in student.modules():
            if not isinstance(layer, QuantLayer) or layer.is_packed or layer.weight.grad is None:
                continue
            wq = layer.w_quant
            f = flip_factors(layer.weight, layer.weight.grad, wq.scale, wq.zero_point, wq.bits, lr)
            factor = inundation_factor(f, self.opts.flip_ratio, self.opts.max_factor)
            layer.weight.grad.mul_(factor)
            used.append(factor)
        return {"inundation": sum(used) / len(used)} if used else {}
