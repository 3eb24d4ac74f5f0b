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
    """The term over one calibration set: ``model`` (the whole quantized model) and, row for row with the
    stored activations, its input ``images`` and float outputs ``fp_logits`` (checked to be class logits).

    :meth:`bind` a unit before calling ``term(idx, unit_out)`` (the KL for calibration rows ``idx`` when the
    unit outputs ``unit_out``): while bound, the model's parameters outside the unit stop requiring gradients
    (the rest of the network is fixed; only the path through ``unit_out`` is differentiated); :meth:`release`
    restores them.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, fp_logits: torch.Tensor | None):
        self.model, self.images, self.fp_logits = model, images, check_logits(fp_logits)
        self.unit: nn.Module | None = None
        self.frozen: list[torch.nn.Parameter] = []

    def bind(self, unit: nn.Module) -> "PredictionDifference":
        self.release()
        own = {id(p) for p in unit.parameters()}
        self.unit = unit
        self.frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in own]
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def __call__(self, idx: torch.Tensor, unit_out: torch.Tensor) -> torch.Tensor:
        if self.unit is None:
            raise RuntimeError("PredictionDifference: bind(unit) first")
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

    def release(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen, self.unit = [], None
