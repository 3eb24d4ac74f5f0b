"""The student: a calibrated fake-quant model made trainable for QAT, and its parameter groups.

BatchNorm: ``quantize_model`` folds every BatchNorm that follows a conv into it, so the student has
no BN statistics of its own to update: the folded weights and biases are trained directly (frozen-BN
QAT, and the packed format stores exactly these). A BatchNorm left unfolded is kept in eval mode,
its running statistics frozen, because batches of generated images would pull them towards the
generator's statistics; its affine parameters train with the weights.

A PTQ start is accepted as it is: observer ranges, or a reconstruction result (AdaRound / BRECQ /
QDrop / Genie-M). Learned rounding is turned into plain weights on the chosen grid point,
``w = scale * (code - zero_point)``, so round-to-nearest reproduces every code and the model
computes exactly what it computed before; QAT then moves those weights with the STE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import ActQuantizer, QuantLayer


@dataclass
class StudentParams:
    weights: list  # quantized layers' weights and biases, and any other float parameter (SGD)
    act_scales: list  # LSQ activation step sizes (Adam)
    weight_scales: list  # per-channel weight scales (Adam, lr relative to each one's mean)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def rounding_to_weights(layer: QuantLayer) -> None:
    """Replace learned (AdaRound) rounding by weights on the grid point it chose; the codes are unchanged."""
    wq = layer.w_quant
    if wq.rounding == "nearest":
        return
    codes = wq.codes(layer.weight).float()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = wq.scale.detach().reshape(shape) * (codes - wq.zero_point.reshape(shape).float())
    layer.weight.copy_(w.to(layer.weight.dtype))
    wq.reset_rounding()


def check_student(student: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The student's quantized layers; a clear error for a model QAT cannot train."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    layers = quant_layers(student)
    if not layers:
        raise ValueError("student has no quantized layers: make it with dfqkern.quantize_model(fp_model, QuantConfig)")
    packed = [n for n, m in layers if m.is_packed]
    if packed:
        raise ValueError(f"student layer {packed[0]!r} is packed (inference-only); fine-tune the fake-quant model "
                         f"before pack_model / save_quantized")
    uncalibrated = [n for n, m in student.named_modules()
                    if isinstance(m, ActQuantizer) and not m.per_token and not bool(m.calibrated)]
    if uncalibrated:
        raise ValueError(f"student activation quantizer {uncalibrated[0]!r} is not calibrated: start from "
                         f"dfqkern.calibrate_activations (observer) or dfqkern.calibrate (e.g. QDrop) first")
    return layers


def prepare_student(student: nn.Module) -> StudentParams:
    """Make ``student`` trainable in place (eval mode: frozen BN statistics, no QDrop) and group its parameters."""
    layers = check_student(student)
    for _, layer in layers:
        rounding_to_weights(layer)
    student.eval()
    act_scales = [m.scale for m in student.modules() if type(m) is ActQuantizer and not m.per_token]
    weight_scales = [layer.w_quant.scale for _, layer in layers]
    quant_ids = {id(p) for p in act_scales + weight_scales}
    weights = [p for p in student.parameters() if id(p) not in quant_ids]
    for p in weights + act_scales + weight_scales:
        p.requires_grad_(True)
    for m in student.modules():
        if isinstance(m, ActQuantizer):
            m.drop_prob = 0.0
    return StudentParams(weights, act_scales, weight_scales)


def freeze_student(student: nn.Module) -> None:
    """After training: no parameter requires grad (packing and saving expect a frozen model)."""
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()


@torch.no_grad()
def keep_scales_positive(params: StudentParams, floor: float = 1e-8) -> None:
    for s in params.act_scales + params.weight_scales:
        s.clamp_(min=floor)
