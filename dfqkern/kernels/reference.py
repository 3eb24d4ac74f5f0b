"""Pure-torch reference ops: the oracle every backend (Triton, CPU, CUDA) is tested against.

Conventions (see :mod:`dfqkern.formats` for codes and packing):

* ``codes = clamp(round_half_even(x * inv_scale) + zero_point, 0, 2**bits - 1)`` where
  ``inv_scale = 1 / scale`` is computed in float32 by torch **before** the kernel runs (kernels
  receive ``inv_scale``; this keeps approximate on-device division out of the integer path).
  Rounding happens before the integer zero point is added, so no FMA can change a code.
* ``dequant = (codes - zero_point) * scale``.
* Per-channel parameters are 1-D and broadcast along ``axis`` of the input; per-tensor
  parameters are 0-d or one-element.
* Integer GEMM / conv results are exact (computed in float64, whose 53-bit mantissa holds every
  partial sum these bit widths can produce) and returned as int32. ``matmul_int`` (activation x
  activation, the attention matmuls) is exact the same way, for K up to ``contract.MATMUL_MAX_K``.

Non-finite inputs (NaN, +Inf, -Inf) propagate; no op raises on them and every backend agrees:

* ``fake_quant_forward``: a non-finite element gives NaN at that element (a QDrop-dropped element
  keeps its float value, so an Inf stays Inf there).
* ``linear`` / ``conv2d`` with activation quantization: an output row of ``linear`` whose input row
  holds a non-finite value is NaN in every output feature; an output pixel of ``conv2d`` is NaN in
  every output channel when its receptive field (the kernel window, padding excluded) covers an input
  pixel with a non-finite value in any channel (pixel granularity, also for grouped / depthwise convs).
* Ops that return integer codes cannot hold NaN: ``quantize`` maps NaN to code 0 and ``+Inf`` /
  ``-Inf`` to the top / bottom code (saturation); ``quantize_activation`` does the same for static
  per-tensor parameters (use ``linear``, which propagates), while a per-token row holding a non-finite
  value gets scale NaN, zero point 0 (``2**(bits-1)`` if symmetric) and all codes 0, so any later
  epilogue or dequantization of that row is NaN. ``fake_quant_backward`` is not defined for
  non-finite inputs (calibration observers raise on them first).

Every op here has the same name and signature in every backend module. Arguments are checked by
:mod:`dfqkern.kernels.contract` (dispatch runs it once before any backend); the functions here
assume arguments that satisfy it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats import (PackedActivation, PackedWeight, check_bits, code_max, matrix_to_conv_weight,
                       pack_codes, symmetric_zero_point)

from .contract import GAMMA, SCALE_EPS, ZETA, Unsupported, check_drop_prob  # noqa: F401  (one definition, re-exported)

DEVICES = ("cpu", "cuda")


def is_available() -> bool:
    return True


# ----------------------------------------------------------------------------- helpers

def broadcast_param(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-tensor (``axis=None``) or per-channel (1-D along ``axis``) parameter to broadcast against ``x``."""
    p = torch.as_tensor(p, device=x.device)
    if axis is None:
        if p.numel() != 1:
            raise ValueError(f"per-tensor parameter must have one element, got shape {tuple(p.shape)}")
        return p.reshape(())
    axis = axis % x.dim()
    if p.numel() != x.shape[axis]:
        raise ValueError(
            f"per-channel parameter has {p.numel()} elements but input has {x.shape[axis]} along axis {axis}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def reduce_to_param(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum ``t`` over every dim except ``axis`` (or all dims for per-tensor)."""
    if axis is None:
        return t.sum().reshape(1)
    axis = axis % t.dim()
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dim=dims) if dims else t


def inv_scale(scale: torch.Tensor) -> torch.Tensor:
    return 1.0 / scale.float()


# ----------------------------------------------------------------------------- quantization parameters

def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and integer zero point (float32, int32) covering ``[lo, hi]`` (widened to include 0)."""
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    qmax = code_max(bits)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / (symmetric_zero_point(bits) - 1), min=SCALE_EPS)
        zp = torch.full_like(scale, symmetric_zero_point(bits), dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / qmax, min=SCALE_EPS)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zp


# ----------------------------------------------------------------------------- quantize / dequantize / fake-quant

def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
             axis: int | None = None) -> torch.Tensor:
    """Float -> unsigned codes (uint8)."""
    inv = broadcast_param(inv_scale(scale), x, axis)
    zp = broadcast_param(zero_point, x, axis).to(torch.float32)
    q = torch.round(x.float() * inv) + zp
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)  # NaN -> code 0 (+-Inf saturate below)
    return torch.clamp(q, 0, code_max(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    s = broadcast_param(scale, codes, axis).float()
    zp = broadcast_param(zero_point, codes, axis).to(torch.float32)
    return (codes.to(torch.float32) - zp) * s


# Counter-based hash shared by every backend so QDrop masks agree bit for bit.
# x0 = (index + seed * 0x9E3779B9) mod 2**32, then "lowbias32":
# x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16  (all mod 2**32).
# An element keeps its float value (quantization dropped) when hash < round(drop_prob * 2**32).
_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    # (a * b) mod 2**32 in int64 without overflow: split b into 16-bit halves.
    lo = a * (b & 0xFFFF)
    hi = ((a * (b >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    x = (index + ((seed * 0x9E3779B9) & _MASK32)) & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def drop_threshold(drop_prob: float) -> int:
    check_drop_prob(drop_prob)
    return min(int(round(drop_prob * 2 ** 32)), 2 ** 32)


def qdrop_mask(shape, drop_prob: float, seed: int, device=None) -> torch.Tensor:
    """Boolean mask, True where quantization is dropped (the float value is kept)."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    return (hash32(idx, int(seed) & _MASK32) < drop_threshold(drop_prob)).reshape(shape)


def fake_quant_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                       axis: int | None = None, drop_prob: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x.dtype``; with ``drop_prob > 0`` (QDrop) dropped elements pass through."""
    out = dequantize(quantize(x, scale, zero_point, bits, axis), scale, zero_point, axis).to(x.dtype)
    out = torch.where(torch.isfinite(x), out, torch.full_like(out, math.nan))  # NaN / Inf propagate as NaN
    if drop_prob > 0:
        out = torch.where(qdrop_mask(x.shape, drop_prob, seed, x.device), x, out)
    return out


def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        bits: int, axis: int | None = None, grad_scale: float = 1.0, drop_prob: float = 0.0,
                        seed: int = 0):
    """Gradients of :func:`fake_quant_forward`: ``(grad_x, grad_scale, grad_zero_point)``.

    ``grad_x`` is the straight-through estimate (passes inside the clip range). ``grad_scale`` is
    LSQ's: ``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` where clipped; ``grad_zero_point``
    is ``-s`` where clipped, 0 inside. Both are reduced to the parameter's shape (fp32) and
    multiplied by ``grad_scale`` (LSQ's ``1/sqrt(numel * qmax)`` if the caller wants it).
    """
    g = grad.float()
    inv = broadcast_param(inv_scale(scale), x, axis)
    s = broadcast_param(scale, x, axis).float()
    zp = broadcast_param(zero_point, x, axis).to(torch.float32)
    xs = x.float() * inv
    r = torch.round(xs)
    t = r + zp
    qmax = code_max(bits)
    below, above = t < 0, t > qmax
    inside = ~(below | above)
    if drop_prob > 0:
        kept = ~qdrop_mask(x.shape, drop_prob, seed, x.device)
        gq = g * kept
        gx = torch.where(kept, g * inside, g)
    else:
        gq = g
        gx = g * inside
    ds = gq * torch.where(inside, r - xs, torch.where(below, -zp, qmax - zp))
    dz = gq * torch.where(inside, torch.zeros_like(xs), -s)
    return gx.to(x.dtype), reduce_to_param(ds, axis) * grad_scale, reduce_to_param(dz, axis) * grad_scale


# ----------------------------------------------------------------------------- AdaRound

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init_v(w: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """V such that the soft rounding starts at the float weight's fractional part."""
    frac = w.float() * broadcast_param(inv_scale(scale), w, axis)
    frac = frac - torch.floor(frac)
    p = torch.clamp((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def adaround_base(w: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``floor(w / s)``: the integer part AdaRound learns to round up or down from (float32)."""
    return torch.floor(w.float() * broadcast_param(inv_scale(scale), w, axis))


def adaround_forward(base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     bits: int, axis: int = 0, beta: float = 2.0, hard: bool = False):
    """AdaRound weight and regularizer: ``(w_hat, reg)``.

    ``w_hat = s * (clamp(base + h(V) + z, 0, qmax) - z)`` with ``h`` the rectified sigmoid (soft) or
    ``V >= 0`` (hard); ``reg = sum(1 - |2h - 1|**beta)`` (0 for hard rounding).
    """
    s = broadcast_param(scale, v, axis).float()
    zp = broadcast_param(zero_point, v, axis).to(torch.float32)
    h = (v >= 0).float() if hard else rectified_sigmoid(v.float())
    c = torch.clamp(base.float() + h + zp, 0, code_max(bits))
    w_hat = (c - zp) * s
    reg = torch.zeros((), device=v.device) if hard else (1 - (2 * h - 1).abs().pow(beta)).sum()
    return w_hat.to(v.dtype), reg


def adaround_backward(grad: torch.Tensor, base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor, bits: int, axis: int = 0, beta: float = 2.0,
                      reg_grad: float = 0.0):
    """Gradients of soft :func:`adaround_forward`: ``(grad_v, grad_scale)``.

    ``grad_v`` includes ``reg_grad * d reg / dV`` (``reg_grad`` is the loss's weight on ``reg``).
    ``grad_scale`` treats ``base`` as fixed (Genie-M learns the scale jointly with the rounding).
    """
    g = grad.float()
    s = broadcast_param(scale, v, axis).float()
    zp = broadcast_param(zero_point, v, axis).to(torch.float32)
    vf = v.float()
    sig = torch.sigmoid(vf)
    hs = sig * (ZETA - GAMMA) + GAMMA
    h = torch.clamp(hs, 0.0, 1.0)
    dh_dv = torch.where((hs > 0) & (hs < 1), sig * (1 - sig) * (ZETA - GAMMA), torch.zeros_like(vf))
    t = base.float() + h + zp
    qmax = code_max(bits)
    inside = (t >= 0) & (t <= qmax)
    c = torch.clamp(t, 0, qmax)
    u = 2 * h - 1
    dreg_dh = -beta * u.abs().pow(beta - 1) * torch.sign(u) * 2
    gv = g * s * inside * dh_dv + reg_grad * dreg_dh * dh_dv
    gs = reduce_to_param(g * (c - zp), axis)
    return gv.to(v.dtype), gs


# ----------------------------------------------------------------------------- packed activations / GEMM / conv

@dataclass
class ActQuant:
    """How a packed op quantizes its input: static per-tensor ``scale``/``zero_point``, or per-token dynamic."""

    bits: int
    scale: torch.Tensor | None = None  # one element; None for per-token
    zero_point: torch.Tensor | None = None
    per_token: bool = False
    symmetric: bool = False

    def __post_init__(self):
        check_bits(self.bits, (4, 8), "act bits")
        if not self.per_token and (self.scale is None or self.zero_point is None):
            raise ValueError("static activation quantization needs scale and zero_point")


def token_qparams(x2d: torch.Tensor, bits: int, symmetric: bool):
    """Per-row (token) dynamic scale and zero point from each row's min/max.

    A row holding a non-finite value gets scale NaN and zero point 0 (``2**(bits-1)`` if symmetric).
    """
    x = x2d.float()
    finite = torch.isfinite(x)
    safe = torch.where(finite, x, torch.zeros_like(x))
    scale, zp = qparams_from_range(safe.amin(dim=1), safe.amax(dim=1), bits, symmetric)
    bad = ~finite.all(dim=1)
    scale = torch.where(bad, torch.full_like(scale, math.nan), scale)
    zp = torch.where(bad, torch.full_like(zp, symmetric_zero_point(bits) if symmetric else 0), zp)
    return scale, zp


def nonfinite_rows(x2d: torch.Tensor) -> torch.Tensor:
    """Boolean ``[M]``: rows of ``x2d`` holding a NaN or an Inf."""
    return ~torch.isfinite(x2d).all(dim=1)


def nonfinite_pixels(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Boolean ``[N, 1, OH, OW]``: output pixels whose receptive field covers an input pixel (NCHW ``x``)
    with a non-finite value in any channel."""
    bad = (~torch.isfinite(x)).any(dim=1, keepdim=True).double()
    ones = torch.ones(1, 1, *kernel_size, dtype=torch.float64, device=x.device)
    return F.conv2d(bad, ones, None, stride, padding, dilation) > 0


def quantize_activation(x2d: torch.Tensor, act: ActQuant) -> PackedActivation:
    """Quantize ``[M, K]`` activations and pack them along K."""
    if act.per_token:
        scale, zp = token_qparams(x2d, act.bits, act.symmetric)
        codes = quantize(x2d, scale.to(x2d.device), zp.to(x2d.device), act.bits, axis=0)
    else:
        scale = act.scale.reshape(1).float()
        zp = act.zero_point.reshape(1).to(torch.int32)
        codes = quantize(x2d, scale, zp, act.bits)
    zp = zp.to(device=x2d.device, dtype=torch.int32)
    return PackedActivation(pack_codes(codes, act.bits, zp),
                            scale.to(x2d.device).float(), zp, act.bits, x2d.shape[1])


def _exact_int(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t).to(torch.int32)


def linear_int(pa: PackedActivation, pw: PackedWeight) -> torch.Tensor:
    """Exact int32 ``(a_codes - a_zp) @ (w_codes - w_zp).T`` -> ``[M, N]``."""
    return _exact_int(pa.int_matrix().double() @ pw.int_matrix().double().T)


def _epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype, channel_dim: int):
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    sw = w_scale.float().reshape(shape)
    if a_scale.numel() == 1:
        y = acc.float() * (a_scale.float().reshape(()) * sw)
    else:  # per-token: one scale per row of a 2-D accumulator
        y = acc.float() * (a_scale.float().reshape(-1, 1) * sw)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y.to(out_dtype)


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed Linear: ``[..., K] -> [..., N]``. ``act=None`` is weight-only (float activations)."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, pw.k)
    if act is None:
        y = F.linear(x2d.float(), pw.dequantize().reshape(pw.n, pw.k).float(),
                     None if bias is None else bias.float()).to(out_dtype)
    else:
        pa = quantize_activation(x2d, act)
        y = _epilogue(linear_int(pa, pw), pa.scale, pw.scale, bias, out_dtype, 1)
        y = torch.where(nonfinite_rows(x2d)[:, None], torch.full_like(y, math.nan), y)
    return y.reshape(*lead, pw.n)


def conv2d_int(x_codes: torch.Tensor, x_zero_point: torch.Tensor, pw: PackedWeight, stride=1, padding=0,
               dilation=1, groups: int = 1) -> torch.Tensor:
    """Exact int32 convolution of ``(x_codes - x_zp)`` with ``(w_codes - w_zp)``; padding is the value 0."""
    xi = x_codes.double() - x_zero_point.reshape(()).double()
    wi = matrix_to_conv_weight(pw.int_matrix().double(), pw.shape)
    return _exact_int(F.conv2d(xi, wi, None, stride, padding, dilation, groups))


def conv2d(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed Conv2d on NCHW input. Activations are per-tensor (``act.per_token`` is rejected)."""
    out_dtype = out_dtype or x.dtype
    if act is None:
        return F.conv2d(x.float(), pw.dequantize().float(), None if bias is None else bias.float(),
                        stride, padding, dilation, groups).to(out_dtype)
    codes = quantize(x, act.scale.reshape(1), act.zero_point.reshape(1), act.bits)
    acc = conv2d_int(codes, act.zero_point, pw, stride, padding, dilation, groups)
    y = _epilogue(acc, act.scale, pw.scale, bias, out_dtype, 1)
    bad = nonfinite_pixels(x, pw.shape[2:], stride, padding, dilation)
    return torch.where(bad, torch.full_like(y, math.nan), y)


def matmul_int(a: torch.Tensor, a_zero_point: torch.Tensor, b: torch.Tensor,
               b_zero_point: torch.Tensor) -> torch.Tensor:
    """Exact int32 batched ``(a - a_zp) @ (b - b_zp)`` of two activation code tensors (attention's q.k^T, attn.v).

    ``a``: uint8 codes ``[..., M, K]``, ``a_zero_point`` broadcastable to ``[..., M, 1]`` (per tensor, per
    head or per row); ``b``: uint8 codes ``[..., K, N]``, ``b_zero_point`` broadcastable to ``[..., 1, N]``.
    Float64 holds every partial sum exactly (K * 255**2 < 2**53); measured 10x faster than torch's int32
    matmul on CPU for attention shapes, and CUDA has no integer matmul at all.
    """
    ai = a.double() - a_zero_point.double()
    bi = b.double() - b_zero_point.double()
    return _exact_int(ai @ bi)


def softmax_codes(p: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, levels: int):
    """Two-range codes of probabilities ``p`` (``SoftmaxQuantizer.codes``): ``(fine codes, coarse codes)``, uint8,
    one of them 0 at each element; ``lo = round(p / fine)`` is the fine code where it is at most ``levels``,
    else the coarse code is ``clamp(round(p / coarse), 0, levels)``; NaN gives 0 and 0. ``fine`` / ``coarse``:
    float32 steps, their reciprocals taken in float32."""
    x = p.float()
    lo = torch.round(x * (1.0 / fine))
    in_fine = lo <= levels
    hi = torch.round(x * (1.0 / coarse))
    zero = torch.zeros_like(lo)
    c_fine = torch.where(in_fine, lo.clamp(0, levels), zero)
    c_coarse = torch.where(in_fine | torch.isnan(x), zero, hi.clamp(0, levels))
    return c_fine.to(torch.uint8), c_coarse.to(torch.uint8)


def attention_qkv(qkv: torch.Tensor, heads: int, q_mult: float, scale: torch.Tensor, zero_point: torch.Tensor,
                  bits: int, fine: float, coarse: float, levels: int) -> torch.Tensor:
    """Packed attention core on a fused projection's float32 output ``qkv`` ``[B, N, 3 * heads * d]`` (timm
    layout, q not yet scaled): q (times ``q_mult`` in float32), k and v quantized with ``scale`` /
    ``zero_point`` (``[3]`` per tensor or ``[3 * heads]`` per head, in q, k, v order), exact
    ``(q - zq) . (k - zk)^T`` times ``qs * ks``, softmax, two-range codes (:func:`softmax_codes`, steps
    ``fine`` / ``coarse``), exact products of both code ranges with ``v - zv``, ``(fine_acc * fine +
    coarse_acc * coarse) * vs``; a row whose probabilities hold NaN is NaN. Float32 ``[B, N, heads * d]``."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    per = scale.numel() // 3
    x = qkv.float().reshape(b, n, 3, c) * torch.tensor([q_mult, 1.0, 1.0], dtype=torch.float32,
                                                        device=qkv.device).reshape(3, 1)
    codes = quantize(x.reshape(b, n, 3 * per, -1), scale.reshape(-1), zero_point.reshape(-1), bits, 2)
    codes = codes.reshape(b, n, 3, heads, c // heads)
    s = scale.float().reshape(3, per, 1, 1)
    z = zero_point.reshape(3, per, 1, 1)
    scores = matmul_int(codes[:, :, 0].transpose(1, 2), z[0], codes[:, :, 1].permute(0, 2, 3, 1),
                        z[1].transpose(-2, -1)).float() * (s[0] * s[1])
    probs = scores.softmax(dim=-1)
    steps = torch.tensor([fine, coarse], dtype=torch.float32, device=qkv.device)
    c_fine, c_coarse = softmax_codes(probs, steps[0], steps[1], levels)
    vc, zero = codes[:, :, 2].transpose(1, 2), torch.zeros(1, dtype=torch.int32, device=qkv.device)
    out = (matmul_int(c_fine, zero, vc, z[2]).float() * steps[0] + matmul_int(c_coarse, zero, vc, z[2]).float()
           * steps[1]) * s[2]
    out = torch.where(torch.isnan(probs).any(dim=-1, keepdim=True), torch.full_like(out, math.nan), out)
    return out.transpose(1, 2).reshape(b, n, c)
