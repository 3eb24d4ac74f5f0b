"""Pieces every Triton kernel family shares: exact rounding, the QDrop hash, code unpacking, host checks.

Pure Triton only (no inline asm, no libdevice) so the same code runs under ``TRITON_INTERPRET=1``.
Kernels whose results must match the reference bit for bit are launched with
``enable_fp_fusion=False``: a contracted ``x * inv - floor(...)`` (FMA) would round differently
from torch's separate multiply and subtract.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..contract import KERNEL_FLOATS, Unsupported, require_float


def _interpret_mode() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed at import: ``triton.jit`` decides interpreted vs. compiled when a kernel is *defined*, so
# the kernels in this package keep the mode that was in force when it was first imported.
INTERPRET = _interpret_mode()

MASK32 = 0xFFFFFFFF
SEED_MUL = 0x9E3779B9  # reference.hash32's seed multiplier


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def rint(y):
    """Round half to even (``torch.round``) for fp32 without libdevice.

    ``floor(y + 0.5)`` is wrong just below .5 (the add rounds up), so split into floor and the
    exact fractional part instead (``y - floor(y)`` is exact in fp32).
    """
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def hash32(index, seedmix):
    """reference.hash32 in uint32 arithmetic; ``seedmix = (seed * 0x9E3779B9) mod 2**32`` (host)."""
    x = index.to(tl.uint32) + seedmix.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def load_codes(ptr, row_off, k, mask, SLOT: tl.constexpr):
    """Codes at positions ``k`` of rows starting at ``ptr + row_off`` in the kpack-lsb-v1 layout.

    Each code is read from its byte (``k // per_byte``) and shifted out of its slot, so any K
    offset works; neighbouring lanes hit the same bytes, which the cache absorbs. int32 result,
    0 where ``mask`` is False.
    """
    PER_BYTE: tl.constexpr = 8 // SLOT
    byte = tl.load(ptr + row_off + k // PER_BYTE, mask=mask, other=0).to(tl.int32)
    if SLOT == 8:
        return byte
    else:
        return (byte >> ((k % PER_BYTE) * SLOT)) & ((1 << SLOT) - 1)


# ----------------------------------------------------------------------------- host helpers

def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """Decline float dtypes the kernels do not take (bfloat16 also under the interpreter)."""
    require_float(name, t, KERNEL_FLOATS if not INTERPRET else (torch.float32, torch.float16),
                  " (bfloat16 is not available under the Triton interpreter)" if INTERPRET else "")


def check_device(**tensors) -> None:
    """Compiled kernels need CUDA tensors; the interpreter runs on any device."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cuda" and not INTERPRET:
            raise Unsupported(f"triton backend runs on cuda tensors (or any device under TRITON_INTERPRET=1); "
                              f"{name} is on {t.device}")


def seed_mix(seed: int) -> int:
    return ((int(seed) & MASK32) * SEED_MUL) & MASK32


def channel_layout(shape: tuple[int, ...], axis: int | None) -> tuple[int, int, int]:
    """View a contiguous tensor as ``[outer, C, inner]`` around ``axis`` (per-tensor: ``[1, 1, numel]``)."""
    numel = 1
    for s in shape:
        numel *= s
    if axis is None:
        return 1, 1, numel
    axis = axis % len(shape)
    outer = inner = 1
    for s in shape[:axis]:
        outer *= s
    for s in shape[axis + 1:]:
        inner *= s
    return outer, shape[axis], inner


def param_vector(p, n: int, device, dtype) -> torch.Tensor:
    """A per-tensor or per-channel parameter as a contiguous 1-D tensor of ``n`` elements."""
    t = torch.as_tensor(p, device=device).reshape(-1).to(dtype)
    return t.expand(n).contiguous() if t.numel() == 1 and n != 1 else t.contiguous()
