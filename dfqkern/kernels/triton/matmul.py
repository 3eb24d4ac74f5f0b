"""Exact int32 attention matmul ``(a - za) @ (b - zb)`` of two uint8 code tensors (q.k^T, attn.v).

The leading dims are flattened into one batch ``B``, one launch: program ``pid`` computes output tile
``pid % tiles`` of batch element ``pid // tiles`` (grid axis 0 takes 2**31 - 1 programs, more tiles than
any output that fits in memory). Operands are read through their strides, zero points as ``[B, M]`` /
``[B, N]`` int32 views (stride 0 where they broadcast).

The int8 ``tl.dot`` is the one exact integer dot on every target, and ``code - zp`` spans [-255, 255],
so both operands are centred at 128 and the zero points folded back with row / column sums:
``sum (a - za)(b - zb) = sum a_c b_c + db * sum a_c + da * sum b_c + K * da * db`` with
``a_c = a - 128``, ``da = 128 - za`` (same for b). All arithmetic is int32 modulo 2**32, so the result
is exact whenever it fits in int32 (the contract's ``MATMUL_MAX_K`` guarantees it for zero points in
[0, 255]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cuda import batched_operands  # pure torch: the CUDA backend flattens its operands the same way
from .common import check_device
from .gemm import WIDE_CENTER, autotune, m_bucket


@autotune(key=["M_BUCKET", "N_BUCKET", "K"])
@triton.jit
def _matmul_int_kernel(a_ptr, b_ptr, za_ptr, zb_ptr, out_ptr, M, N, K, M_BUCKET, N_BUCKET,
                       stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                       stride_zab, stride_zam, stride_zbb, stride_zbn,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_M belongs to the shared GEMM configs; attention tiles are small, so plain row-major order.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    batch = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    rows = (tile // num_n) * BM + tl.arange(0, BM)
    cols = (tile % num_n) * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    a_base = a_ptr + batch * stride_ab + rows.to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + batch * stride_bb + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BM, BN], tl.int32)
    a_sum = tl.zeros([BM], tl.int32)
    b_sum = tl.zeros([BN], tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        am = rmask[:, None] & kmask[None, :]
        a = tl.load(a_base + ks.to(tl.int64)[None, :] * stride_ak, mask=am, other=0).to(tl.int32)
        a = tl.where(am, a - WIDE_CENTER, 0)  # padding contributes nothing to the dot or the sums
        bm = kmask[:, None] & cmask[None, :]
        b = tl.load(b_base + ks.to(tl.int64)[:, None] * stride_bk, mask=bm, other=0).to(tl.int32)
        b = tl.where(bm, b - WIDE_CENTER, 0)
        a_sum += tl.sum(a, axis=1)
        b_sum += tl.sum(b, axis=0)
        acc = tl.dot(a.to(tl.int8), b.to(tl.int8), acc, out_dtype=tl.int32)
    za = tl.load(za_ptr + batch * stride_zab + rows * stride_zam, mask=rmask, other=0)
    zb = tl.load(zb_ptr + batch * stride_zbb + cols * stride_zbn, mask=cmask, other=0)
    da = WIDE_CENTER - za
    db = WIDE_CENTER - zb
    acc += a_sum[:, None] * db[None, :] + da[:, None] * b_sum[None, :] + (K * da)[:, None] * db[None, :]
    out_off = batch * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_off, acc, mask=rmask[:, None] & cmask[None, :])


def matmul_int(a: torch.Tensor, a_zero_point: torch.Tensor, b: torch.Tensor,
               b_zero_point: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`reference.matmul_int`: exact int32 ``[..., M, N]`` (one launch)."""
    check_device(a=a, b=b, a_zero_point=a_zero_point, b_zero_point=b_zero_point)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if a.numel() == 0 or b.numel() == 0:  # K = 0: every sum is empty
        return torch.zeros((*a.shape[:-1], n), dtype=torch.int32, device=a.device)
    a3, za, b3, zb = batched_operands(a, a_zero_point, b, b_zero_point)
    batch = a3.shape[0]
    out = torch.empty((batch, m, n), dtype=torch.int32, device=a.device)
    grid = lambda meta: (batch * triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _matmul_int_kernel[grid](a3, b3, za, zb, out, m, n, k, m_bucket(m), m_bucket(n),
                             *a3.stride(), *b3.stride(), *za.stride(), *zb.stride())
    return out.reshape(*a.shape[:-1], n)
