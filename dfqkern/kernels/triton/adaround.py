"""Fused AdaRound: soft / hard rounding forward with the regularizer, and the backward pass.

One pass over the weight computes ``w_hat`` and the per-program partial of
``reg = sum(1 - |2h - 1|**beta)``; the backward pass writes ``grad_V`` (task gradient plus
``reg_grad * d reg / dV``) and per-(block, channel) partials of the scale gradient. Tiles and
the ``[outer, C, inner]`` view are the fake-quant kernels'.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...formats import code_max
from .. import contract
from .common import check_device, check_float_dtype
from .fake_quant import channel_tile, layout


def _rounding_args() -> tuple[float, float]:
    """``(ZETA - GAMMA, GAMMA)`` of the rectified sigmoid, from the one definition (fp32 in the kernel,
    as torch rounds the reference's Python-float product)."""
    return contract.ZETA - contract.GAMMA, contract.GAMMA


@triton.jit
def _pow_abs(a, e, pow0):
    """``a ** e`` for ``a >= 0`` without libdevice; ``pow0`` is torch's ``0 ** e`` (host-computed)."""
    zero = a == 0.0
    return tl.where(zero, pow0, tl.exp2(e * tl.log2(tl.where(zero, 1.0, a))))


@triton.jit
def _load(base_ptr, v_ptr, scale_ptr, zp_ptr, c, off, mask, C, P_STRIDE):
    cm = c < C
    s = tl.load(scale_ptr + c * P_STRIDE, mask=cm, other=1.0).to(tl.float32)[:, None]
    zp = tl.load(zp_ptr + c * P_STRIDE, mask=cm, other=0).to(tl.float32)[:, None]
    base = tl.load(base_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return s, zp, base, v


@triton.jit
def _adaround_forward_kernel(base_ptr, v_ptr, out_ptr, reg_ptr, scale_ptr, zp_ptr, C, T, INNER, P_STRIDE,
                             beta, pow0, stretch, gamma, QMAX: tl.constexpr, HARD: tl.constexpr,
                             BC: tl.constexpr, BT: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c, off, mask = channel_tile(pid_c, pid_t, C, T, INNER, BC, BT)
    s, zp, base, v = _load(base_ptr, v_ptr, scale_ptr, zp_ptr, c, off, mask, C, P_STRIDE)
    if HARD:
        h = (v >= 0.0).to(tl.float32)
    else:
        h = tl.minimum(tl.maximum(tl.sigmoid(v) * stretch + gamma, 0.0), 1.0)
    q = tl.minimum(tl.maximum(base + h + zp, 0.0), QMAX * 1.0)
    tl.store(out_ptr + off, ((q - zp) * s).to(out_ptr.dtype.element_ty), mask=mask)
    if not HARD:
        reg = 1.0 - _pow_abs(tl.abs(2.0 * h - 1.0), beta, pow0)
        tl.store(reg_ptr + pid_t * tl.num_programs(0) + pid_c, tl.sum(tl.sum(tl.where(mask, reg, 0.0), 1), 0))


@triton.jit
def _adaround_backward_kernel(g_ptr, base_ptr, v_ptr, gv_ptr, gs_ptr, scale_ptr, zp_ptr, C, T, INNER, P_STRIDE,
                              beta, pow0, reg_grad, stretch, gamma, QMAX: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    pid_t = tl.program_id(1)
    c, off, mask = channel_tile(tl.program_id(0), pid_t, C, T, INNER, BC, BT)
    s, zp, base, v = _load(base_ptr, v_ptr, scale_ptr, zp_ptr, c, off, mask, C, P_STRIDE)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(v)
    hs = sig * stretch + gamma
    h = tl.minimum(tl.maximum(hs, 0.0), 1.0)
    dh_dv = tl.where((hs > 0.0) & (hs < 1.0), sig * (1.0 - sig) * stretch, 0.0)
    t = base + h + zp
    inside = ((t >= 0.0) & (t <= QMAX * 1.0)).to(tl.float32)
    q = tl.minimum(tl.maximum(t, 0.0), QMAX * 1.0)
    u = 2.0 * h - 1.0
    sign = tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0))
    dreg_dh = -beta * _pow_abs(tl.abs(u), beta - 1.0, pow0) * sign * 2.0
    gv = g * s * inside * dh_dv + reg_grad * dreg_dh * dh_dv
    tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=mask)
    gs = tl.sum(tl.where(mask, g * (q - zp), 0.0), axis=1)
    tl.store(gs_ptr + pid_t * C + c, gs, mask=c < C)


# ----------------------------------------------------------------------------- host side

def _zero_pow(e: float) -> float:
    """torch's ``0 ** e``."""
    return 1.0 if e == 0 else (0.0 if e > 0 else math.inf)


def _check(v: torch.Tensor) -> None:
    check_float_dtype("v", v)
    check_device(v=v)


def adaround_forward(base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     bits: int, axis: int = 0, beta: float = 2.0, hard: bool = False):
    """Triton twin of :func:`reference.adaround_forward`: ``(w_hat, reg)`` in one pass."""
    _check(v)
    lay = layout(v, scale, zero_point, axis)
    base, v = base.contiguous(), v.contiguous()
    out = torch.empty_like(v)
    n_prog = lay["grid"][0] * lay["grid"][1]
    reg = torch.empty(n_prog, dtype=torch.float32, device=v.device)
    if v.numel():
        _adaround_forward_kernel[lay["grid"]](base, v, out, reg, lay["scale"], lay["zp"], lay["C"], lay["T"],
                                              lay["INNER"], lay["P_STRIDE"], float(beta), _zero_pow(beta),
                                              *_rounding_args(), QMAX=code_max(bits), HARD=bool(hard), BC=lay["BC"], BT=lay["BT"])
    if hard:
        return out, torch.zeros((), device=v.device)
    return out, reg.sum()


def adaround_backward(grad: torch.Tensor, base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor, bits: int, axis: int = 0, beta: float = 2.0, reg_grad: float = 0.0):
    """Triton twin of :func:`reference.adaround_backward`: ``(grad_v, grad_scale)``."""
    _check(v)
    check_float_dtype("grad", grad)
    lay = layout(v, scale, zero_point, axis)
    grad, base, v = grad.contiguous(), base.contiguous(), v.contiguous()
    gv = torch.empty_like(v)
    gs = torch.empty((lay["grid"][1], lay["C"]), dtype=torch.float32, device=v.device)
    if v.numel():
        _adaround_backward_kernel[lay["grid"]](grad, base, v, gv, gs, lay["scale"], lay["zp"], lay["C"], lay["T"],
                                               lay["INNER"], lay["P_STRIDE"], float(beta), _zero_pow(beta - 1),
                                               float(reg_grad), *_rounding_args(), QMAX=code_max(bits), BC=lay["BC"], BT=lay["BT"])
    return gv, gs.sum(dim=0)
