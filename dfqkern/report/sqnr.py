"""Per-layer weight SQNR: each packed layer's dequantized weight against the float model's weight.

The quantizer folded BatchNorm into the preceding convolutions before quantizing, so the reference
is the float model folded the same way (by :func:`dfqkern.quantize.fold_batchnorm` on a copy).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def power_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``: ``inf`` for no noise, ``-inf`` for no signal."""
    if noise == 0.0:
        return math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB; ``inf`` when ``test`` is exact."""
    ref = reference.detach().double().reshape(-1)
    return power_db(float(ref.pow(2).sum()), float((ref - test.detach().double().reshape(-1)).pow(2).sum()))


@torch.no_grad()
def folded_reference(float_model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``float_model`` (eval, CPU) with its BatchNorms folded as quantize_model folds them,
    and the ``{bn: conv}`` pairs folded."""
    from ..quantize import fold_batchnorm

    ref = copy.deepcopy(float_model).cpu().eval()
    return ref, fold_batchnorm(ref)


def float_counterparts(reference: nn.Module, meta: dict, checkpoint: str,
                       name: str = "float_model") -> dict[str, nn.Module]:
    """``{layer: float module}`` for every quantized layer of the checkpoint (``meta``: its config.json)
    that the float model has. A layer must match in kind and weight shape, or the SQNR would compare
    unrelated tensors: a mismatch is an error naming ``name``. Only layers inside a swapped attention
    module may be missing (``nn.MultiheadAttention`` keeps q / k / v in one ``in_proj_weight``): they
    get no SQNR."""
    swapped = tuple(f"{a}." for a in meta.get("attention", {}))
    found = {}
    for layer, rec in meta["layers"].items():
        try:
            module = reference.get_submodule(layer)
        except AttributeError:
            module = None
        if module is None and layer.startswith(swapped):
            continue
        want = nn.Conv2d if rec["kind"] == "conv2d" else nn.Linear
        if not isinstance(module, want):
            what = "nothing" if module is None else type(module).__name__
            raise ValueError(f"{name} does not match checkpoint {checkpoint!r}: layer {layer!r} is a "
                             f"{want.__name__} there, {what} in the float model")
        if list(module.weight.shape) != list(rec["weight_shape"]):
            raise ValueError(f"{name} does not match checkpoint {checkpoint!r}: layer {layer!r} has weight shape "
                             f"{rec['weight_shape']} there, {list(module.weight.shape)} in the float model")
        found[layer] = module
    return found


@torch.no_grad()
def weight_sqnr(packed: nn.Module, counterparts: dict[str, nn.Module]) -> dict[str, float]:
    """``{layer: SQNR dB}`` of each packed layer's dequantized weight against its float counterpart's."""
    from ..quantize import quant_layers

    return {name: sqnr_db(counterparts[name].weight.float().cpu(), layer.packed().dequantize().cpu())
            for name, layer in quant_layers(packed) if name in counterparts}
