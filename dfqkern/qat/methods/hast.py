"""HAST (Li et al., CVPR 2023, "Hard sample matters a lot in zero-shot quantization").

Hard-sample synthesis: the generator's target cross-entropy is focal-weighted,
``mean_i (1 - p_i)^focal_gamma * (-log p_i)`` with ``p_i`` the teacher's probability of image i's
target, so easy images stop pulling the generator and hard ones keep being made. Sample-difficulty
promotion: the student's per-image distillation loss is weighted by ``(1 + d_i) / mean_j (1 + d_j)``
with ``d_i = 1 - p_i`` the image's difficulty for the teacher. Feature alignment:
``align_weight`` x mean over feature points of ``||f_s - f_t||^2 / ||f_t||^2`` (block outputs).
Choices where the paper leaves room: the promotion weight's form (``promotion=False`` turns it off)
and the relative feature error; the targets are soft, so the focal weight uses ``p_i = sum_k t_ik p_ik``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import kd_kl, soft_cross_entropy
from .base import Method


@dataclass(frozen=True)
class HASTOptions:
    focal_gamma: float = 2.0
    promotion: bool = True
    align_weight: float = 1.0

    def __post_init__(self):
        if not self.focal_gamma >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not self.align_weight >= 0:
            raise ValueError(f"align_weight must be >= 0, got {self.align_weight}")


def target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (F.softmax(logits.float(), dim=1) * targets).sum(dim=1)


def focal_target_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    p = target_probability(logits, targets)
    return ((1 - p).pow(gamma) * soft_cross_entropy(logits, targets, reduction="none")).mean()


def promotion_weights(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    w = 1 + (1 - target_probability(teacher_logits, targets))
    return w / w.mean()


def feature_alignment(student_feats, teacher_feats) -> torch.Tensor:
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(terms).mean()


class HAST(Method):
    name = "hast"
    summary = "focal hard-sample synthesis, difficulty-weighted distillation, feature alignment"
    Options = HASTOptions
    uses_features = True

    def target_loss(self, logits, batch):
        return focal_target_loss(logits, batch.targets, self.opts.focal_gamma)

    def student_loss(self, sb, logits, features):
        per = kd_kl(logits, sb.teacher.logits, self.cfg.temperature, reduction="none")
        ce = soft_cross_entropy(logits, sb.targets, reduction="none")
        w = promotion_weights(sb.teacher.logits, sb.targets) if self.opts.promotion else torch.ones_like(per)
        loss = (w * (self.cfg.kd_weight * per + self.cfg.ce_weight * ce)).mean()
        logs = {"kl": per.mean().item(), "s_ce": ce.mean().item()}
        if self.opts.align_weight > 0:
            align = feature_alignment(features, sb.teacher.features)
            loss = loss + self.opts.align_weight * align
            logs["align"] = align.item()
        return loss, logs
