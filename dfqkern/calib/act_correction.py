"""DFQ-ViT's activation correction (Tong et al. 2025): after calibration, align the quantized model's
intermediate activations with the float model's, channel by channel.

Reading of the paper's "activation correction matrix": a diagonal matrix plus a shift per corrected
layer, ``y' = a * y_q + b``, fitted on the calibration images so that every output channel of the
quantized layer has the mean and standard deviation of the same layer's output in the float model
(quantization off): ``a_c = sigma_f,c / sigma_q,c`` (clamped to ``[1 / SCALE_LIMIT, SCALE_LIMIT]``; 1
where ``sigma_q,c`` is ~0), ``b_c = mu_f,c - a_c * mu_q,c``, statistics over images and tokens (or
positions). ``scale=False`` fits the shift alone (``a = 1``: empirical bias correction).

- Layers are fitted in call order, each on the outputs of the model with the layers before it
  already corrected; the float statistics are measured once, before any correction.
- The correction is folded into the layer, so the model keeps its architecture, checkpoint format and
  packed kernels: the weight quantizer is per output channel, so weight row ``c`` and its scale ``s_c``
  both times ``a_c`` leave the integer codes unchanged, and ``bias' = a * bias + b``. (The float
  weight moves too, so afterwards the model with quantization disabled is no longer the float model.)
- Default layers: every quantized layer with a bias (attention projections, MLP Linears, the patch
  embedding, the head); ``layers`` restricts it by name. A layer without a bias, or one that did not
  run on the data, is skipped and listed in the report.

Run after :func:`~dfqkern.quantize.calibrate_activations` (or reconstruction), before packing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..nn import ActQuantizer, QuantConv2d, QuantLayer
from ..nn.observe import batches_of
from .capture import quantization_disabled, run_with_output_hooks

MODES = ("none", "shift", "affine")  # the CLI's --act-correction: off, b only (a = 1), a and b
SCALE_LIMIT = 4.0  # a correction that would rescale a channel by more is clamped (too few images to trust it)
SIGMA_FLOOR = 1e-8


@dataclass
class ActCorrectionReport:
    """``corrected``: ``{layer: {"scale_min", "scale_max", "max_shift"}}``; ``skipped``: ``{layer: reason}``."""

    scale: bool
    corrected: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "corrected": len(self.corrected), "skipped": dict(self.skipped)}


def _channels_last(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``[rows, C]`` in float64: conv outputs ``[B, C, H, W]`` by position, Linear outputs ``[..., C]`` by token."""
    if isinstance(layer, QuantConv2d):
        y = y.movedim(1, -1)
    return y.detach().double().reshape(-1, y.shape[-1])


class _Moments:
    """Per-channel sum, sum of squares and count of a layer's outputs over the batches."""

    def __init__(self):
        self.s1 = self.s2 = None
        self.n = 0

    def add(self, y: torch.Tensor) -> None:
        s1, s2 = y.sum(0), (y * y).sum(0)
        self.s1, self.s2 = (s1, s2) if self.s1 is None else (self.s1 + s1, self.s2 + s2)
        self.n += y.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def _moments(model: nn.Module, layers: dict[str, nn.Module], batches, device) -> dict[str, _Moments]:
    """Output moments of ``layers`` over ``batches`` (layers that never ran are absent)."""
    acc: dict[str, _Moments] = {}
    run_with_output_hooks(model, {m: lambda mod, out, name=name: acc.setdefault(name, _Moments()).add(
        _channels_last(out, mod)) for name, m in layers.items()}, batches, device)
    return acc


@torch.no_grad()
def _call_order(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: order.append(name) if name not in order
                                       else None) for name, m in layers.items()]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def correction_for(float_moments: _Moments, quant_moments: _Moments, scale: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` per channel (float64) mapping the quantized moments onto the float ones."""
    mu_f, sd_f = float_moments.mean_std()
    mu_q, sd_q = quant_moments.mean_std()
    a = torch.ones_like(mu_q)
    if scale:
        a = torch.where(sd_q > SIGMA_FLOOR, sd_f / sd_q.clamp_min(SIGMA_FLOOR), a).clamp(1 / SCALE_LIMIT, SCALE_LIMIT)
    return a, mu_f - a * mu_q


@torch.no_grad()
def fold_correction(layer: QuantLayer, a: torch.Tensor, b: torch.Tensor) -> None:
    """``y -> a * y + b`` folded into ``layer``: weight rows and their per-channel scales times ``a``
    (the integer codes stay), ``bias -> a * bias + b``."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(a.to(layer.weight).reshape(shape))
    layer.w_quant.scale.mul_(a.to(layer.w_quant.scale))
    layer.bias.copy_((a * layer.bias.double() + b).to(layer.bias))


def correct_activations(qmodel: nn.Module, data, *, layers: "Sequence[str] | None" = None, scale: bool = True,
                        batch_size: int = 32, device=None) -> ActCorrectionReport:
    """Fit and fold DFQ-ViT's activation correction into ``qmodel`` in place (see the module docs);
    returns the report.

    ``data``: calibration inputs (a tensor or batches; synthetic images for a data-free run).
    ``layers``: names of the quantized layers to correct (default: every one with a bias)."""
    all_layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    if not all_layers:
        raise ValueError("qmodel has no quantized layers; run quantize_model first")
    if layers is not None:
        unknown = sorted(set(layers) - set(all_layers))
        if unknown:
            raise ValueError(f"layers: {unknown} are not quantized layers of qmodel (it has e.g. "
                             f"{sorted(all_layers)[:5]})")
        all_layers = {n: all_layers[n] for n in layers}
    if any(m.is_packed for m in all_layers.values()):
        raise ValueError("qmodel is packed; correct the activations before pack_model")
    uncalibrated = [n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and not bool(m.calibrated)]
    if uncalibrated:
        raise ValueError(f"activation quantizer {uncalibrated[0]!r} is not calibrated; run calibrate_activations "
                         f"first")
    report = ActCorrectionReport(scale)
    targets = {}
    for name, m in all_layers.items():
        if m.bias is None:
            report.skipped[name] = "has no bias"
        else:
            targets[name] = m
    batches = batches_of(data, batch_size)
    device = device or next(qmodel.parameters()).device
    was_training = qmodel.training
    qmodel.eval()
    try:
        with quantization_disabled(qmodel):
            reference = _moments(qmodel, targets, batches, device)
        for name in _call_order(qmodel, targets, batches[0].to(device)):
            quant = _moments(qmodel, {name: targets[name]}, batches, device)[name]
            a, b = correction_for(reference[name], quant, scale)
            fold_correction(targets[name], a, b)
            report.corrected[name] = {"scale_min": float(a.min()), "scale_max": float(a.max()),
                                      "max_shift": float(b.abs().max())}
        for name in targets:
            if name not in report.corrected:
                report.skipped[name] = "did not run on the data"
    finally:
        qmodel.train(was_training)
    return report
