"""A few images through the packed model (and the float reference): per-layer output SQNR, the range
each quantized layer's input actually took, and how far the model outputs moved.

Outputs are compared inside the running models, so a layer's SQNR includes the error of every
quantized layer before it (what the network accumulates, not the layer alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .sqnr import power_db


@dataclass
class ProbeResult:
    images: int
    output_sqnr_db: dict[str, float] = field(default_factory=dict)  # empty without a float reference
    input_range: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (min, max) seen
    logits_sqnr_db: float | None = None
    top1_agreement: float | None = None  # % of images whose argmax the quantization left unchanged


class _Power:
    """Running sums of signal and noise power (batches need not fit together in memory)."""

    def __init__(self):
        self.signal = self.noise = 0.0
        self.compared = False

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        self.compared = True
        ref, test = ref.detach().double(), test.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((ref - test).pow(2).sum())

    def db(self) -> float:
        return power_db(self.signal, self.noise)


@torch.no_grad()
def probe(packed: nn.Module, images: torch.Tensor, reference: nn.Module | None = None,
          counterparts: dict[str, nn.Module] | None = None, batch_size: int = 8) -> ProbeResult:
    """Run ``images`` (model-input space, CPU) through ``packed`` and, if given, the folded float
    ``reference`` (see :func:`~dfqkern.report.sqnr.folded_reference`), hooking the quantized layers
    and their float ``counterparts`` (default: the modules of the same name in ``reference``)."""
    from ..quantize import quant_layers

    layers = dict(quant_layers(packed))
    if reference is not None and counterparts is None:
        counterparts = {name: reference.get_submodule(name) for name in layers}
    counterparts = counterparts if reference is not None else {}
    ranges: dict[str, list[float]] = {}
    power = {name: _Power() for name in counterparts}
    logits_power, agree = _Power(), 0
    ref_out: dict[str, torch.Tensor] = {}
    handles = []

    def keep_range(name):
        def hook(_module, args):
            x = args[0]
            lo, hi = float(x.min()), float(x.max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return hook

    def keep_output(name):
        def hook(_module, _args, out):
            ref_out[name] = out.detach().clone()  # clone: an in-place ReLU after the layer would change it
        return hook

    def compare_output(name):
        def hook(_module, _args, out):
            if name in ref_out:  # a float module the float forward did not call has nothing to compare
                power[name].add(ref_out[name], out)
        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(keep_range(name)))
            if name in counterparts:
                handles.append(counterparts[name].register_forward_hook(keep_output(name)))
                handles.append(layer.register_forward_hook(compare_output(name)))
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            ref_logits = reference(x) if reference is not None else None
            logits = packed(x)
            if ref_logits is not None:
                logits_power.add(ref_logits, logits)
                agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
            ref_out.clear()
    finally:
        for h in handles:
            h.remove()
    result = ProbeResult(images=len(images), input_range={k: (v[0], v[1]) for k, v in ranges.items()})
    if reference is not None and len(images):
        result.output_sqnr_db = {name: p.db() for name, p in power.items() if p.compared}
        result.logits_sqnr_db = logits_power.db()
        result.top1_agreement = 100.0 * agree / len(images)
    return result
