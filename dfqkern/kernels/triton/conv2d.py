"""Packed Conv2d: implicit GEMM for ``groups=1`` and a direct kernel for depthwise convolutions.

The implicit GEMM walks ``K = kh * kw * C`` in ``(kh, kw, c)`` order, the order of the packed
weight rows (:func:`dfqkern.formats.conv_weight_to_matrix`), so the weight side is the packed GEMM's.
The activation tile is gathered from the code tensor through its strides: ``conv2d`` quantizes the
float input straight into NHWC codes (contiguous along ``c``, the innermost K index) and writes
the output in the input's memory format (NCHW or channels-last). Out-of-image taps read the
activation zero point, so they contribute exactly 0 (reference.conv2d_int pads ``x - zp`` with 0).

Activation codes are centered at 128 (any uint8 code fits int8 then) and corrected with row
sums, see :mod:`.gemm`. Other groupings (``1 < groups < C``) raise :class:`Unsupported`; dispatch
then falls back to the next backend (the torch reference on CUDA tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import PackedWeight
from .. import reference
from ..contract import conv_output_size, pair, require_integer_dtype
from .act_quant import launch_act_quant
from .common import check_device, check_float_dtype, load_codes
from .gemm import (WIDE_CENTER, autotune, check_out_dtype, m_bucket, store_output, tile_ids, tile_span,
                   weight_operand, weight_tile, zero_point_correction)


@autotune(key=["M_BUCKET", "N", "K", "C", "KW", "W_SLOT", "FLOAT_OUT"])
@triton.jit
def _conv_kernel(x_ptr, w_ptr, out_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_zp_ptr, w_center_ptr, w_sum_ptr,
                 bias_ptr, mark_ptr, M, N, K, M_BUCKET, C, H, W, OH, OW, KH, KW,
                 sxn, sxc, sxh, sxw, son, soc, soh, sow, stride_wn, SH, SW, PH, PW, DH, DW,
                 W_SLOT: tl.constexpr, W_WIDE: tl.constexpr, FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 POISON: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rows, cols, rmask, cmask = tile_span(pid_m, pid_n, M, N, BM, BN)
    nb, oh, ow = output_pixels(rows, OH, OW)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    a_zp = tl.load(a_zp_ptr).to(tl.int32)
    a_zp_rows = tl.full([BM], 0, tl.int32) + a_zp
    w_zp = tl.load(w_zp_ptr + cols, mask=cmask, other=0)
    w_center = tl.load(w_center_ptr + cols, mask=cmask, other=0)
    w_sum = tl.load(w_sum_ptr + cols, mask=cmask, other=0)
    x_row = x_ptr + nb * sxn
    acc = tl.zeros([BM, BN], tl.int32)
    a_sum = tl.zeros([BM], tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kc = ks % C
        kw = (ks // C) % KW
        kh = ks // (C * KW)
        ih = ih0[:, None] + (kh * DH)[None, :]
        iw = iw0[:, None] + (kw * DW)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        valid = rmask[:, None] & (ks < K)[None, :]
        ptrs = x_row[:, None] + kc.to(tl.int64)[None, :] * sxc + ih * sxh + iw * sxw
        code = tl.load(ptrs, mask=valid & inside, other=0).to(tl.int32)
        code = tl.where(inside, code, a_zp)  # padding taps: (zp - zp) = 0
        a = tl.where(valid, code - WIDE_CENTER, 0)
        if W_WIDE:
            a_sum += tl.sum(a, axis=1)
        w = weight_tile(w_ptr, cols, ks, N, K, stride_wn, w_center, W_SLOT)
        acc = tl.dot(a.to(tl.int8), w, acc, out_dtype=tl.int32)
    acc = zero_point_correction(acc, a_sum, a_zp_rows, w_zp, w_center, w_sum, K, True, W_WIDE)
    store_conv_output(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mark_ptr, rows, cols, rmask, nb, oh, ow,
                      M, N, H, W, KH, KW, son, soc, soh, sow, SH, SW, PH, PW, DH, DW, FLOAT_OUT, HAS_BIAS, POISON)


@triton.jit
def output_pixels(rows, OH, OW):
    """(image, output row, output column) of each GEMM row: one row per output pixel."""
    nb = (rows // (OH * OW)).to(tl.int64)
    pix = rows % (OH * OW)
    return nb, pix // OW, pix % OW


@triton.jit
def window_tap(oh, ow, t, H, W, KW, SH, SW, PH, PW, DH, DW):
    """Input pixel ``(ih, iw)`` under tap ``t`` (row-major over the KH x KW window) of output pixel
    ``(oh, ow)``, and whether it lies inside the image (padding taps do not)."""
    ih = oh * SH - PH + (t // KW) * DH
    iw = ow * SW - PW + (t % KW) * DW
    return ih, iw, (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def window_poison(mark_ptr, nb, oh, ow, rmask, H, W, KH, KW, SH, SW, PH, PW, DH, DW):
    """Per output pixel: the sum of ``mark - mark`` over its window's input pixels (``mark``: fp32
    ``[N*H*W]``, NaN at pixels holding a NaN / Inf), i.e. 0, or NaN when the window covers one."""
    poison = tl.zeros(oh.shape, tl.float32)
    for t in range(0, KH * KW):
        ih, iw, inside = window_tap(oh, ow, t, H, W, KW, SH, SW, PH, PW, DH, DW)
        mk = tl.load(mark_ptr + nb * (H * W) + ih * W + iw, mask=rmask & inside, other=0.0)
        poison += mk - mk
    return poison


@triton.jit
def store_conv_output(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mark_ptr, rows, cols, rmask, nb, oh, ow,
                      M, N, H, W, KH, KW, son, soc, soh, sow, SH, SW, PH, PW, DH, DW,
                      FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, POISON: tl.constexpr):
    """Both conv kernels' epilogue: the output tile at pixel ``(nb, oh, ow)`` x channel ``cols`` (output
    strides ``so*``), NaN where the pixel's window covers a non-finite input when ``POISON``."""
    out_off = (nb * son + oh * soh + ow * sow)[:, None] + cols.to(tl.int64)[None, :] * soc
    poison = 0.0
    if POISON:
        poison = window_poison(mark_ptr, nb, oh, ow, rmask, H, W, KH, KW, SH, SW, PH, PW, DH, DW)
    store_output(acc, out_ptr, out_off, rows, cols, M, N, a_scale_ptr, 0, w_scale_ptr, bias_ptr,
                 FLOAT_OUT, HAS_BIAS, True, poison, POISON)


@triton.jit
def _depthwise_kernel(x_ptr, w_ptr, out_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_zp_ptr, bias_ptr, mark_ptr,
                      M, N, H, W, OH, OW, KH, KW, MULT,
                      sxn, sxc, sxh, sxw, son, soc, soh, sow, stride_wn, SH, SW, PH, PW, DH, DW,
                      W_SLOT: tl.constexpr, FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, POISON: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    """Direct depthwise conv: output channel ``o`` reads input channel ``o // MULT``; int32 multiply-adds."""
    rows, cols, rmask, cmask = tile_span(tl.program_id(0), tl.program_id(1), M, N, BM, BN)
    nb, oh, ow = output_pixels(rows, OH, OW)
    a_zp = tl.load(a_zp_ptr).to(tl.int32)
    w_zp = tl.load(w_zp_ptr + cols, mask=cmask, other=0)
    x_base = (nb * sxn)[:, None] + ((cols // MULT).to(tl.int64) * sxc)[None, :]
    w_row = cols.to(tl.int64) * stride_wn
    acc = tl.zeros([BM, BN], tl.int32)
    for t in range(0, KH * KW):
        ih, iw, inside = window_tap(oh, ow, t, H, W, KW, SH, SW, PH, PW, DH, DW)
        m = (rmask & inside)[:, None] & cmask[None, :]
        code = tl.load(x_ptr + x_base + (ih * sxh + iw * sxw)[:, None], mask=m, other=0).to(tl.int32)
        a = tl.where(m, code - a_zp, 0)
        w = load_codes(w_ptr, w_row, t, cmask, W_SLOT) - w_zp
        acc += a * w[None, :]
    store_conv_output(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mark_ptr, rows, cols, rmask, nb, oh, ow,
                      M, N, H, W, KH, KW, son, soc, soh, sow, SH, SW, PH, PW, DH, DW, FLOAT_OUT, HAS_BIAS, POISON)


# ----------------------------------------------------------------------------- host side

def _geometry(x_shape, pw: PackedWeight, stride, padding, dilation, groups: int) -> dict:
    (sh, sw), (ph, pwd), (dh, dw) = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    n, c, h, w = x_shape
    o, cg, kh, kw = pw.shape
    depthwise = groups > 1 and cg == 1 and groups == c and o % c == 0
    if groups != 1 and not depthwise:
        raise reference.Unsupported(f"triton conv2d supports groups=1 and depthwise (groups == channels), "
                                    f"got groups={groups} with {c} channels")
    oh, ow = conv_output_size(h, w, kh, kw, (sh, sw), (ph, pwd), (dh, dw))
    return dict(n=n, c=c, h=h, w=w, o=o, kh=kh, kw=kw, oh=oh, ow=ow, sh=sh, sw=sw, ph=ph, pw=pwd, dh=dh, dw=dw,
                depthwise=depthwise)


def _launch(codes, x_strides, a_scale, a_zp, pw: PackedWeight, g: dict, bias, out: torch.Tensor,
            float_out: bool, marks: torch.Tensor | None = None):
    wt = weight_operand(pw)
    m = g["n"] * g["oh"] * g["ow"]
    geo = (g["sh"], g["sw"], g["ph"], g["pw"], g["dh"], g["dw"])
    o_strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
    bias_arg = bias if bias is not None else wt["scale"]
    mark_arg = marks if marks is not None else wt["scale"]
    if g["depthwise"]:
        bm, bn = 32, 16
        grid = (triton.cdiv(m, bm), triton.cdiv(g["o"], bn))
        _depthwise_kernel[grid](
            codes, wt["data"], out, a_scale, a_zp, wt["scale"], wt["zp"], bias_arg, mark_arg,
            m, g["o"], g["h"], g["w"], g["oh"], g["ow"], g["kh"], g["kw"], g["o"] // g["c"],
            *x_strides, *o_strides, wt["data"].stride(0), *geo,
            W_SLOT=wt["slot"], FLOAT_OUT=float_out, HAS_BIAS=bias is not None, POISON=marks is not None,
            BM=bm, BN=bn, enable_fp_fusion=False)
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(g["o"], meta["BN"]),)  # noqa: E731
    _conv_kernel[grid](
        codes, wt["data"], out, a_scale, a_zp, wt["scale"], wt["zp"], wt["center"], wt["sum"], bias_arg, mark_arg,
        m, g["o"], pw.k, m_bucket(m), g["c"], g["h"], g["w"], g["oh"], g["ow"], g["kh"], g["kw"],
        *x_strides, *o_strides, wt["data"].stride(0), *geo,
        W_SLOT=wt["slot"], W_WIDE=wt["wide"], FLOAT_OUT=float_out, HAS_BIAS=bias is not None,
        POISON=marks is not None, enable_fp_fusion=False)  # epilogue rounds like the reference (no FMA)
    return out


def _out_like(x: torch.Tensor, g: dict, dtype: torch.dtype) -> torch.Tensor:
    fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)
    return torch.empty((g["n"], g["o"], g["oh"], g["ow"]), dtype=dtype, device=x.device, memory_format=fmt)


def conv2d_int(x_codes: torch.Tensor, x_zero_point: torch.Tensor, pw: PackedWeight, stride=1, padding=0,
               dilation=1, groups: int = 1) -> torch.Tensor:
    """Triton twin of :func:`reference.conv2d_int` (uint8 codes, NCHW or channels-last; exact int32)."""
    if x_codes.dtype != torch.uint8:
        raise reference.Unsupported(f"triton conv2d_int takes uint8 codes, got {x_codes.dtype}")
    g = _geometry(tuple(x_codes.shape), pw, stride, padding, dilation, groups)
    zp = torch.as_tensor(x_zero_point, device=x_codes.device).reshape(-1)
    check_device(x_codes=x_codes, weight=pw.data)
    out = _out_like(x_codes, g, torch.int32)
    return _launch(x_codes, tuple(x_codes.stride()), zp, zp, pw, g, None, out, float_out=False)


def conv2d(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
           act: reference.ActQuant | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton twin of :func:`reference.conv2d`: quantize into NHWC codes (1 launch) + conv with epilogue (1 launch)."""
    g = _geometry(tuple(x.shape), pw, stride, padding, dilation, groups)
    if act is None:
        raise reference.Unsupported("triton conv2d needs quantized activations (act=None is weight-only)")
    check_float_dtype("x", x)
    require_integer_dtype("act.zero_point", act.zero_point)
    out_dtype = out_dtype or x.dtype
    check_out_dtype(out_dtype)
    check_device(x=x)
    if x.stride(2) != x.shape[3] * x.stride(3):  # (h, w) must merge into one pixel index
        x = x.contiguous()
    n, c, h, w = x.shape
    # marks: fp32 [N*H*W], NaN at input pixels holding a NaN / Inf (same launch); the epilogue turns the
    # output pixels whose window covers one into NaN (a KH*KW read of marks per output row, after the K loop)
    codes, scale, zp, marks = launch_act_quant(x, n * h * w, c, h * w, (x.stride(0), x.stride(3), x.stride(1)), act,
                                               8, mark=True)
    nhwc_strides = (h * w * c, 1, w * c, c)  # codes [N*H*W, C] seen as N, C, H, W strides
    out = _out_like(x, g, out_dtype)
    return _launch(codes, nhwc_strides, scale, zp, pw, g, None if bias is None else bias.reshape(-1), out,
                   float_out=True, marks=marks)
