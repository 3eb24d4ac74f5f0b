"""Fused activation quantization: float ``[M, K]`` -> packed codes (+ per-token scale / zero point).

One launch: per-token min/max, the quantization parameters (bit-for-bit
:func:`reference.token_qparams`), rounding and packing happen in the same program. The same
kernel, with 8-bit slots, writes the NHWC code tensor the implicit-GEMM convolution reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import PackedActivation, code_max, packed_width, storage_bits, symmetric_zero_point
from .. import contract, reference
from .common import check_device, check_float_dtype, rint


@triton.jit
def _act_quant_kernel(x_ptr, out_ptr, scale_in_ptr, zp_in_ptr, scale_out_ptr, zp_out_ptr, mark_ptr,
                      M, K, NB, ROWS_PER_BATCH, stride_b, stride_r, stride_k, stride_out, scale_eps,
                      QMAX: tl.constexpr, SYM_DIV: tl.constexpr, SLOT: tl.constexpr,
                      DYNAMIC: tl.constexpr, SYMMETRIC: tl.constexpr, MARK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    # Non-finite inputs (reference.py): NaN gets code 0, +-Inf saturate; a per-token row holding one gets
    # scale NaN / zero point 0 (2**(bits-1) symmetric); with MARK, mark[row] = NaN for such a row (else 0),
    # which the GEMM / conv epilogues add to their output rows.
    # Row m of the logical [M, K] input starts at (m // ROWS_PER_BATCH) * stride_b +
    # (m % ROWS_PER_BATCH) * stride_r: a plain 2-D matrix, or an NCHW / NHWC tensor seen as [N*H*W, C].
    PB: tl.constexpr = 8 // SLOT
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    r64 = rows.to(tl.int64)
    row_off = (r64 // ROWS_PER_BATCH) * stride_b + (r64 % ROWS_PER_BATCH) * stride_r
    if DYNAMIC:
        # reference.token_qparams -> qparams_from_range, same fp32 operations in the same order
        mn = tl.full([BLOCK_M], float("inf"), tl.float32)
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        bad = tl.zeros([BLOCK_M], tl.int32)
        for k0 in range(0, K, BLOCK_B * PB):
            ks = k0 + tl.arange(0, BLOCK_B * PB)
            m = rmask[:, None] & (ks < K)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + ks[None, :].to(tl.int64) * stride_k, mask=m,
                        other=0.0).to(tl.float32)
            nonfinite = m & ((x != x) | (tl.abs(x) == float("inf")))
            bad = tl.maximum(bad, tl.max(nonfinite.to(tl.int32), axis=1))
            x = tl.where(nonfinite, 0.0, x)
            mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), axis=1))
            mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), axis=1))
        lo = tl.minimum(mn, 0.0)
        hi = tl.maximum(mx, 0.0)
        if SYMMETRIC:
            scale = tl.maximum(tl.div_rn(tl.maximum(-lo, hi), SYM_DIV), scale_eps)
            zpf = tl.full([BLOCK_M], QMAX // 2 + 1, tl.float32)
        else:
            scale = tl.maximum(tl.div_rn(hi - lo, QMAX * 1.0), scale_eps)
            zpf = tl.minimum(tl.maximum(rint(tl.div_rn(-lo, scale)), 0.0), QMAX * 1.0)
            zpf = tl.where(bad > 0, 0.0, zpf)  # (symmetric rows keep 2**(bits-1))
        scale = tl.where(bad > 0, float("nan"), scale)
        tl.store(scale_out_ptr + rows, scale, mask=rmask)
        tl.store(zp_out_ptr + rows, zpf.to(tl.int32), mask=rmask)
    else:
        scale = tl.full([BLOCK_M], 1.0, tl.float32) * tl.load(scale_in_ptr).to(tl.float32)
        zpf = tl.full([BLOCK_M], 1.0, tl.float32) * tl.load(zp_in_ptr).to(tl.int32).to(tl.float32)
    inv = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)  # == torch's 1 / scale in fp32
    bad_rows = tl.zeros([BLOCK_M], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        byte = tl.zeros([BLOCK_M, BLOCK_B], tl.int32)
        for p in tl.static_range(PB):
            ks = bs * PB + p
            m = rmask[:, None] & (ks < K)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + ks[None, :].to(tl.int64) * stride_k, mask=m,
                        other=0.0).to(tl.float32)
            if MARK:
                nonfinite = m & ((x != x) | (tl.abs(x) == float("inf")))
                bad_rows = tl.maximum(bad_rows, tl.max(nonfinite.to(tl.int32), axis=1))
            code = tl.minimum(tl.maximum(rint(x * inv[:, None]) + zpf[:, None], 0.0), QMAX * 1.0)
            code = tl.where(code != code, 0.0, code)  # NaN -> code 0 (the interpreter's maximum keeps NaN)
            code = tl.where(m, code, zpf[:, None])  # padded K slots hold the zero point
            byte = byte | (code.to(tl.int32) << (p * SLOT))
        omask = rmask[:, None] & (bs < NB)[None, :]
        tl.store(out_ptr + r64[:, None] * stride_out + bs[None, :], byte.to(tl.uint8), mask=omask)
    if MARK:
        tl.store(mark_ptr + rows, tl.where(bad_rows > 0, float("nan"), 0.0), mask=rmask)


def _blocks(k_bytes: int) -> tuple[int, int]:
    block_b = min(128, triton.next_power_of_2(max(k_bytes, 1)))
    return min(64, 1024 // block_b), block_b


def launch_act_quant(x: torch.Tensor, m: int, k: int, rows_per_batch: int, strides: tuple[int, int, int],
                     act: reference.ActQuant, slot: int, mark: bool = False):
    """Quantize the ``[m, k]`` view of ``x`` (see the kernel's row addressing) into ``slot``-bit slots.

    Returns ``(codes uint8 [m, packed], scale fp32, zero_point int32)``; the parameters have one
    element (static) or ``m`` (per-token). With ``mark``, a fourth element: fp32 ``[m]``, NaN for the
    rows holding a NaN / Inf and 0 elsewhere (written by the same launch).
    """
    nb = -(-k // (8 // slot))
    out = torch.empty((m, nb), dtype=torch.uint8, device=x.device)
    if act.per_token:
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        zp = torch.empty(m, dtype=torch.int32, device=x.device)
        s_in, z_in = scale, zp  # unused by the kernel
    else:
        s_in, z_in = act.scale.reshape(-1).to(x.device), act.zero_point.reshape(-1).to(x.device)
        scale, zp = s_in.float(), z_in.to(torch.int32)
    qmax = code_max(act.bits)
    block_m, block_b = _blocks(nb)
    marks = torch.empty(m if mark else 0, dtype=torch.float32, device=x.device)
    if m > 0:
        _act_quant_kernel[(triton.cdiv(m, block_m),)](
            x, out, s_in, z_in, scale, zp, marks if mark else scale, m, k, nb, rows_per_batch, *strides, nb,
            contract.SCALE_EPS, QMAX=qmax, SYM_DIV=float(symmetric_zero_point(act.bits) - 1), SLOT=slot,
            DYNAMIC=act.per_token, SYMMETRIC=act.symmetric, MARK=mark, BLOCK_M=block_m, BLOCK_B=block_b,
            enable_fp_fusion=False)  # no FMA: x * inv must round before rint, as in torch
    return (out, scale, zp, marks) if mark else (out, scale, zp)


def quantize_activation(x2d: torch.Tensor, act: reference.ActQuant) -> PackedActivation:
    """Triton twin of :func:`reference.quantize_activation` (one launch)."""
    check_float_dtype("x", x2d)
    check_device(x=x2d)
    m, k = x2d.shape
    data, scale, zp = launch_act_quant(x2d, m, k, max(m, 1), (0, x2d.stride(0), x2d.stride(1)), act,
                                       storage_bits(act.bits))
    assert data.shape[1] == packed_width(k, act.bits)
    return PackedActivation(data, scale, zp, act.bits, k)
