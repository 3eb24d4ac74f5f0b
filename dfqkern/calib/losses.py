"""Reconstruction objective: output MSE plus the AdaRound rounding regularizer with its beta schedule."""
from __future__ import annotations

import torch


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the channel dimension, averaged over everything else (QDrop's ``lp_loss``).

    The channel dimension is 1 for image tensors ``[B, C, H, W]`` / ``[B, C]`` and the last one for token
    tensors ``[B, N, C]``; summing over it keeps the scale the 0.01 rounding weight was tuned for.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    err = (pred.float() - target.float()).pow(2)
    channel_dim = -1 if pred.dim() == 3 else 1 if pred.dim() > 1 else 0
    return err.sum(dim=channel_dim).mean()


def beta_at(step: int, iters: int, warmup: float, start: float, end: float) -> float:
    """AdaRound's temperature: ``start`` during the warm-up, then linear decay to ``end`` at the last step."""
    begin = warmup * iters
    if step < begin:
        return start
    rel = (step - begin) / max(iters - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - rel)


def rounding_active(step: int, iters: int, warmup: float) -> bool:
    """The regularizer joins the loss only after the warm-up (the first ``warmup`` share of the steps)."""
    return step >= warmup * iters


def rounding_loss(weight_quantizers) -> torch.Tensor | None:
    """Sum of the regularizers the soft AdaRound forwards just computed (``None`` when none did)."""
    regs = [q.last_reg for q in weight_quantizers if q.rounding == "soft" and q.last_reg is not None]
    return torch.stack(regs).sum() if regs else None
