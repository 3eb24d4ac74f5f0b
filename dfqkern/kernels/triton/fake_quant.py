"""Fused fake-quant forward / backward (per-tensor or per-channel, STE + LSQ gradients, QDrop).

A tensor is seen as ``[outer, C, inner]`` around the channel axis; each program owns a
``[BC channels, BT positions]`` tile. The backward pass writes the input gradient and one
partial sum per (position block, channel) for the scale and zero-point gradients; a tiny
``sum(0)`` over the ``cdiv(T, BT) x C`` partials finishes the reduction deterministically (no
float atomics, no full-size temporaries). QDrop masks come from :func:`common.hash32` on the
element's row-major index, bit-identical to :func:`reference.qdrop_mask`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import code_max
from .. import reference
from .common import channel_layout, check_device, check_float_dtype, hash32, rint, seed_mix


@triton.jit
def channel_tile(pid_c, pid_t, C, T, INNER, BC: tl.constexpr, BT: tl.constexpr):
    """Channel ids, element offsets and mask of this program's tile of the ``[outer, C, inner]`` view."""
    c = pid_c * BC + tl.arange(0, BC)
    t = pid_t.to(tl.int64) * BT + tl.arange(0, BT)
    o = t // INNER
    i = t - o * INNER
    off = (o * C * INNER + i)[None, :] + (c.to(tl.int64) * INNER)[:, None]
    mask = (c < C)[:, None] & (t < T)[None, :]
    return c, off, mask


@triton.jit
def _params(scale_ptr, zp_ptr, c, C, P_STRIDE):
    cm = c < C
    s = tl.load(scale_ptr + c * P_STRIDE, mask=cm, other=1.0).to(tl.float32)
    zp = tl.load(zp_ptr + c * P_STRIDE, mask=cm, other=0).to(tl.float32)
    inv = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # == torch's 1 / scale in fp32
    return s[:, None], zp[:, None], inv[:, None]


@triton.jit
def _fq_forward_kernel(x_ptr, out_ptr, scale_ptr, zp_ptr, C, T, INNER, P_STRIDE, seedmix, thr,
                       QMAX: tl.constexpr, DROP: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    c, off, mask = channel_tile(tl.program_id(0), tl.program_id(1), C, T, INNER, BC, BT)
    s, zp, inv = _params(scale_ptr, zp_ptr, c, C, P_STRIDE)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # reference.quantize: clamp(round(x * inv) + zp) then the uint8 cast (floor, for a float zero point)
    code = tl.floor(tl.minimum(tl.maximum(rint(x * inv) + zp, 0.0), QMAX * 1.0))
    y = (code - zp) * s
    y = tl.where((x != x) | (tl.abs(x) == float("inf")), float("nan"), y)  # NaN / +-Inf propagate as NaN
    if DROP:
        y = tl.where(hash32(off, seedmix).to(tl.int64) < thr, x, y)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fq_backward_kernel(g_ptr, x_ptr, gx_ptr, ds_ptr, dz_ptr, scale_ptr, zp_ptr, C, T, INNER, P_STRIDE,
                        seedmix, thr, QMAX: tl.constexpr, DROP: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    pid_t = tl.program_id(1)
    c, off, mask = channel_tile(tl.program_id(0), pid_t, C, T, INNER, BC, BT)
    s, zp, inv = _params(scale_ptr, zp_ptr, c, C, P_STRIDE)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    xs = x * inv
    r = rint(xs)
    t = r + zp
    below = t < 0.0
    above = t > QMAX * 1.0
    inside = (~(below | above)).to(tl.float32)
    if DROP:
        kept = (hash32(off, seedmix).to(tl.int64) >= thr).to(tl.float32)
        gq = g * kept
        gx = tl.where(kept != 0.0, g * inside, g)
    else:
        gq = g
        gx = g * inside
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    ds = gq * tl.where(inside != 0.0, r - xs, tl.where(below, -zp, QMAX - zp))
    dz = gq * tl.where(inside != 0.0, 0.0, -s)
    cm = c < C
    tl.store(ds_ptr + pid_t * C + c, tl.sum(tl.where(mask, ds, 0.0), axis=1), mask=cm)
    tl.store(dz_ptr + pid_t * C + c, tl.sum(tl.where(mask, dz, 0.0), axis=1), mask=cm)


# ----------------------------------------------------------------------------- host side

def tile_blocks(c: int, inner: int, t: int) -> tuple[int, int]:
    """``(BC, BT)``: ~4k elements per program; several channels per tile when ``inner`` is short so
    each tile still covers contiguous memory."""
    bc = min(triton.next_power_of_2(c), triton.next_power_of_2(max(1, -(-64 // max(inner, 1)))), 256)
    bt = min(max(16, 4096 // bc), triton.next_power_of_2(max(t, 1)))
    return bc, bt


def layout(x: torch.Tensor, scale, zero_point, axis: int | None) -> dict:
    """Describe the kernel grid of ``x`` (parameters as checked by the contract)."""
    outer, c, inner = channel_layout(tuple(x.shape), axis)
    bc, bt = tile_blocks(c, inner, outer * inner)
    t = outer * inner
    return dict(C=c, T=t, INNER=inner, P_STRIDE=0 if axis is None else 1, BC=bc, BT=bt,
                grid=(triton.cdiv(c, bc), triton.cdiv(t, bt)),
                scale=torch.as_tensor(scale, device=x.device).reshape(-1),
                zp=torch.as_tensor(zero_point, device=x.device).reshape(-1))


def _drop_args(drop_prob: float, seed: int) -> tuple[bool, int, int]:
    if drop_prob > 0:
        return True, seed_mix(seed), reference.drop_threshold(drop_prob)
    return False, 0, 0


def fake_quant_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                       axis: int | None = None, drop_prob: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Triton twin of :func:`reference.fake_quant_forward` (bit-identical)."""
    check_float_dtype("x", x)
    check_device(x=x)
    lay = layout(x, scale, zero_point, axis)
    x = x.contiguous()
    out = torch.empty_like(x)
    drop, mix, thr = _drop_args(drop_prob, seed)
    if x.numel():
        _fq_forward_kernel[lay["grid"]](x, out, lay["scale"], lay["zp"], lay["C"], lay["T"], lay["INNER"],
                                        lay["P_STRIDE"], mix, thr, QMAX=code_max(bits), DROP=drop,
                                        BC=lay["BC"], BT=lay["BT"], enable_fp_fusion=False)
    return out


def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        bits: int, axis: int | None = None, grad_scale: float = 1.0, drop_prob: float = 0.0,
                        seed: int = 0):
    """Triton twin of :func:`reference.fake_quant_backward`: ``(grad_x, grad_scale, grad_zero_point)``.

    ``grad_x`` is bit-identical; the two reductions equal the reference up to fp32 summation order.
    """
    check_float_dtype("x", x)
    check_float_dtype("grad", grad)
    check_device(x=x)
    lay = layout(x, scale, zero_point, axis)
    x, grad = x.contiguous(), grad.contiguous()
    gx = torch.empty_like(x)
    n_tb = lay["grid"][1]
    ds = torch.empty((n_tb, lay["C"]), dtype=torch.float32, device=x.device)  # every slot is written
    dz = torch.empty_like(ds)
    drop, mix, thr = _drop_args(drop_prob, seed)
    if x.numel():
        _fq_backward_kernel[lay["grid"]](grad, x, gx, ds, dz, lay["scale"], lay["zp"], lay["C"], lay["T"],
                                         lay["INNER"], lay["P_STRIDE"], mix, thr, QMAX=code_max(bits), DROP=drop,
                                         BC=lay["BC"], BT=lay["BT"], enable_fp_fusion=False)
    return gx, ds.sum(dim=0) * grad_scale, dz.sum(dim=0) * grad_scale
