"""Packed GEMM ``y = dequant(x_q . W_q)`` for W2/W3/W4/W8 weights and A4/A8 activations.

Both operands stay in the canonical kpack-lsb-v1 layout and are unpacked in registers. The
int8 ``tl.dot`` needs signed 8-bit operands, so codes are *centered* before the dot:

* W2..W4 and A4 codes minus their zero point always fit int8 (|c - z| <= 15): center = zero point.
* W8 and A8 codes minus an arbitrary zero point span [-255, 255]: center = 128 instead and fix the
  result with row sums, since ``sum (a - za)(w - zw) = sum a_c w_c + dw * sum a_c + da * sum w_c
  + K * da * dw`` with ``a_c = a - ca``, ``da = ca - za`` (same for w).

The weight-side constants (center, ``sum w_c``) are derived once per weight and cached in
``pw.cache["triton"]``; the activation row sum is accumulated in the main loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import PackedActivation, PackedWeight, storage_bits
from .. import reference
from .act_quant import launch_act_quant, quantize_activation
from .common import INTERPRET, check_device, check_float_dtype, load_codes

_WIDE = 128
WIDE_CENTER = tl.constexpr(_WIDE)  # globals read by kernels must be constexpr


# ----------------------------------------------------------------------------- shared device pieces

@triton.jit
def weight_tile(w_ptr, cols, ks, N, K, stride_wn, w_center, W_SLOT: tl.constexpr):
    """Centered int8 weight tile ``[BK, BN]`` (0 outside the matrix)."""
    m = (ks < K)[:, None] & (cols < N)[None, :]
    w = load_codes(w_ptr, cols.to(tl.int64)[None, :] * stride_wn, ks[:, None], m, W_SLOT)
    return tl.where(m, w - w_center[None, :], 0).to(tl.int8)


@triton.jit
def zero_point_correction(acc, a_sum, a_zp, w_zp, w_center, w_sum, K, A_WIDE: tl.constexpr,
                          W_WIDE: tl.constexpr):
    """Add the row-sum terms that undo centering at 128 (see the module docstring)."""
    if W_WIDE:
        dw = w_center - w_zp
        acc += a_sum[:, None] * dw[None, :]
    if A_WIDE:
        da = WIDE_CENTER - a_zp
        acc += da[:, None] * w_sum[None, :]
        if W_WIDE:
            acc += (K * da)[:, None] * dw[None, :]
    return acc


@triton.jit
def store_output(acc, out_ptr, out_off, rows, cols, M, N, a_scale_ptr, A_PSTRIDE, w_scale_ptr, bias_ptr,
                 FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, A_SCALED: tl.constexpr, poison,
                 POISON: tl.constexpr):
    """int32 result, or reference._epilogue: ``acc * (a_scale * w_scale) + bias`` in fp32, cast on store
    (``acc * w_scale + bias`` when not ``A_SCALED``: float activations). With ``POISON``, ``poison``
    (fp32 ``[BM]``: 0, or NaN for an output row fed by a non-finite input) is added to each row."""
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    if FLOAT_OUT:
        sw = tl.load(w_scale_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if A_SCALED:
            sa = tl.load(a_scale_ptr + rows * A_PSTRIDE, mask=rmask, other=0.0).to(tl.float32)
            y = acc.to(tl.float32) * (sa[:, None] * sw[None, :])
        else:
            y = acc * sw[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if POISON:
            y = y + poison[:, None]
        tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_off, acc, mask=mask)


@triton.jit
def tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each weight column tile while it sits in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def tile_span(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Output rows and columns of tile ``(pid_m, pid_n)`` and their in-bounds masks."""
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    return rows, cols, rows < M, cols < N


# ----------------------------------------------------------------------------- autotuning

def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


# Interpreter: one small tile so CPU tests stay fast and still walk several K / N / M tiles.
INTERPRETER_CONFIGS = [_config(16, 32, 32, 1, 1, group_m=2)]

GPU_CONFIGS = [
    _config(16, 32, 256, 4, 4), _config(16, 64, 128, 4, 4), _config(16, 64, 256, 4, 3),
    _config(16, 128, 128, 4, 4), _config(32, 64, 128, 4, 4), _config(32, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4), _config(64, 128, 64, 4, 4), _config(64, 128, 128, 4, 3),
    _config(128, 128, 64, 8, 3), _config(128, 128, 128, 8, 3), _config(128, 256, 64, 8, 3),
]


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (small M wants BM=16, short K needs no BK=256)."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    bm_max = max(16, triton.next_power_of_2(m))
    bm_min = 64 if m >= 512 else 16
    keep = [c for c in configs
            if bm_min <= c.kwargs["BM"] <= bm_max and c.kwargs["BN"] <= max(32, triton.next_power_of_2(n))
            and c.kwargs["BK"] <= max(64, triton.next_power_of_2(k))]
    return keep or configs[:1]


def autotune(key):
    """Autotuner over GPU_CONFIGS (pruned by problem size); a single fixed config under the interpreter."""
    configs = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune_configs})


def m_bucket(m: int) -> int:
    """Autotune key for M: one tuning per power of two instead of per token count."""
    return triton.next_power_of_2(max(m, 1))


# ----------------------------------------------------------------------------- the GEMM kernel

@autotune(key=["M_BUCKET", "N", "K", "A_SLOT", "W_SLOT", "FLOAT_OUT"])
@triton.jit
def _linear_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_zp_ptr, w_center_ptr, w_sum_ptr,
                   bias_ptr, mark_ptr, M, N, K, M_BUCKET, stride_am, stride_wn, stride_om, stride_on, A_PSTRIDE,
                   A_SLOT: tl.constexpr, W_SLOT: tl.constexpr, A_WIDE: tl.constexpr, W_WIDE: tl.constexpr,
                   FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, POISON: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rows, cols, rmask, cmask = tile_span(pid_m, pid_n, M, N, BM, BN)
    a_zp = tl.load(a_zp_ptr + rows * A_PSTRIDE, mask=rmask, other=0).to(tl.int32)
    if A_WIDE:
        a_center = tl.full([BM], WIDE_CENTER, tl.int32)
    else:
        a_center = a_zp
    w_zp = tl.load(w_zp_ptr + cols, mask=cmask, other=0)
    w_center = tl.load(w_center_ptr + cols, mask=cmask, other=0)
    w_sum = tl.load(w_sum_ptr + cols, mask=cmask, other=0)
    a_row = rows.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros([BM, BN], tl.int32)
    a_sum = tl.zeros([BM], tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        am = rmask[:, None] & (ks < K)[None, :]
        a = load_codes(a_ptr, a_row, ks[None, :], am, A_SLOT)
        a = tl.where(am, a - a_center[:, None], 0)
        if W_WIDE:
            a_sum += tl.sum(a, axis=1)
        w = weight_tile(w_ptr, cols, ks, N, K, stride_wn, w_center, W_SLOT)
        acc = tl.dot(a.to(tl.int8), w, acc, out_dtype=tl.int32)
    acc = zero_point_correction(acc, a_sum, a_zp, w_zp, w_center, w_sum, K, A_WIDE, W_WIDE)
    out_off = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    poison = 0.0
    if POISON:
        poison = tl.load(mark_ptr + rows, mask=rmask, other=0.0)
    store_output(acc, out_ptr, out_off, rows, cols, M, N, a_scale_ptr, A_PSTRIDE, w_scale_ptr, bias_ptr,
                 FLOAT_OUT, HAS_BIAS, True, poison, POISON)


@autotune(key=["M_BUCKET", "N", "K", "W_SLOT", "DOT_DTYPE"])
@triton.jit
def _linear_weight_only_kernel(x_ptr, w_ptr, out_ptr, w_scale_ptr, w_zp_ptr, bias_ptr, M, N, K, M_BUCKET,
                               stride_xm, stride_xk, stride_wn, stride_om, stride_on,
                               W_SLOT: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Float activations times ``(w - zw)`` (small integers, exact in fp16 / bf16 / fp32); the per-row
    weight scale is applied once in the epilogue."""
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rows, cols, rmask, cmask = tile_span(pid_m, pid_n, M, N, BM, BN)
    w_zp = tl.load(w_zp_ptr + cols, mask=cmask, other=0)
    x_row = rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        xm = rmask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + x_row + ks[None, :] * stride_xk, mask=xm, other=0.0).to(DOT_DTYPE)
        wm = (ks < K)[:, None] & cmask[None, :]
        w = load_codes(w_ptr, cols.to(tl.int64)[None, :] * stride_wn, ks[:, None], wm, W_SLOT)
        w = tl.where(wm, w - w_zp[None, :], 0).to(DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")  # no tf32: match the fp32 reference
        else:
            acc = tl.dot(x, w, acc)
    out_off = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    store_output(acc, out_ptr, out_off, rows, cols, M, N, w_scale_ptr, 0, w_scale_ptr, bias_ptr, True, HAS_BIAS, False,
                 0.0, False)


# ----------------------------------------------------------------------------- host side

def weight_operand(pw: PackedWeight) -> dict:
    """Kernel-side constants of a packed weight, derived once and cached in ``pw.cache["triton"]``."""
    c = pw.cache.get("triton")
    if c is not None and c["data"].device == pw.data.device and c["data"].data_ptr() == pw.data.data_ptr():
        return c
    wide = pw.bits > 4  # 8-bit codes minus the zero point do not fit int8
    zp = pw.zero_point.reshape(-1).to(device=pw.data.device, dtype=torch.int32).contiguous()
    center = torch.full_like(zp, _WIDE) if wide else zp
    sums = (pw.codes().to(torch.int64) - center[:, None]).sum(dim=1).to(torch.int32)
    c = {"data": pw.data.contiguous(), "scale": pw.scale.reshape(-1).float().contiguous(), "zp": zp,
         "center": center, "sum": sums, "slot": storage_bits(pw.bits), "wide": wide}
    pw.cache["triton"] = c
    return c


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in (torch.float32, torch.float16) and not (out_dtype == torch.bfloat16 and not INTERPRET):
        raise reference.Unsupported(f"out_dtype {out_dtype} (the triton epilogue writes float32 or float16, "
                                    "and bfloat16 outside the interpreter)")


def _gemm(pa: PackedActivation, pw: PackedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype | None,
          marks: torch.Tensor | None = None):
    """int32 ``[M, N]`` when ``out_dtype`` is None, else the scaled float output (plus ``marks``, fp32
    ``[M]`` of 0 / NaN, added to each output row when given)."""
    check_device(activation=pa.data, weight=pw.data)
    w = weight_operand(pw)
    a = pa.data if pa.data.stride(-1) == 1 else pa.data.contiguous()
    m, n = a.shape[0], pw.n
    a_scale = pa.scale.reshape(-1)
    a_zp = pa.zero_point.reshape(-1)
    float_out = out_dtype is not None
    out = torch.empty((m, n), dtype=out_dtype if float_out else torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    a_bits_slot = storage_bits(pa.bits)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _linear_kernel[grid](
        a, w["data"], out, a_scale, a_zp, w["scale"], w["zp"], w["center"], w["sum"],
        bias if bias is not None else w["scale"], marks if marks is not None else w["scale"],
        m, n, pw.k, m_bucket(m), a.stride(0), w["data"].stride(0),
        out.stride(0), out.stride(1), 0 if a_scale.numel() == 1 else 1,
        A_SLOT=a_bits_slot, W_SLOT=w["slot"], A_WIDE=pa.bits > 4, W_WIDE=w["wide"], FLOAT_OUT=float_out,
        HAS_BIAS=bias is not None, POISON=marks is not None,
        enable_fp_fusion=False)  # epilogue rounds like the reference (no FMA)
    return out


def _weight_only(x2d: torch.Tensor, pw: PackedWeight, bias, out_dtype) -> torch.Tensor:
    check_float_dtype("x", x2d)
    w = weight_operand(pw)
    m, n = x2d.shape[0], pw.n
    out = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    if m == 0 or n == 0:
        return out
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x2d.dtype, tl.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _linear_weight_only_kernel[grid](
        x2d, w["data"], out, w["scale"], w["zp"], bias if bias is not None else w["scale"], m, n, pw.k, m_bucket(m),
        x2d.stride(0), x2d.stride(1), w["data"].stride(0), out.stride(0), out.stride(1),
        W_SLOT=w["slot"], DOT_DTYPE=dot, HAS_BIAS=bias is not None)
    return out


def linear_int(pa: PackedActivation, pw: PackedWeight) -> torch.Tensor:
    """Triton twin of :func:`reference.linear_int`: exact int32 ``[M, N]``."""
    return _gemm(pa, pw, None, None)


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
           act: reference.ActQuant | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton twin of :func:`reference.linear`: activation-quantize launch + GEMM launch with fused epilogue.

    Weight-only (``act=None``): one launch, float ``x`` times the unpacked integer weight in
    ``x``'s precision (fp32 without tf32), fp32 accumulation, weight scale in the epilogue.
    """
    out_dtype = out_dtype or x.dtype
    check_out_dtype(out_dtype)
    check_device(x=x)
    lead = x.shape[:-1]
    bias_c = None if bias is None else bias.reshape(-1)
    if act is None:
        return _weight_only(x.reshape(-1, pw.k), pw, bias_c, out_dtype).reshape(*lead, pw.n)
    x2d = x.reshape(-1, pw.k)
    check_float_dtype("x", x2d)
    m, k = x2d.shape
    # one launch: codes + per-row marks (NaN for a row holding NaN / Inf; the epilogue adds them)
    data, scale, zp, marks = launch_act_quant(x2d, m, k, max(m, 1), (0, x2d.stride(0), x2d.stride(1)), act,
                                              storage_bits(act.bits), mark=True)
    pa = PackedActivation(data, scale, zp, act.bits, k)
    return _gemm(pa, pw, bias_c, out_dtype, marks).reshape(*lead, pw.n)
