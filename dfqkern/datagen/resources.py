"""What generation asks of the device: its arithmetic precision and its free memory.

* Precision (``PRECISIONS``): ``fp32``, or autocast to ``bf16`` / ``fp16`` around the model's
  forward while the optimized pixels, generator weights, Adam state and every loss stay float32.
  fp16 (CUDA only) scales the loss (``torch.amp.GradScaler``) so small gradients do not flush to
  zero; bf16 has fp32's range and needs no scaling. fp16 on the CPU is refused, not emulated: it
  is slower than fp32 there and has no gradient scaler in this path; use bf16.
* Batch size from free memory: :func:`auto_batch_size` is the pure rule; on the CPU the batch size
  is the generator's documented default (``CPU_BATCH_SIZE``), since host memory is rarely what
  limits a CPU run and its "free" figure moves with every other process.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import torch.nn as nn

from .config import (AUTO_BATCH_MAX, AUTO_BATCH_MEMORY_FRACTION, AUTO_BATCH_MULTIPLE, PRECISIONS,
                     check_choice)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def check_precision(precision: str, device: "str | torch.device") -> None:
    """``precision`` must be one of ``PRECISIONS`` and usable on ``device`` (fp16 needs CUDA)."""
    check_choice("precision", precision, PRECISIONS)
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {str(device)!r}: float16 on the {kind} is "
                         f"slower than fp32 and unscaled gradients underflow; use 'bf16' (or 'fp32') there")


def autocast(precision: str, device: "str | torch.device"):
    """The autocast context of ``precision`` for the model's forward on ``device`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: "str | torch.device") -> "torch.amp.GradScaler":
    """A loss scaler, enabled only for fp16 (``scale(loss).backward()``, ``step(opt)``, ``update()``;
    disabled it passes everything through unchanged)."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind if kind == "cuda" else "cpu", enabled=precision == "fp16")


def free_memory_bytes(device: "str | torch.device") -> "int | None":
    """Free memory of ``device``: CUDA's free memory, or the host's MemAvailable; None if unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None


def auto_batch_size(free_bytes: int, per_image_bytes: int, *, reserved_bytes: int = 0, minimum: int = 1,
                    fraction: float = AUTO_BATCH_MEMORY_FRACTION, maximum: int = AUTO_BATCH_MAX,
                    multiple: int = AUTO_BATCH_MULTIPLE) -> int:
    """The largest batch whose images fit: ``floor((free * fraction - reserved) / per_image)``,
    capped at ``maximum`` and, from ``multiple`` up, rounded down to a multiple of it (tensor-core
    friendly). An error naming the numbers when not even ``minimum`` images fit."""
    if per_image_bytes <= 0 or free_bytes < 0 or reserved_bytes < 0:
        raise ValueError(f"auto batch size needs per_image_bytes > 0 and free/reserved bytes >= 0, got "
                         f"{per_image_bytes}, {free_bytes}, {reserved_bytes}")
    fit = int((free_bytes * fraction - reserved_bytes) // per_image_bytes)
    if fit < minimum:
        mib = 2 ** 20
        raise ValueError(f"batch size auto: {fraction:g} of the free memory ({free_bytes / mib:.1f} MiB) less "
                         f"{reserved_bytes / mib:.1f} MiB held for the set holds {max(fit, 0)} image(s) of "
                         f"{per_image_bytes / mib:.2f} MiB, fewer than {minimum}; pass a batch size")
    size = min(fit, maximum)
    return size // multiple * multiple if size >= multiple else size


def activation_bytes_per_image(model: nn.Module, input_shape: Sequence[int], precision: str = "fp32",
                               device: "str | torch.device | None" = None) -> int:
    """Estimated memory one image's forward keeps for the backward: every leaf module's output
    (what autograd saves, roughly) at ``precision``'s width, doubled for the gradients in flight, plus
    the image and its gradient. Measured with one forward of two images on ``device``."""
    width = BYTES[precision]
    total = [0]

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    pixels = 1
    for s in input_shape:
        pixels *= int(s)
    return int(total[0] // 2 * width * 2 + 2 * 4 * pixels)
