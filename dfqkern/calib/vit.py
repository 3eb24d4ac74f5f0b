"""Attention in calibration: nothing of its own any more.

The quantized attention modules (fake-quant and packed) live in :mod:`dfqkern.nn.attention` and are
swapped in by :func:`dfqkern.quantize.quantize_model`, so a model is the same whether or not it was
calibrated, and a checkpoint can rebuild it. Their quantizers are ordinary activation quantizers:
:func:`dfqkern.calib.calibrate` observes and learns them like the others (the softmax grid, a
:class:`FixedRangeActQuantizer`, is observed but never learned). This module keeps the old names.
"""
from __future__ import annotations

from torch import nn

from ..nn.attention import FixedRangeActQuantizer, QuantTimmAttention
from ..quantize import attach_attention_quantizers

QuantAttention = QuantTimmAttention  # the timm ViT / DeiT attention twin, under its earlier name

__all__ = ["FixedRangeActQuantizer", "QuantAttention", "quantize_attention"]


def quantize_attention(model: nn.Module) -> int:
    """Give a quantized model's attention modules matmul quantizers if it has none yet (models from
    ``quantize_model`` already do); returns how many were added. Idempotent."""
    return attach_attention_quantizers(model)
