"""AKT (Hong et al., ACM SAC 2025, "Advanced knowledge transfer"): spatial and channel attention distillation.

Student loss ``alpha * L_RFD + (1 - alpha) * KL``, with the refined feature distillation
``L_RFD = sum over feature points of mean (A_sp(s) - A_sp(t))^2 + mean (A_ch(s) - A_ch(t))^2``:
``A_sp`` the spatial map sum_c f^2 L2-normalized per image, ``A_ch`` the softmax over channels of
mean_hw f^2 (:mod:`dfqkern.qat.features`). Feature points: block outputs. No cross-entropy.
Choices where the paper leaves room: the exact normalizations above, and ``rfd_scale`` (1000, as in
attention transfer) multiplying L_RFD, whose raw value is tiny beside the KL; ``spatial`` /
``channel`` switch either map off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..features import channel_attention, spatial_attention
from ..losses import kd_kl
from .base import Method


@dataclass(frozen=True)
class AKTOptions:
    alpha: float = 0.5
    spatial: bool = True
    channel: bool = True
    rfd_scale: float = 1000.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not (self.spatial or self.channel) and self.alpha > 0:
            raise ValueError("AKT needs spatial or channel attention (or alpha=0)")
        if not self.rfd_scale > 0:
            raise ValueError(f"rfd_scale must be > 0, got {self.rfd_scale}")


def refined_feature_distillation(student_feats, teacher_feats, spatial: bool = True,
                                 channel: bool = True) -> torch.Tensor:
    total = torch.zeros(())
    for s, t in zip(student_feats, teacher_feats):
        if spatial:
            total = total + (spatial_attention(s) - spatial_attention(t)).pow(2).mean()
        if channel:
            total = total + (channel_attention(s) - channel_attention(t)).pow(2).mean()
    return total


class AKT(Method):
    name = "akt"
    summary = "spatial + channel attention distillation of block features, with KL"
    Options = AKTOptions
    uses_features = True

    def student_loss(self, sb, logits, features):
        kl = kd_kl(logits, sb.teacher.logits, self.cfg.temperature)
        rfd = self.opts.rfd_scale * refined_feature_distillation(features, sb.teacher.features, self.opts.spatial,
                                                                 self.opts.channel)
        a = self.opts.alpha
        return a * rfd + (1 - a) * kl, {"kl": kl.item(), "rfd": rfd.item()}
