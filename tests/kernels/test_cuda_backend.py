"""The CUDA backend (dfqkern.kernels.cuda, csrc/cuda) against the torch reference.

Two parts:

* CPU (always): a bit-level emulation of one warp of the packed GEMM. It builds the weight layout
  with the backend's own builder, feeds the activation tile through the ``ldmatrix`` addressing of
  ``gemm.cuh``, decodes the B registers with the same shifts / masks / ``__vsub4`` as ``mma_step``,
  runs ``mma.sync`` as the PTX ISA defines its fragments, applies the epilogue corrections, and
  compares with :func:`reference.linear_int`. It also replays the implicit-GEMM conv's im2col
  index math against :func:`reference.conv2d_int`. This checks layouts, decoders and the
  zero-point algebra; it cannot check shared-memory addressing or the cp.async pipeline.
* GPU (skipped without CUDA or without the compiled ops): what is particular to the CUDA kernels
  (both A4 instruction paths, split-K, the layout cache, every float dtype) against the reference on
  fresh random data; the op suites (test_<op>.py) run their cuda rows too. Exact: codes, int32 GEMM / conv results, fake-quant forward, grad_x, hard AdaRound.
  Float Linear / Conv2d outputs use the reference's fp32 epilogue order (``__fmul_rn``/``__fadd_rn``):
  allowed 1 ulp of the output dtype. LSQ / AdaRound reductions: fp32 sums in another order
  (``1e-6 * sum|terms|``). Soft AdaRound: the build's fast-math ``expf`` vs torch's: rtol 1e-5.

Random inputs are fresh each run; pin them with ``DFQKERN_TEST_SEED`` (printed on failure).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from dfqkern.formats import PackedActivation, PackedWeight, pack_codes, symmetric_zero_point
from dfqkern.kernels import cuda as C
from dfqkern.kernels import dispatch, reference as R
from dfqkern.kernels.reference import ActQuant, Unsupported

SEED = int(os.environ.get("DFQKERN_TEST_SEED", random.randrange(2 ** 31)))
GPU = C.is_available()
gpu = pytest.mark.skipif(
    not GPU, reason="needs a CUDA device and dfqkern._C built with CUDA kernels "
    f"(cuda available: {torch.cuda.is_available()}, extension ops: {C.extension_has_ops()})")


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(hash((SEED,) + salt) & 0x7FFFFFFF)


def _msg(**kw) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


# ============================================================================ CPU: fragment emulator
MASK = 0xFFFFFFFF


def _field(word: int, i: int, width: int) -> int:
    return (word >> (i * width)) & ((1 << width) - 1)


def _signed(v: int, width: int) -> int:
    return v - (1 << width) if v >> (width - 1) else v


def _vsub4(a: int, b: int) -> int:  # __vsub4: per-byte a - b mod 256
    return sum((((_field(a, i, 8) - _field(b, i, 8)) & 0xFF) << (8 * i)) for i in range(4))


def _u2_nibbles_to_s4_centered(u: int) -> int:  # common.cuh
    v = u ^ 0x22222222
    sign = (v >> 1) & 0x11111111
    return (v | (sign * 12)) & MASK


def _nibble_sum(x: int) -> int:  # common.cuh
    pairs = (x & 0x0F0F0F0F) + ((x >> 4) & 0x0F0F0F0F)
    return sum(_field(pairs, i, 8) for i in range(4))


def ldmatrix_x4(rows: list[bytes], byte0: int) -> list[list[int]]:
    """ldmatrix.x4 as gemm.cuh addresses it: lane l points at row (l & 15), byte byte0 + 16 * (l >> 4).

    PTX: lanes 8j..8j+7 give matrix j's row addresses; thread t gets word t % 4 of row t / 4 of matrix j.
    """
    addr = [(lane & 15, byte0 + 16 * (lane >> 4)) for lane in range(32)]
    regs = []
    for t in range(32):
        r = []
        for j in range(4):
            row, b = addr[8 * j + t // 4]
            b += 4 * (t % 4)
            r.append(int.from_bytes(rows[row][b:b + 4], "little"))
        regs.append(r)
    return regs


def mma(kind: str, a_regs, b_regs, acc) -> None:
    """mma.sync m16n8k32 (u8 x s8) or m16n8k64 (u4 x s4), built from the PTX ISA fragment tables."""
    width, k = (8, 32) if kind == "u8s8" else (4, 64)
    per = 32 // width
    A = [[None] * k for _ in range(16)]
    B = [[None] * 8 for _ in range(k)]
    for t in range(32):
        g, q = t >> 2, t & 3
        for i in range(4 * per):  # A elements a_i
            if width == 8:
                row = g if (i < 4 or 8 <= i < 12) else g + 8
                col = 4 * q + (i & 3) + (16 if i >= 8 else 0)
            else:
                row = g if (i < 8 or 16 <= i < 24) else g + 8
                col = 8 * q + (i & 7) + (32 if i >= 16 else 0)
            assert A[row][col] is None
            A[row][col] = _field(a_regs[t][i // per], i % per, width)  # unsigned A
        for i in range(2 * per):  # B elements b_i
            kk = (4 * q + (i & 3) + (16 if i >= 4 else 0)) if width == 8 else (8 * q + (i & 7) + (32 if i >= 8 else 0))
            assert B[kk][g] is None
            B[kk][g] = _signed(_field(b_regs[t][i // per], i % per, width), width)  # signed B
    for t in range(32):
        g, q = t >> 2, t & 3
        for r, (row, col) in enumerate(((g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1))):
            acc[t][r] += sum(A[row][kk] * B[kk][col] for kk in range(k))


def _decode_and_mma(path: int, sb: int, s: int, a, bw, zero4, acc) -> None:
    """Mirror of gemm.cuh mma_step for one (m16, n8) tile."""
    if path == C.PATH_A8:
        b = []
        for t in range(32):
            if sb == 4:
                w = bw[t][s]
                b.append((_vsub4(w & 0x0F0F0F0F, zero4[t]), _vsub4((w >> 4) & 0x0F0F0F0F, zero4[t])))
            else:
                w, sh = bw[t][s >> 1], 4 * (s & 1)
                b.append((_vsub4((w >> sh) & 0x03030303, zero4[t]), _vsub4((w >> (sh + 2)) & 0x03030303, zero4[t])))
        mma("u8s8", a, b, acc)
    elif path == C.PATH_A4_INT4:
        b = []
        for t in range(32):
            if sb == 4:
                b.append((bw[t][2 * s] ^ 0x88888888, bw[t][2 * s + 1] ^ 0x88888888))
            else:
                w = bw[t][s]
                b.append((_u2_nibbles_to_s4_centered(w & 0x33333333),
                          _u2_nibbles_to_s4_centered((w >> 2) & 0x33333333)))
        mma("u4s4", a, b, acc)
    else:  # PATH_A4_INT8
        alo = [[r & 0x0F0F0F0F for r in a[t]] for t in range(32)]
        ahi = [[(r >> 4) & 0x0F0F0F0F for r in a[t]] for t in range(32)]
        lo, hi = [], []
        for t in range(32):
            z = zero4[t]
            if sb == 4:
                w0, w1 = bw[t][2 * s], bw[t][2 * s + 1]
                lo.append((_vsub4(w0 & 0x0F0F0F0F, z), _vsub4(w1 & 0x0F0F0F0F, z)))
                hi.append((_vsub4((w0 >> 4) & 0x0F0F0F0F, z), _vsub4((w1 >> 4) & 0x0F0F0F0F, z)))
            else:
                w = bw[t][s]
                lo.append((_vsub4(w & 0x03030303, z), _vsub4((w >> 2) & 0x03030303, z)))
                hi.append((_vsub4((w >> 4) & 0x03030303, z), _vsub4((w >> 6) & 0x03030303, z)))
        mma("u8s8", alo, lo, acc)
        mma("u8s8", ahi, hi, acc)


def emulate_warp_tile(path: int, a_rows: torch.Tensor, a_zp: torch.Tensor, cw: C.CudaWeight) -> torch.Tensor:
    """One warp's 16 x 8 tile (rows 0..15 of A, weight tile 0) through the whole K loop and epilogue."""
    sb, kc = cw.slot_bits, 512 // cw.slot_bits
    abits = 8 if path == C.PATH_A8 else 4
    row_bytes = kc * abits // 8  # per chunk
    k_step = 32 if path == C.PATH_A8 else 64
    lda = a_rows.shape[1]
    data = cw.data.reshape(-1, cw.k_chunks, 32, 16)[0]
    n = min(cw.n, 8)
    zero4 = [int(cw.zero4[t >> 2]) & MASK if (t >> 2) < n else 0 for t in range(32)]
    acc = [[0] * 4 for _ in range(32)]
    rowsum = [[0, 0] for _ in range(32)]
    for kc_i in range(cw.k_chunks):
        rows = []
        for r in range(16):  # the loader: 16-byte chunks past the row's bytes are zero-filled
            chunk = bytearray(row_bytes)
            lo = kc_i * row_bytes
            src = bytes(a_rows[r, lo:min(lo + row_bytes, lda)].tolist()) if r < a_rows.shape[0] else b""
            chunk[:len(src)] = src
            rows.append(bytes(chunk))
        bw = [[int.from_bytes(bytes(data[kc_i, t, 4 * w:4 * w + 4].tolist()), "little") for w in range(4)]
              for t in range(32)]
        for s in range(kc // k_step):
            a = ldmatrix_x4(rows, 32 * s)
            if path == C.PATH_A4_INT4 and cw.need_row_sums:
                for t in range(32):
                    rowsum[t][0] += _nibble_sum(a[t][0]) + _nibble_sum(a[t][2])
                    rowsum[t][1] += _nibble_sum(a[t][1]) + _nibble_sum(a[t][3])
            _decode_and_mma(path, sb, s, a, bw, zero4, acc)
    quad = [  # quad reduction (__shfl_xor 1, 2)
        [sum(rowsum[(t & ~3) + i][h] for i in range(4)) for h in range(2)] for t in range(32)]
    out = torch.zeros(min(a_rows.shape[0], 16), n, dtype=torch.int64)
    for t in range(32):
        g, q = t >> 2, t & 3
        for h in range(2):
            row = g + 8 * h
            for j in range(2):
                col = 2 * q + j
                if col >= n or row >= a_rows.shape[0]:
                    continue
                v = acc[t][2 * h + j]
                if path == C.PATH_A4_INT4 and cw.need_row_sums:
                    v += int(cw.cdelta[col]) * quad[t][h]
                v -= int(a_zp[row if a_zp.numel() > 1 else 0]) * int(cw.w_sum[col])
                out[row, col] = v
    return out


def _rand_codes(shape, bits, g):
    return torch.randint(0, 2 ** bits, shape, generator=g)


# per CUDA path: (wbits, K, N, M, symmetric weights, per-token activations); the path sets the activation bits
EMU_SHAPES = {
    C.PATH_A8: [(4, 200, 8, 16, False, True), (3, 129, 5, 16, True, False), (2, 300, 7, 3, False, True)],
    C.PATH_A4_INT4: [(4, 200, 8, 16, False, True), (4, 77, 6, 5, True, False), (4, 77, 6, 9, False, True),
                     (2, 300, 8, 16, False, True), (2, 65, 3, 1, True, False)],
    C.PATH_A4_INT8: [(4, 200, 8, 16, False, True), (3, 31, 8, 9, False, False), (4, 45, 8, 16, False, True),
                     (2, 300, 8, 16, False, True)],
}
EMU_CASES = [(path, *shape) for path, shapes in EMU_SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("path,wbits,k,n,m,symmetric,per_token", EMU_CASES)
def test_emulated_warp_tile_matches_reference(path, wbits, k, n, m, symmetric, per_token):
    g = _gen("emu", path, wbits, k, n, m)
    abits = 8 if path == C.PATH_A8 else 4
    w_codes = _rand_codes((n, k), wbits, g)
    w_zp = torch.full((n,), symmetric_zero_point(wbits)) if symmetric else _rand_codes((n,), wbits, g)
    pw = PackedWeight.from_codes(w_codes, torch.ones(n), w_zp, wbits)
    a_codes = _rand_codes((m, k), abits, g)
    a_zp = _rand_codes((m,), abits, g) if per_token else _rand_codes((1,), abits, g)
    pa = PackedActivation(pack_codes(a_codes, abits, a_zp),  # odd K: the pad slot holds the row's zero point
                          torch.ones(a_zp.numel()), a_zp.to(torch.int32), abits, k)
    cw = C.build_gemm_weight(pw.codes(), pw.zero_point, wbits, "i8" if path == C.PATH_A8 else "i4")
    assert cw.need_row_sums == (path != C.PATH_A8 and bool((C.center_code(cw.slot_bits) - w_zp != 0).any()))
    got = emulate_warp_tile(path, pa.data, pa.zero_point, cw)
    want = R.linear_int(pa, pw).to(torch.int64)
    assert torch.equal(got, want), _msg(path=path, wbits=wbits, k=k, n=n, m=m)


@pytest.mark.parametrize("layout", ["i8", "i4"])
@pytest.mark.parametrize("slot_bits", [2, 4])
def test_slot_offsets_cover_each_chunk_once_per_row(layout, slot_bits):
    k = C.slot_k_offsets(layout, slot_bits)
    kc = 512 // slot_bits
    assert k.shape == (32, 128 // slot_bits)
    for g in range(8):  # the four lanes (q = 0..3) of row g together hold every k of the chunk once
        seen = torch.sort(k[4 * g:4 * g + 4].reshape(-1)).values
        assert torch.equal(seen, torch.arange(kc))


def test_build_gemm_weight_pads_with_the_zero_point_and_counts_sums():
    g = _gen("build")
    codes = _rand_codes((5, 70), 4, g)
    zp = torch.tensor([0, 3, 8, 15, 7])
    cw = C.build_gemm_weight(codes, zp, 4, "i8")
    assert cw.k_chunks == 1 and cw.data.numel() == 1 * 1 * 512
    assert torch.equal(cw.w_sum, (codes - zp[:, None]).sum(1).to(torch.int32))
    assert torch.equal(cw.zero4, (zp * 0x01010101).to(torch.int32))
    assert torch.equal(cw.cdelta, (8 - zp).to(torch.int32))
    # decode every slot back: rows < 5 hold their codes then the zero point, in slot order
    lanes = cw.data.reshape(1, 1, 32, 16)[0, 0]
    from dfqkern.formats import unpack_codes
    slots = unpack_codes(lanes, 4, 32)  # [32 lanes, 32 slots]
    koff = C.slot_k_offsets("i8", 4)
    for lane in range(20):  # rows 0..4
        row = lane // 4
        for s in range(32):
            kk = int(koff[lane, s])
            want = int(codes[row, kk]) if kk < 70 else int(zp[row])
            assert int(slots[lane, s]) == want


def test_build_gemm_weight_rejects_bad_input():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="zero points must lie in"):
        C.build_gemm_weight(codes, torch.tensor([0, 16]), 4, "i8")
    with pytest.raises(Unsupported, match="8-bit weights"):
        C.build_gemm_weight(codes, torch.tensor([0, 1]), 8, "i8")
    with pytest.raises(ValueError, match="layout must be"):
        C.slot_k_offsets("i2", 4)


def _emulated_conv_int(x_codes, za, pw, stride, padding, dilation, abits):
    """The implicit-GEMM loader of gemm.cuh (CONV=true) replayed on the CPU, then (A - za) @ (W - zw)."""
    n, c, h, w = x_codes.shape
    o, cg, kh, kw = pw.shape
    cp = -(-c // (16 if abits == 8 else 32)) * (16 if abits == 8 else 32)
    x = torch.full((n, h, w, cp), int(za), dtype=torch.int64)
    x[..., :c] = x_codes.permute(0, 2, 3, 1)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cw = C.build_gemm_weight(
        torch.cat([pw.codes().reshape(o, kh * kw, cg),
                   pw.zero_point[:, None, None].expand(o, kh * kw, cp - cg).to(torch.uint8)], 2).reshape(o, -1),
        pw.zero_point, pw.bits, "i8" if abits == 8 else "i4")
    kp = cw.k_chunks * (512 // cw.slot_bits)
    per_chunk = 128 // abits  # elements per 16-byte chunk
    a = torch.zeros(n * oh * ow, kp, dtype=torch.int64)
    for m in range(n * oh * ow):
        img, rem = divmod(m, oh * ow)
        y, xx = divmod(rem, ow)
        for k0 in range(0, kp, per_chunk):
            tap = k0 // cp
            if tap >= kh * kw:
                continue  # zero-filled
            ch = k0 - tap * cp
            ky, kx = divmod(tap, kw)
            iy = y * stride[0] - padding[0] + ky * dilation[0]
            ix = xx * stride[1] - padding[1] + kx * dilation[1]
            if 0 <= iy < h and 0 <= ix < w:
                a[m, k0:k0 + per_chunk] = x[img, iy, ix, ch:ch + per_chunk]
            else:
                a[m, k0:k0 + per_chunk] = int(za)  # pad_fill
    wfull = torch.full((o, kp), 0, dtype=torch.int64)
    wfull[:, :kh * kw * cp] = torch.cat(
        [pw.codes().reshape(o, kh * kw, cg).long(), pw.zero_point[:, None, None].expand(o, kh * kw, cp - cg).long()],
        2).reshape(o, -1)
    wfull[:, kh * kw * cp:] = pw.zero_point[:, None].long()
    acc = (a - int(za)) @ (wfull - pw.zero_point[:, None].long()).T
    return acc.reshape(n, oh, ow, o).permute(0, 3, 1, 2)


@pytest.mark.parametrize("c,o,k,stride,padding,dilation,abits", [
    (3, 5, 3, (1, 1), (1, 1), (1, 1), 8),
    (20, 4, 3, (2, 1), (0, 2), (1, 2), 4),
    (7, 3, 1, (2, 2), (0, 0), (1, 1), 4),
    (5, 2, (2, 3), (1, 2), (1, 0), (2, 1), 8),
])
def test_emulated_conv_loader_matches_reference(c, o, k, stride, padding, dilation, abits):
    g = _gen("conv", c, o, abits)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = _rand_codes((2, c, 6, 7), abits, g).to(torch.uint8)
    za = torch.tensor([int(_rand_codes((1,), abits, g))])
    pw = PackedWeight.from_codes(_rand_codes((o, kh * kw * c), 4, g), torch.ones(o), _rand_codes((o,), 4, g), 4,
                                 shape=(o, c, kh, kw))
    got = _emulated_conv_int(x, za, pw, stride, padding, dilation, abits)
    want = R.conv2d_int(x, za, pw, stride, padding, dilation)
    assert torch.equal(got, want.long()), _msg(c=c, o=o, k=k)


# ============================================================================ CPU: availability contract

def test_is_available_is_a_bool_and_false_without_cuda():
    assert isinstance(C.is_available(), bool)
    if not torch.cuda.is_available():
        assert C.is_available() is False
        assert "cuda" not in dispatch.available_backends()


def test_import_does_not_initialise_cuda():
    code = ("import torch, dfqkern, dfqkern.kernels.cuda as c; c.extension_has_ops(); "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_tensors_are_unsupported_not_errors():
    pw = PackedWeight.from_codes(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4), torch.full((4,), 8), 4)
    act = ActQuant(8, torch.tensor([0.1]), torch.tensor([128]))
    with pytest.raises(Unsupported):
        C.linear(torch.zeros(2, 8), pw, act=act)
    with pytest.raises(Unsupported):
        C.fake_quant_forward(torch.zeros(3), torch.tensor([0.1]), torch.tensor([8]), 4)


# ============================================================================ GPU
DEV = "cuda"
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2 ** -22, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def rand_weight(n, k, bits, symmetric, g, shape=None) -> PackedWeight:
    codes = _rand_codes((n, k), bits, g)
    zp = torch.full((n,), symmetric_zero_point(bits)) if symmetric else _rand_codes((n,), bits, g)
    scale = torch.rand(n, generator=g) * 0.05 + 0.005
    return PackedWeight.from_codes(codes.to(DEV), scale.to(DEV), zp.to(DEV), bits, shape)


def rand_act(m, k, bits, per_token, g) -> PackedActivation:
    codes = _rand_codes((m, k), bits, g)
    zp = _rand_codes((m if per_token else 1,), bits, g).to(torch.int32)
    data = pack_codes(codes, bits, zp)
    return PackedActivation(data.to(DEV), torch.rand(zp.numel(), generator=g).to(DEV) + 0.01, zp.to(DEV), bits, k)


def static_act(bits, g, scale=0.05) -> ActQuant:
    z = int(_rand_codes((1,), bits, g))
    return ActQuant(bits, torch.tensor([scale], device=DEV), torch.tensor([z], device=DEV, dtype=torch.int32))


@pytest.fixture(params=["int4", "int8"])
def a4_path(request, monkeypatch):
    """Run A4 cases on both instructions (int4 is emulated on sm_90 but must still be exact)."""
    monkeypatch.setenv(C.A4_PATH_ENV, request.param)
    return request.param


def _checked(op, *args, **kwargs):
    """``op`` on the CUDA backend through dispatch, which checks the argument contract first."""
    return dispatch.call(op, DEV, *args, backend="cuda", **kwargs)


def _assert_ulps(got, want, dtype, **ctx):
    torch.testing.assert_close(got.float(), want.float(), rtol=ULP[dtype], atol=1e-30, msg=lambda m: _msg(**ctx) + m)


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_token,symmetric", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 7), (17, 33), (64, 100), (5, 768)])
def test_quantize_activation_exact(bits, per_token, symmetric, dtype, m, k):
    g = _gen("qa", bits, per_token, m, k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEV, dtype)
    act = ActQuant(bits, per_token=True, symmetric=symmetric) if per_token else static_act(bits, g, 0.07)
    got = C.quantize_activation(x, act)
    want = R.quantize_activation(x, act)
    assert torch.equal(got.data, want.data), _msg(bits=bits, m=m, k=k)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero_point, want.zero_point)
    assert got.data.is_contiguous() and got.k == k and got.bits == bits


@gpu
def test_quantize_activation_strided_rows():
    g = _gen("qstride")
    x = torch.randn(6, 40, generator=g).to(DEV)[:, 3:35]  # row stride 40, contiguous rows
    act = ActQuant(4, per_token=True)
    assert torch.equal(C.quantize_activation(x, act).data, R.quantize_activation(x, act).data)


LINEAR_SHAPES = [(1, 64, 8), (3, 33, 5), (17, 100, 13), (64, 256, 130), (200, 131, 24), (2, 768 + 5, 1)]


@gpu
@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
def test_linear_int_a8_exact(wbits, symmetric, per_token, m, k, n):
    g = _gen("li8", wbits, symmetric, per_token, m, k, n)
    pw, pa = rand_weight(n, k, wbits, symmetric, g), rand_act(m, k, 8, per_token, g)
    assert torch.equal(C.linear_int(pa, pw), R.linear_int(pa, pw)), _msg(wbits=wbits, m=m, k=k, n=n)


@gpu
@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
def test_linear_int_a4_exact(a4_path, wbits, symmetric, m, k, n):
    g = _gen("li4", wbits, symmetric, m, k, n)
    pw, pa = rand_weight(n, k, wbits, symmetric, g), rand_act(m, k, 4, m % 2 == 1, g)
    assert torch.equal(C.linear_int(pa, pw), R.linear_int(pa, pw)), _msg(path=a4_path, wbits=wbits, m=m, k=k, n=n)


@gpu
@pytest.mark.parametrize("abits", [4, 8])
def test_linear_int_split_k_and_large_tiles(abits):
    """M = 1 with a long K forces split-K; M = 300 uses the 64 x 128 tile with several blocks."""
    g = _gen("split", abits)
    for m, k, n in [(1, 4096, 64), (5, 3072, 768), (300, 512, 257)]:
        pw, pa = rand_weight(n, k, 4, False, g), rand_act(m, k, abits, True, g)
        assert torch.equal(C.linear_int(pa, pw), R.linear_int(pa, pw)), _msg(m=m, k=k, n=n)


@gpu
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_float_epilogue(abits, per_token, dtype, with_bias):
    g = _gen("lin", abits, per_token, dtype, with_bias)
    n, k = 37, 200
    pw = rand_weight(n, k, 4, False, g)
    x = torch.randn(2, 9, k, generator=g).to(DEV, dtype)
    act = ActQuant(abits, per_token=True) if per_token else static_act(abits, g, 0.06)
    bias = torch.randn(n, generator=g).to(DEV) if with_bias else None
    for out_dtype in (None, torch.float32):
        got = C.linear(x, pw, bias, act, out_dtype)
        want = R.linear(x, pw, bias, act, out_dtype)
        assert got.shape == want.shape == (2, 9, n) and got.dtype == want.dtype
        _assert_ulps(got, want, want.dtype, abits=abits, dtype=dtype)


@gpu
def test_linear_through_dispatch_and_layout_cache():
    g = _gen("disp")
    pw = rand_weight(16, 64, 4, True, g)
    x = torch.randn(3, 64, generator=g).to(DEV)
    act = static_act(8, g)
    y = dispatch.linear(x, pw, act=act, backend="cuda")
    torch.testing.assert_close(y, R.linear(x, pw, act=act), rtol=ULP[torch.float32], atol=0)
    assert ("gemm", "i8", None) in pw.cache["cuda"]
    cached = pw.cache["cuda"][("gemm", "i8", None)]
    dispatch.linear(x, pw, act=act, backend="cuda")
    assert pw.cache["cuda"][("gemm", "i8", None)] is cached


CONV_CASES = [  # (n, c, h, w, o, k, stride, padding, dilation)
    (1, 3, 9, 9, 5, 3, 1, 1, 1),
    (2, 16, 8, 7, 33, 3, 2, 1, 1),
    (1, 20, 14, 14, 16, 3, 1, 2, 2),
    (2, 64, 7, 7, 64, 1, 1, 0, 1),
    (1, 8, 15, 15, 12, 7, 2, 3, 1),
    (1, 5, 6, 10, 3, (1, 3), (2, 1), (0, 1), (1, 2)),
]


def _conv_weight(o, cg, k, bits, symmetric, g):
    kh, kw = (k, k) if isinstance(k, int) else k
    return rand_weight(o, kh * kw * cg, bits, symmetric, g, shape=(o, cg, kh, kw))


@gpu
@pytest.mark.parametrize("wbits", [2, 4])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_int_exact(wbits, case):
    n, c, h, w, o, k, stride, padding, dilation = case
    g = _gen("cint", wbits, case)
    pw = _conv_weight(o, c, k, wbits, False, g)
    x = _rand_codes((n, c, h, w), 8, g).to(DEV, torch.uint8)
    za = torch.tensor([int(_rand_codes((1,), 8, g))], device=DEV)
    got = C.conv2d_int(x, za, pw, stride, padding, dilation)
    want = R.conv2d_int(x, za, pw, stride, padding, dilation)
    assert got.shape == want.shape and torch.equal(got, want), _msg(case=case, wbits=wbits)


@gpu
@pytest.mark.parametrize("c,k,stride,padding,dilation", [(8, 3, 1, 1, 1), (13, 3, 2, 1, 1), (32, 5, 1, 4, 2)])
def test_depthwise_conv2d_int_exact(c, k, stride, padding, dilation):
    g = _gen("dw", c, k)
    pw = _conv_weight(c, 1, k, 4, False, g)
    x = _rand_codes((2, c, 11, 9), 8, g).to(DEV, torch.uint8)
    za = torch.tensor([3], device=DEV)
    got = C.conv2d_int(x, za, pw, stride, padding, dilation, groups=c)
    assert torch.equal(got, R.conv2d_int(x, za, pw, stride, padding, dilation, groups=c))


@gpu
@pytest.mark.parametrize("abits,a4", [(8, None), (4, "int4"), (4, "int8")])
@pytest.mark.parametrize("case", CONV_CASES[:4])
@pytest.mark.parametrize("wbits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv2d_float(monkeypatch, abits, a4, case, wbits, dtype):
    if a4 is not None:
        monkeypatch.setenv(C.A4_PATH_ENV, a4)
    n, c, h, w, o, k, stride, padding, dilation = case
    g = _gen("conv", abits, case, wbits, dtype)
    pw = _conv_weight(o, c, k, wbits, False, g)  # asymmetric: exercises the int4 path's row-sum correction
    x = torch.randn(n, c, h, w, generator=g).to(DEV, dtype)
    bias = torch.randn(o, generator=g).to(DEV)
    act = static_act(abits, g, 0.04)
    got = C.conv2d(x, pw, bias, act, stride, padding, dilation)
    want = R.conv2d(x, pw, bias, act, stride, padding, dilation)
    assert got.shape == want.shape and got.dtype == want.dtype
    _assert_ulps(got, want, dtype, case=case, abits=abits)
    # channels-last input takes the strided path of the quantize kernel
    got_cl = C.conv2d(x.to(memory_format=torch.channels_last), pw, bias, act, stride, padding, dilation)
    assert torch.equal(got_cl, got)


@gpu
def test_depthwise_conv2d_float():
    g = _gen("dwf")
    c = 24
    pw = _conv_weight(c, 1, 3, 4, False, g)
    x = torch.randn(2, c, 10, 10, generator=g).to(DEV)
    act, bias = static_act(4, g), torch.randn(c, generator=g).to(DEV)
    got = C.conv2d(x, pw, bias, act, 1, 1, 1, groups=c)
    _assert_ulps(got, R.conv2d(x, pw, bias, act, 1, 1, 1, groups=c), torch.float32)


@gpu
def test_gemm_and_conv_errors():
    g = _gen("err")
    pw = rand_weight(8, 32, 4, True, g)
    with pytest.raises(ValueError, match="K=16 does not match weight K=32"):
        _checked("linear_int", rand_act(2, 16, 8, False, g), pw)
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        _checked("linear", torch.randn(2, 32, device=DEV), pw, torch.zeros(3, device=DEV), static_act(8, g))
    with pytest.raises(Unsupported, match="weight-only"):
        _checked("linear", torch.randn(2, 32, device=DEV), pw)
    with pytest.raises(Unsupported, match="8-bit weights"):
        _checked("linear_int", rand_act(2, 32, 8, False, g), rand_weight(8, 32, 8, True, g))
    with pytest.raises(ValueError, match="one device"):
        _checked("linear", torch.randn(2, 32), pw, act=static_act(8, g))
    cw = _conv_weight(8, 2, 3, 4, True, g)
    x = torch.randn(1, 8, 5, 5, device=DEV)
    with pytest.raises(Unsupported, match="grouped conv"):
        _checked("conv2d", x, cw, act=static_act(8, g), groups=4)
    with pytest.raises(ValueError, match="per_token is not supported"):
        _checked("conv2d", x[:, :2], _conv_weight(8, 2, 3, 4, True, g), act=ActQuant(8, per_token=True))
    with pytest.raises(ValueError, match="x has 8 channels, weight expects 2"):
        _checked("conv2d", x, _conv_weight(8, 2, 3, 4, True, g), act=static_act(8, g))
    with pytest.raises(Unsupported, match="string padding"):
        _checked("conv2d", x, _conv_weight(4, 8, 3, 4, True, g), act=static_act(8, g), padding="same")
    with pytest.raises(RuntimeError, match="a_zp must have 1 or M"):  # the C++ checks name the argument
        torch.ops.dfqkern.cuda_packed_gemm(torch.zeros(4, 16, dtype=torch.uint8, device=DEV),
                                           torch.zeros(3, dtype=torch.int32, device=DEV), None,
                                           *C._gemm_weight_args(C.gemm_weight(pw, 8)), None, None, 8, 1, 4, 0, None)


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_fake_quant_forward_exact(bits, axis, dtype, drop_prob):
    g = _gen("fq", bits, axis, dtype, drop_prob)
    x = (torch.randn(5, 7, 3, generator=g) * 2).to(DEV, dtype)
    c = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(c, generator=g) * 0.2 + 0.05).to(DEV)
    zp = _rand_codes((c,), bits, g).to(DEV, torch.int32)
    got = C.fake_quant_forward(x, scale, zp, bits, axis, drop_prob, seed=123)
    want = R.fake_quant_forward(x, scale, zp, bits, axis, drop_prob, seed=123)
    assert got.dtype == x.dtype and torch.equal(got, want), _msg(bits=bits, axis=axis, dtype=dtype)


def _sum_tol(terms: torch.Tensor) -> float:
    return 1e-6 * float(terms.abs().sum()) + 1e-12


@gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_fake_quant_backward(bits, axis, dtype, drop_prob):
    g = _gen("fqb", bits, axis, dtype, drop_prob)
    x = (torch.randn(33, 65, generator=g) * 2).to(DEV, dtype)
    grad = torch.randn(33, 65, generator=g).to(DEV, dtype)
    c = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(c, generator=g) * 0.1 + 0.02).to(DEV)
    zp = _rand_codes((c,), bits, g).to(DEV, torch.int32)
    gx, ds, dz = C.fake_quant_backward(grad, x, scale, zp, bits, axis, 0.5, drop_prob, 7)
    rx, rs, rz = R.fake_quant_backward(grad, x, scale, zp, bits, axis, 0.5, drop_prob, 7)
    assert torch.equal(gx, rx) and ds.shape == rs.shape and dz.shape == rz.shape
    tol = _sum_tol(grad.float() * 10)
    torch.testing.assert_close(ds, rs, rtol=0, atol=tol, msg=lambda m: _msg(bits=bits, axis=axis) + m)
    torch.testing.assert_close(dz, rz, rtol=0, atol=tol)


@gpu
def test_fake_quant_backward_mixed_dtypes_and_errors():
    g = _gen("fqm")
    x = torch.randn(4, 6, generator=g).to(DEV, torch.float16)
    grad = torch.randn(4, 6, generator=g).to(DEV)
    s, z = torch.tensor([0.1], device=DEV), torch.tensor([8], device=DEV)
    got = C.fake_quant_backward(grad, x, s, z, 4)
    want = R.fake_quant_backward(grad, x, s, z, 4)
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.float16
    with pytest.raises(ValueError, match="scale"):
        _checked("fake_quant_forward", x, torch.ones(3, device=DEV), torch.zeros(3, device=DEV), 4, axis=0)
    with pytest.raises(ValueError, match="bits must be one of"):
        _checked("fake_quant_forward", x, s, z, 5)
    with pytest.raises(ValueError, match="drop_prob"):
        _checked("fake_quant_forward", x, s, z, 4, drop_prob=1.5)
    with pytest.raises(Unsupported, match="float64"):
        _checked("fake_quant_forward", x.double(), s, z, 4)


def _adaround_inputs(g, shape=(24, 3, 3, 3), axis=0, bits=4, dtype=torch.float32):
    w = torch.randn(*shape, generator=g) * 0.3
    c = shape[axis]
    scale = (w.abs().amax(dim=[d for d in range(w.dim()) if d != axis]) / 7).clamp_min(1e-3)
    base = R.adaround_base(w, scale, axis)
    v = R.adaround_init_v(w, scale, axis) + torch.randn(*shape, generator=g) * 0.5
    zp = _rand_codes((c,), bits, g).to(torch.int32)
    return base.to(DEV), v.to(DEV, dtype), scale.to(DEV), zp.to(DEV)


@gpu
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("beta", [2.0, 7.5, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaround_forward(hard, axis, beta, dtype):
    g = _gen("arf", hard, axis, beta, dtype)
    base, v, scale, zp = _adaround_inputs(g, axis=axis, dtype=dtype)
    w, reg = C.adaround_forward(base, v, scale, zp, 4, axis, beta, hard)
    rw, rreg = R.adaround_forward(base, v, scale, zp, 4, axis, beta, hard)
    assert w.dtype == rw.dtype and reg.shape == rreg.shape == ()
    if hard:
        assert torch.equal(w, rw) and float(reg) == 0.0
    else:
        rtol = 1e-5 if dtype == torch.float32 else 2 ** -10
        torch.testing.assert_close(w, rw, rtol=rtol, atol=1e-6 * float(scale.max()), msg=lambda m: _msg(beta=beta) + m)
        torch.testing.assert_close(reg, rreg, rtol=1e-5, atol=1e-6 * v.numel())


@gpu
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("beta,reg_grad", [(2.0, 0.0), (2.0, 0.01), (12.0, 0.01), (1.0, 0.1)])
def test_adaround_backward(axis, beta, reg_grad):
    g = _gen("arb", axis, beta, reg_grad)
    base, v, scale, zp = _adaround_inputs(g, axis=axis)
    grad = torch.randn(v.shape, generator=g).to(DEV)
    gv, gs = C.adaround_backward(grad, base, v, scale, zp, 4, axis, beta, reg_grad)
    rv, rs = R.adaround_backward(grad, base, v, scale, zp, 4, axis, beta, reg_grad)
    torch.testing.assert_close(gv, rv, rtol=1e-4, atol=1e-6, msg=lambda m: _msg(beta=beta) + m)
    torch.testing.assert_close(gs, rs, rtol=0, atol=_sum_tol(grad.float() * 16))


@gpu
def test_adaround_errors():
    g = _gen("are")
    base, v, scale, zp = _adaround_inputs(g)
    with pytest.raises(ValueError, match="base and v must have one shape"):
        _checked("adaround_forward", base[:2], v, scale, zp, 4)
    with pytest.raises(ValueError, match="per-channel parameter"):
        _checked("adaround_forward", base, v, scale[:3], zp[:3], 4)
    with pytest.raises(TypeError, match="floating-point"):
        _checked("adaround_forward", base, v.int(), scale, zp, 4)


@gpu
def test_empty_inputs():
    act = ActQuant(8, per_token=True)
    pa = C.quantize_activation(torch.zeros(0, 16, device=DEV), act)
    assert pa.data.shape == (0, 16)
    x = torch.zeros(0, 5, device=DEV)
    assert C.fake_quant_forward(x, torch.tensor([0.1], device=DEV), torch.tensor([3], device=DEV), 4).shape == (0, 5)

