"""Observer calibration: run data through a model and set every static activation quantizer's range.

The one way activation ranges are observed: :func:`dfqkern.quantize.calibrate_activations` (the
public observer step) and :func:`dfqkern.calib.calibrate` (which re-observes before reconstruction)
both call :func:`observe_activations`. It covers every :class:`ActQuantizer` in the model (the
inputs of quantized layers and, once attention is quantized, its matmul operands).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .quantizers import ActQuantizer


def batches_of(data, batch_size: int) -> list[torch.Tensor]:
    """A tensor of inputs split into batches, or an iterable of batches (tensors or (tensor, ...) tuples)."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0 or len(data) == 0:
            raise ValueError("calibration data is empty")
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if not batches:
        raise ValueError("calibration data is empty")
    return batches


@torch.no_grad()
def observe_activations(model: nn.Module, batches: Iterable[torch.Tensor], device=None,
                        progress: bool = True) -> nn.Module:
    """Observe ranges on ``batches`` (eval mode) and finalize every activation quantizer of ``model``.

    On an error every quantizer leaves observe mode (uncalibrated ones stay uncalibrated).
    """
    from tqdm.auto import tqdm  # here, not at import: loading and running a packed model never needs it

    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    device = device or next(model.parameters()).device
    batches = list(batches)
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.set_mode("observe")
    try:
        for x in tqdm(batches, desc="observe activations", disable=not progress, leave=False):
            model(x.to(device))
        for q in quantizers:
            q.finalize()
    except Exception:
        for q in quantizers:
            q.tracker = None
            q.mode = "quant"
        raise
    finally:
        model.train(was_training)
    return model
