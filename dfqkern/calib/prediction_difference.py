"""PD-Quant's prediction-difference term for one reconstruction unit.

A unit's output MSE treats every output element alike; what matters is the prediction. PD-Quant
(Liu et al., CVPR 2023) adds the KL divergence from the float model's class probabilities to those of
the network whose unit under training is quantized and everything else float. The unit's quantized
output is fed into the float model in place of the unit's own output, so the gradient reaches the
unit through the float rest of the network. Choice here: the rest of the network is dfqkern's
quantized model run with quantization off (BatchNorm already folded, the same function as the
float model), temperature 1, and the term is added to the MSE with ``CalibConfig.pd_weight``
rather than replacing it (PD-Quant keeps a feature term as a regularizer too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .capture import quantization_disabled


def check_logits(fp_logits: torch.Tensor | None) -> torch.Tensor:
    """The float model's outputs on the calibration images, which must be class logits ``[N, classes]``."""
    if fp_logits is None or fp_logits.dim() != 2:
        shape = None if fp_logits is None else tuple(fp_logits.shape)
        raise ValueError(f"pd_weight > 0 needs a model that returns one logits tensor [batch, classes]; "
                         f"its output is {'not a tensor' if shape is None else f'of shape {shape}'}")
    return fp_logits


def prediction_kl(logits: torch.Tensor, fp_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(fp_logits) || softmax(logits)), averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(fp_logits.float(), dim=1),
                    log_target=True, reduction="batchmean")


class PredictionDifference:
    """``term(idx, unit_out)``: the KL for calibration rows ``idx`` when ``unit`` outputs ``unit_out``.

    While it exists, the model's parameters outside ``unit`` stop requiring gradients (the rest of the
    network is fixed; only the path through ``unit_out`` is differentiated); :meth:`close` restores them.
    """

    def __init__(self, model: nn.Module, unit: nn.Module, images: torch.Tensor, fp_logits: torch.Tensor):
        self.model, self.unit = model, unit
        self.images, self.fp_logits = images, check_logits(fp_logits)
        own = {id(p) for p in unit.parameters()}
        self.frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
        for p in self.frozen:
            p.requires_grad_(False)

    def __call__(self, idx: torch.Tensor, unit_out: torch.Tensor) -> torch.Tensor:
        device = unit_out.device
        own_forward = self.unit.__dict__.get("forward")
        self.unit.forward = lambda *args, **kwargs: unit_out  # an instance attribute shadows the class's
        try:
            with quantization_disabled(self.model):
                logits = self.model(self.images[idx].to(device))
        finally:
            if own_forward is None:
                del self.unit.forward
            else:
                self.unit.forward = own_forward
        return prediction_kl(logits, self.fp_logits[idx].to(device))

    def close(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []
