"""The CPU backend (dfqkern._C, csrc/cpu) against the torch reference (dfqkern.kernels.reference).

Every op runs through ``dispatch.call(op, "cpu", ..., backend="cpu")`` (strict: no silent fallback)
on every instruction-set level this CPU supports (``portable`` everywhere, ``avx2`` and
``avx512vnni`` where present; the others skip with a reason).

Exactness: codes, int32 GEMM / conv results, packed Linear / Conv2d float outputs (same fp32
epilogue, same order), fake-quant outputs and grad_x, QDrop masks and hard AdaRound are compared
with ``torch.equal``. Tolerances elsewhere, and why:
* LSQ scale / zero-point gradients, AdaRound's scale gradient and regularizer: fp32 terms summed in
  another order (double partial sums): ``1e-5 * sum(|terms|)``.
* soft AdaRound ``w_hat`` / ``grad_V``: the AVX2 kernels use their own exp / log (~1 ulp from libm,
  a few ulps after the rectified sigmoid and pow): rtol 1e-5 and an absolute floor of 1e-6 of the
  largest magnitude.

Random inputs are fresh each run (the seed is in failure messages; pin it with ``DFQKERN_TEST_SEED``).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib

import pytest
import torch

from dfqkern.formats import PackedWeight, code_max, symmetric_zero_point
from dfqkern.kernels import dispatch, reference as R
from dfqkern.kernels.reference import ActQuant, Unsupported

C = pytest.importorskip("dfqkern.kernels.cpu")
if not C.is_available():
    pytest.skip("dfqkern._C with CPU ops is not built (pip install --no-build-isolation -e .)",
                allow_module_level=True)

SEED = int(os.environ.get("DFQKERN_TEST_SEED", random.randrange(2 ** 31)))
BUILD = __import__("dfqkern._C", fromlist=["build_info"]).build_info()
ISAS = ("portable", "avx2", "avx512vnni")


def _supported(isa: str) -> bool:
    try:
        with C.use_isa(isa):
            return True
    except ValueError:
        return False


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per instruction-set level of the kernels."""
    if not _supported(request.param):
        pytest.skip(f"this CPU does not support the {request.param} kernels")
    with C.use_isa(request.param):
        yield request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))


def ctx(**kw) -> str:
    return f"[DFQKERN_TEST_SEED={SEED}] " + ", ".join(f"{k}={v}" for k, v in kw.items())


def cpu_call(op: str, *args, **kwargs):
    return dispatch.call(op, "cpu", *args, backend="cpu", **kwargs)


def assert_equal(actual, expected, **why):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, ctx(
        shape=(tuple(actual.shape), tuple(expected.shape)), dtype=(actual.dtype, expected.dtype), **why)
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(ctx(max_abs_diff=diff.max().item(), n_diff=int((diff > 0).sum()), **why))


def assert_sum_close(actual, expected, abs_terms, **why):
    """fp32 sums in another order: within 1e-5 of the sum of |terms| (per parameter)."""
    tol = 1e-5 * abs_terms.double() + 1e-12
    err = (actual.double() - expected.double()).abs()
    assert actual.shape == expected.shape, ctx(shape=(tuple(actual.shape), tuple(expected.shape)), **why)
    assert bool((err <= tol).all()), ctx(max_err=err.max().item(), tol=tol.min().item(), **why)


# ----------------------------------------------------------------------------- data makers

def rand_weight(gen, n: int, k: int, bits: int, shape=None) -> PackedWeight:
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    zp = torch.randint(0, 2 ** bits, (n,), generator=gen)
    scale = torch.rand(n, generator=gen) * 0.05 + 0.01
    return PackedWeight.from_codes(codes, scale, zp, bits, shape=shape)


def rand_x(gen, *shape, dtype=torch.float32, scale=2.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale + 0.3).to(dtype)


def static_act(x: torch.Tensor, bits: int, symmetric: bool = False) -> ActQuant:
    s, z = R.qparams_from_range(x.float().min(), x.float().max(), bits, symmetric)
    return ActQuant(bits, s.reshape(1), z.reshape(1), symmetric=symmetric)


def rand_params(gen, x: torch.Tensor, axis, bits: int, float_zp: bool = False):
    n = 1 if axis is None else x.shape[axis]
    scale = torch.rand(n, generator=gen) * 0.2 + 0.02
    if float_zp:  # LSQ+ style learnable, non-integer zero points
        zp = torch.rand(n, generator=gen) * code_max(bits)
    else:
        zp = torch.randint(0, 2 ** bits, (n,), generator=gen, dtype=torch.int32)
    return scale, zp


# ----------------------------------------------------------------------------- contract

def test_backend_contract():
    assert C.DEVICES == ("cpu",)
    assert C.is_available() is True
    assert BUILD["cpu_ops"] is True
    assert "cpu" in dispatch.available_backends()
    for op in dispatch.OPS:
        assert callable(getattr(C, op)), op


def test_isa_names_and_env_override():
    assert C.isa() in ISAS
    with C.use_isa("portable"):
        assert C.isa() == "portable"
    with pytest.raises(ValueError, match="'auto', 'avx512vnni', 'avx2', 'portable'"):
        with C.use_isa("sse9"):
            pass
    code = "import torch; from dfqkern.kernels import cpu; print(cpu.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DFQKERN_CPU_ISA="portable"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "portable", out.stderr[-2000:]


# ----------------------------------------------------------------------------- quantize / dequantize

QUANT_CASES = [  # (shape, axis)
    ((7,), None), ((5, 37, 9), 1), ((3, 17), -1), ((33, 4, 3, 3), 0), ((2, 3, 5, 7), None), ((1, 1), 0),
    ((4, 2, 4100), 2),
]


@pytest.mark.parametrize("shape,axis", QUANT_CASES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_dequantize(isa, gen, shape, axis, bits):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = rand_x(gen, *shape, dtype=dtype)
        for float_zp in (False, True):
            s, z = rand_params(gen, x, axis, bits, float_zp)
            q = cpu_call("quantize", x, s, z, bits, axis)
            assert_equal(q, R.quantize(x, s, z, bits, axis), op="quantize", isa=isa, dtype=dtype, zp_float=float_zp)
            assert_equal(cpu_call("dequantize", q, s, z, axis), R.dequantize(q, s, z, axis), op="dequantize")


def test_quantize_noncontiguous_and_bounds(isa, gen):
    x = rand_x(gen, 9, 12, scale=50.0).t()  # non-contiguous, most values clipped
    s, z = torch.tensor([0.1]), torch.tensor([3], dtype=torch.int32)
    assert_equal(cpu_call("quantize", x, s, z, 4), R.quantize(x, s, z, 4), isa=isa)
    # ties: x * inv lands exactly on .5 -> round half to even, before the zero point is added
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 7.5])
    one = torch.tensor([1.0])
    assert_equal(cpu_call("quantize", x, one, torch.tensor([4]), 8), R.quantize(x, one, torch.tensor([4]), 8))


# ----------------------------------------------------------------------------- fake-quant

FQ_CASES = [((5, 37, 9), 1), ((33, 4, 3, 3), 0), ((3000,), None), ((2, 3, 5, 7), None), ((6, 17), 1), ((17, 6), 0)]


@pytest.mark.parametrize("shape,axis", FQ_CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3, 1.0])
def test_fake_quant_forward_backward(isa, gen, shape, axis, bits, drop_prob):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    for dtype in (torch.float32, torch.float16):
        x = rand_x(gen, *shape, dtype=dtype)
        s, z = rand_params(gen, x, axis, bits, float_zp=dtype == torch.float16)
        why = dict(isa=isa, dtype=dtype, shape=shape, axis=axis, bits=bits, drop=drop_prob)
        y = cpu_call("fake_quant_forward", x, s, z, bits, axis, drop_prob, seed)
        assert_equal(y, R.fake_quant_forward(x, s, z, bits, axis, drop_prob, seed), op="fq_forward", **why)
        g = rand_x(gen, *shape, dtype=dtype, scale=1.0)
        gx, gs, gz = cpu_call("fake_quant_backward", g, x, s, z, bits, axis, 0.37, drop_prob, seed)
        rgx, rgs, rgz = R.fake_quant_backward(g, x, s, z, bits, axis, 0.37, drop_prob, seed)
        assert_equal(gx, rgx, op="fq_backward grad_x", **why)
        bound = R.reduce_to_param(g.float().abs(), axis) * 0.37 * (code_max(bits) + z.float().abs() + 1)
        assert_sum_close(gs, rgs, bound, op="fq_backward grad_scale", **why)
        assert_sum_close(gz, rgz, R.reduce_to_param(g.float().abs(), axis) * 0.37 * s, op="fq_backward grad_zp", **why)


def test_fake_quant_reductions_do_not_depend_on_threads(gen):
    x = rand_x(gen, 64, 3, 3, 3)
    g = rand_x(gen, 64, 3, 3, 3, scale=1.0)
    s, z = rand_params(gen, x, 0, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.fake_quant_backward(g, x, s, z, 4, 0, 1.0, 0.5, 3)
        torch.set_num_threads(max(2, before))
        many = C.fake_quant_backward(g, x, s, z, 4, 0, 1.0, 0.5, 3)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- AdaRound

AR_CASES = [((37, 50), 0), ((16, 3, 3, 3), 0), ((7, 300), None), ((5, 9), 1)]


@pytest.mark.parametrize("shape,axis", AR_CASES)
@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_adaround_forward_backward(isa, gen, shape, axis, beta, bits):
    w = rand_x(gen, *shape, scale=1.0)
    n = 1 if axis is None else shape[axis]
    amax = w.abs().amax() if axis is None else w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
    s = (amax / (symmetric_zero_point(bits) - 1)).reshape(n)
    z = torch.full((n,), symmetric_zero_point(bits), dtype=torch.int32)
    base = R.adaround_base(w, s, axis)
    v = R.adaround_init_v(w, s, axis) + rand_x(gen, *shape, scale=2.0)
    why = dict(isa=isa, shape=shape, axis=axis, beta=beta, bits=bits)

    wh, reg = cpu_call("adaround_forward", base, v, s, z, bits, axis, beta)
    rwh, rreg = R.adaround_forward(base, v, s, z, bits, axis, beta)
    torch.testing.assert_close(wh, rwh, rtol=1e-5, atol=1e-6 * float(rwh.abs().max()), msg=lambda m: ctx(**why) + m)
    terms = 1 - (2 * R.rectified_sigmoid(v) - 1).abs().pow(beta)
    assert reg.shape == rreg.shape == ()
    assert abs(float(reg) - float(rreg)) <= 1e-5 * float(terms.abs().sum()) + 1e-6, ctx(reg=(reg, rreg), **why)

    hw, hreg = cpu_call("adaround_forward", base, v, s, z, bits, axis, beta, True)
    rhw, rhreg = R.adaround_forward(base, v, s, z, bits, axis, beta, True)
    assert_equal(hw, rhw, op="hard adaround", **why)
    assert float(hreg) == float(rhreg) == 0.0

    g = rand_x(gen, *shape, scale=1.0)
    gv, gs = cpu_call("adaround_backward", g, base, v, s, z, bits, axis, beta, 0.01)
    rgv, rgs = R.adaround_backward(g, base, v, s, z, bits, axis, beta, 0.01)
    torch.testing.assert_close(gv, rgv, rtol=1e-5, atol=1e-6 * float(rgv.abs().max()), msg=lambda m: ctx(**why) + m)
    bs = R.broadcast_param(s, w, axis)
    assert_sum_close(gs, rgs, R.reduce_to_param((g * rwh / bs).abs(), axis), op="adaround grad_scale", **why)


def test_adaround_half_inputs(isa, gen):
    w = rand_x(gen, 8, 40, scale=1.0)
    s = w.abs().amax(1) / 7
    z = torch.full((8,), 8, dtype=torch.int32)
    base, v = R.adaround_base(w, s), R.adaround_init_v(w, s).half()
    wh, _ = cpu_call("adaround_forward", base, v, s, z, 4)
    rwh, _ = R.adaround_forward(base, v, s, z, 4)
    assert wh.dtype == torch.float16
    torch.testing.assert_close(wh, rwh, rtol=2 ** -10, atol=2 ** -10 * float(rwh.abs().max().float()))


# ----------------------------------------------------------------------------- packed activations / GEMM

GEMM_SHAPES = [(1, 77, 13), (3, 63, 5), (17, 300, 9), (1, 5, 1), (4, 129, 8), (1, 512, 12)]


@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("per_token,symmetric", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k", [(1, 77), (3, 33), (17, 1), (5, 128)])
def test_quantize_activation(isa, gen, abits, per_token, symmetric, m, k):
    for dtype in (torch.float32, torch.bfloat16):
        x = rand_x(gen, m, k, dtype=dtype)
        act = ActQuant(abits, per_token=True, symmetric=symmetric) if per_token else static_act(x, abits, symmetric)
        got, ref = cpu_call("quantize_activation", x, act), R.quantize_activation(x, act)
        why = dict(isa=isa, dtype=dtype, per_token=per_token, symmetric=symmetric, abits=abits, m=m, k=k)
        for field in ("data", "scale", "zero_point"):
            assert_equal(getattr(got, field), getattr(ref, field), field=field, **why)
        assert (got.bits, got.k) == (ref.bits, ref.k)


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_linear_int_and_linear(isa, gen, wbits, abits, m, k, n):
    pw = rand_weight(gen, n, k, wbits)
    x = rand_x(gen, m, k)
    bias = rand_x(gen, n)
    for act in (static_act(x, abits), ActQuant(abits, per_token=True), ActQuant(abits, per_token=True, symmetric=True)):
        why = dict(isa=isa, wbits=wbits, abits=abits, m=m, k=k, n=n, per_token=act.per_token, sym=act.symmetric)
        pa = R.quantize_activation(x, act)
        assert_equal(cpu_call("linear_int", pa, pw), R.linear_int(pa, pw), op="linear_int", **why)
        assert_equal(cpu_call("linear", x, pw, bias, act), R.linear(x, pw, bias, act), op="linear", **why)
        assert_equal(cpu_call("linear", x, pw, None, act), R.linear(x, pw, None, act), op="linear no bias", **why)


def test_linear_leading_dims_and_dtypes(isa, gen):
    pw = rand_weight(gen, 11, 70, 4)
    x = rand_x(gen, 2, 3, 70)
    act = static_act(x, 8)
    assert_equal(cpu_call("linear", x, pw, None, act), R.linear(x, pw, None, act), isa=isa, case="3-D x")
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        assert_equal(cpu_call("linear", xh, pw, None, act), R.linear(xh, pw, None, act), isa=isa, dtype=dtype)
        assert_equal(cpu_call("linear", x, pw, None, act, out_dtype=dtype),
                     R.linear(x, pw, None, act, out_dtype=dtype), isa=isa, out_dtype=dtype)


def test_linear_large_k_all_isas_agree(gen):
    """A larger problem than the reference can check quickly: every ISA level gives the same int32."""
    pw = rand_weight(gen, 70, 4100, 4)
    x = rand_x(gen, 9, 4100)
    pa = R.quantize_activation(x, ActQuant(8, per_token=True))
    results = []
    for isa in ISAS:
        if _supported(isa):
            with C.use_isa(isa):
                results.append(C.linear_int(pa, pw))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert_equal(results[0][:2], R.linear_int(R.quantize_activation(x[:2], ActQuant(8, per_token=True)), pw))


def test_prepacked_layouts_are_cached(gen):
    pw = rand_weight(gen, 9, 40, 2)
    act = ActQuant(8, per_token=True)
    x1, x2 = rand_x(gen, 1, 40), rand_x(gen, 2, 40)
    C.linear(x1, pw, None, act)  # M = 1: GEMV tiles
    tiles, corr = pw.cache["cpu"][("tile", 1)]
    assert ("panel", 1) not in pw.cache["cpu"]
    C.linear(x1, pw, None, act)
    assert pw.cache["cpu"][("tile", 1)][0] is tiles
    assert tiles.dtype == torch.uint8 and corr.shape == (3, 3, 4)  # 3 tiles of 4 rows, {P, zw, Q}
    C.linear(x2, pw, None, act)  # M > 1: panels
    panels, pcorr = pw.cache["cpu"][("panel", 1)]
    C.linear(x2, pw, None, act)
    assert pw.cache["cpu"][("panel", 1)][0] is panels
    assert panels.shape == (3 * 64,) and pcorr.shape == (1, 3, 16)  # 1 panel, K=40 -> 3 blocks of 16 (2-bit)


@pytest.mark.parametrize("layout", ["tile", "panel"])
@pytest.mark.parametrize("change,error", [
    (dict(groups=2), "groups must be >= 1 and divide the 9 weight rows, got 2"),
    (dict(groups=0), "groups must be >= 1"),
    (dict(zero_point=torch.zeros(8, dtype=torch.int32)), "zero_point must have one element per weight row \\(9\\)"),
    (dict(bits=5), "bits must be one of"),
    (dict(k=0), "k must be >= 1"),
])
def test_prepack_rejects_bad_arguments(gen, layout, change, error):
    pw = rand_weight(gen, 9, 40, 4)
    args = dict(data=pw.data, zero_point=pw.zero_point, bits=pw.bits, k=pw.k, groups=1) | change
    prepack = getattr(C._load(), C._PREPACK[layout])
    with pytest.raises(ValueError, match=error):
        prepack(args["data"], args["zero_point"], args["bits"], args["k"], args["groups"])


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("m,k,n", [(2, 5, 3), (3, 31, 17), (17, 65, 33), (13, 129, 16), (30, 200, 47), (25, 96, 64)])
def test_both_layouts_every_isa(gen, wbits, m, k, n):
    """Tile and panel layouts through linear_int / linear give the reference's integers at every ISA
    (every row-strip tail of the 12-row VNNI and 4-row AVX2 panel kernels, odd N, K not a multiple of a block)."""
    pw = rand_weight(gen, n, k, wbits)
    x = rand_x(gen, m, k)
    act = ActQuant(8, per_token=True)
    pa = R.quantize_activation(x, act)
    ref = R.linear_int(pa, pw)
    ref_y = R.linear(x, pw, None, act)
    tiles, panels = C.tile_weight(pw), C.panel_weight(pw)
    ops = C._load()
    for isa in ISAS:
        with C.use_isa(isa):
            for w, corr in (tiles, panels):
                got = ops.cpu_linear_int(pa.data, pa.zero_point, pa.bits, pa.k, w, corr, pw.bits, pw.n)
                assert_equal(got, ref)
                y = ops.cpu_linear(x, w, corr, pw.scale, pw.bits, pw.n, pw.k, None, act.scale, act.zero_point,
                                   act.bits, act.per_token, act.symmetric)
                assert_equal(y, ref_y)


# ----------------------------------------------------------------------------- conv2d

CONV_CASES = [  # (B, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (1, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1),
    (2, 6, 10, 7, 9, 3, 2, 2, (1, 0), (1, 2), 1),
    (1, 3, 13, 13, 8, 7, 7, 2, 3, 1, 1),  # stem-like, K = 147
    (1, 8, 8, 8, 8, 3, 3, 2, 1, 1, 8),  # depthwise, strided
    (1, 6, 9, 9, 12, 3, 3, 1, 2, 2, 6),  # depthwise with channel multiplier 2, dilated
    (2, 10, 7, 6, 10, 5, 5, 1, 2, 1, 10),  # depthwise 5x5, odd channels
    (1, 4, 9, 9, 8, 3, 3, 1, 2, 2, 4),  # C/groups = 1 via groups = C
    (2, 8, 6, 6, 12, 3, 3, 1, 1, 1, 2),  # grouped
    (1, 12, 5, 5, 9, 3, 3, 3, 1, 1, 3),  # grouped, stride 3, 3 groups of 4 in / 3 out
    (1, 70, 5, 5, 33, 1, 1, 1, 0, 1, 1),  # 1x1 direct path, K not a multiple of 32
    (1, 16, 6, 6, 10, 1, 1, 2, 0, 1, 1),  # 1x1 strided (downsample)
    (1, 20, 4, 4, 5, 4, 4, 1, 0, 1, 1),  # output 1x1
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"_k{c[5]}{c[6]}_g{c[10]}")
@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_conv2d(isa, gen, case, wbits):
    b, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    pw = rand_weight(gen, o, kh * kw * c // groups, wbits, shape=(o, c // groups, kh, kw))
    x = rand_x(gen, b, c, h, w)
    bias = rand_x(gen, o)
    for abits in (4, 8):
        act = static_act(x, abits)
        why = dict(isa=isa, case=case, wbits=wbits, abits=abits)
        codes = R.quantize(x, act.scale, act.zero_point, abits)
        geo = (stride, padding, dilation, groups)
        assert_equal(cpu_call("conv2d_int", codes, act.zero_point, pw, *geo),
                     R.conv2d_int(codes, act.zero_point, pw, *geo), op="conv2d_int", **why)
        assert_equal(cpu_call("conv2d", x, pw, bias, act, *geo), R.conv2d(x, pw, bias, act, *geo), op="conv2d", **why)
    xh = x.half()
    act = static_act(x, 8)
    assert_equal(cpu_call("conv2d", xh, pw, None, act, *geo, out_dtype=torch.float32),
                 R.conv2d(xh, pw, None, act, *geo, out_dtype=torch.float32), op="conv2d fp16 in", isa=isa)


# ----------------------------------------------------------------------------- what the backend declines

def test_unsupported_combinations_fall_back(gen):
    pw = rand_weight(gen, 6, 20, 4)
    x = rand_x(gen, 2, 20)
    with pytest.raises(Unsupported, match="weight-only"):
        cpu_call("linear", x, pw, None, None)
    # automatic selection tries cpu first and falls back to the reference
    assert_equal(dispatch.call("linear", "cpu", x, pw, None, None), R.linear(x, pw, None, None))
    pwc = rand_weight(gen, 4, 18, 4, shape=(4, 2, 3, 3))
    xc = rand_x(gen, 1, 2, 5, 5)
    act = ActQuant(8, torch.tensor([0.05]), torch.tensor([7.5]))  # non-integer activation zero point
    with pytest.raises(Unsupported, match="integer"):
        cpu_call("conv2d", xc, pwc, None, act)
    with pytest.raises(Unsupported, match="string padding"):
        cpu_call("conv2d", xc, pwc, None, static_act(xc, 8), 1, "same")
    with pytest.raises(Unsupported, match="uint8"):
        cpu_call("conv2d_int", torch.zeros(1, 2, 5, 5, dtype=torch.int32), torch.tensor(0), pwc)


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_argument(gen):
    pw = rand_weight(gen, 6, 20, 4)
    act = ActQuant(8, per_token=True)
    x = rand_x(gen, 2, 20)
    s, z = torch.tensor([0.1]), torch.tensor([3])
    cases = [
        (TypeError, "x must be float32, float16 or bfloat16", lambda: C.linear(x.long(), pw, None, act)),
        (ValueError, "x has 21 input features, weight expects K=20", lambda: C.linear(rand_x(gen, 2, 21), pw, None, act)),
        (ValueError, "bias must have 6 elements", lambda: C.linear(x, pw, torch.zeros(5), act)),
        (ValueError, r"bits must be one of \(2, 3, 4, 8\), got 5", lambda: C.quantize(x, s, z, 5)),
        (ValueError, r"axis must be in \[-2, 1\]", lambda: C.quantize(x, s, z, 4, 2)),
        (ValueError, "per-channel scale and zero_point must have 20 elements",
         lambda: C.fake_quant_forward(x, s, z, 4, 1)),
        (ValueError, "per-tensor scale and zero_point must have one element",
         lambda: C.fake_quant_forward(x, torch.ones(2), torch.zeros(2), 4)),
        (ValueError, r"drop_prob must be in \[0, 1\]", lambda: C.fake_quant_forward(x, s, z, 4, None, 1.5)),
        (ValueError, "grad and x must have one shape", lambda: C.fake_quant_backward(x[:1], x, s, z, 4)),
        (ValueError, "base and v must have one shape", lambda: C.adaround_forward(x[:1], x, s, z, 4, None)),
        (TypeError, "codes must be an integer tensor", lambda: C.dequantize(x, s, z)),
        (ValueError, r"act bits must be one of \(4, 8\), got 2", lambda: C._load().cpu_quantize_activation(
            x, None, None, 2, True, False)),
        (ValueError, "static activation quantization needs a_scale and a_zero_point",
         lambda: C._load().cpu_linear(x, *C.tile_weight(pw), pw.scale, 4, 6, 20, None, None, None, 8, False, False)),
        (ValueError, "w_tiles has", lambda: C._load().cpu_linear(x, torch.zeros(7, dtype=torch.uint8),
                                                                 C.tile_weight(pw)[1], pw.scale, 4, 6, 20, None,
                                                                 None, None, 8, True, False)),
    ]
    pwc = rand_weight(gen, 4, 18, 4, shape=(4, 2, 3, 3))
    xc = rand_x(gen, 1, 2, 5, 5)
    sact = static_act(xc, 8)
    cases += [
        (ValueError, "x has 3 channels, weight expects 2", lambda: C.conv2d(rand_x(gen, 1, 3, 5, 5), pwc, None, sact)),
        (ValueError, "is smaller than the dilated kernel", lambda: C.conv2d(rand_x(gen, 1, 2, 2, 2), pwc, None, sact)),
        (ValueError, "stride must be >= 1", lambda: C.conv2d(xc, pwc, None, sact, 0)),
        (ValueError, "must divide the 4 output channels", lambda: C.conv2d(xc, pwc, None, sact, 1, 0, 1, 3)),
        (ValueError, "act.per_token is not supported for conv2d", lambda: C.conv2d(xc, pwc, None, act)),
        (ValueError, "weight must be a packed Conv2d weight", lambda: C.conv2d(xc, pw, None, sact)),
        (TypeError, "x_codes must be uint8", lambda: C._load().cpu_conv2d_int(xc, 0, *C.tile_weight(pwc), 4, [4, 2, 3, 3],
                                                                              [1, 1], [0, 0], [1, 1], 1)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()
