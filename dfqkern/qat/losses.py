"""The loss terms the QAT methods share: GDFQ's BN-statistics loss, soft cross-entropy, distillation KL."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bns_loss(bn_inputs, bn_layers) -> torch.Tensor:
    """GDFQ's BNS loss: mean over BN layers of MSE(batch mean, running mean) + MSE(batch var, running var).

    ``bn_inputs``: the input of each BN layer in this forward ([N, C, H, W], with graph); the batch
    statistics are per channel over (N, H, W), variance biased."""
    total = 0.0
    for x, bn in zip(bn_inputs, bn_layers):
        xf = x.float()
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        total = total + F.mse_loss(mean, bn.running_mean.float()) + F.mse_loss(var, bn.running_var.float())
    return total / max(1, len(bn_layers))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy to soft targets ([N, K] rows summing to 1); equals F.cross_entropy for one-hot rows."""
    per = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return per.mean() if reduction == "mean" else per


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          reduction: str = "mean") -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), per sample summed over classes, then averaged."""
    t = F.softmax(teacher_logits.float() / temperature, dim=1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    per = (t * (torch.log(t.clamp_min(1e-12)) - log_s)).sum(dim=1) * temperature ** 2
    return per.mean() if reduction == "mean" else per
