"""What is particular to the CPU backend (dfqkern._C, csrc/cpu): ISA selection, weight layouts and their
cache, thread-independent reductions, and the argument guards of the compiled ops themselves.

The ops against the reference, on every instruction-set level, are in the op suites
(test_quantize.py, test_fake_quant.py, test_adaround.py, test_linear.py, test_conv2d.py).

Random inputs are fresh each run (the seed is in failure messages; pin it with ``DFQKERN_TEST_SEED``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dfqkern.kernels import dispatch, reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import ISAS, Row, supported_isas, assert_equal, rand_params, rand_weight, rand_x, static_act

C = pytest.importorskip("dfqkern.kernels.cpu")
if not C.is_available():
    pytest.skip("dfqkern._C with CPU ops is not built (pip install --no-build-isolation -e .)",
                allow_module_level=True)

BUILD = __import__("dfqkern._C", fromlist=["build_info"]).build_info()
CPU = Row("cpu", "cpu")



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
    with pytest.raises(ValueError, match="'auto', 'amx', 'avx512vnni', 'avx2', 'portable'"):
        with C.use_isa("sse9"):
            pass
    code = "import torch; from dfqkern.kernels import cpu; print(cpu.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DFQKERN_CPU_ISA="portable"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "portable", out.stderr[-2000:]


# ----------------------------------------------------------------------------- reductions

def test_fake_quant_reductions_do_not_depend_on_threads(gen):
    x = rand_x(CPU, gen, 64, 3, 3, 3)
    g = rand_x(CPU, gen, 64, 3, 3, 3, scale=1.0)
    s, z = rand_params(CPU, gen, x.shape, 0, 4)
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


def _run_split_ops(gen_seed: int):
    """One call of each parallelised CPU kernel on small shapes; the outputs as a flat list."""
    gen = torch.Generator().manual_seed(gen_seed)
    out = []
    for m in (1, 37):  # GEMV tiles and GEMM panels
        x = rand_x(CPU, gen, m, 200)
        pw = rand_weight(CPU, gen, 70, 200, 4)
        out.append(C.linear(x, pw, None, static_act(x, 8)))
    x = rand_x(CPU, gen, 3, 24, 11, 13)
    dense = rand_weight(CPU, gen, 16, 24 * 9, 4, shape=(16, 24, 3, 3))
    out.append(C.conv2d(x, dense, None, static_act(x, 8), padding=1))
    dw = rand_weight(CPU, gen, 48, 9, 4, shape=(48, 1, 3, 3))
    out.append(C.conv2d(x, dw, None, static_act(x, 8), padding=1, groups=24))
    s, z = rand_params(CPU, gen, x.shape, 1, 4)
    out.append(C.quantize(x, s, z, 4, 1))
    out.append(C.fake_quant_forward(x, s, z, 4, 1))
    # attention matmul: batch elements split across threads, each thread with its own packing buffers
    a = torch.randint(0, 256, (2, 3, 17, 40), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 19, 40), generator=gen, dtype=torch.uint8).transpose(-2, -1)
    za = torch.randint(0, 256, (2, 3, 17, 1), generator=gen, dtype=torch.int32)
    out.append(C.matmul_int(a, za, b, torch.tensor([9], dtype=torch.int32)))
    return out


def test_thread_split_matches_serial():
    """Small work runs on the calling thread (csrc/cpu/common.h kParallelMinCost); with the threshold
    at 1 every kernel is cut into per-thread chunks. Both give the same bits."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        with C.parallel_min_cost(1 << 40):
            serial = _run_split_ops(7)
        with C.parallel_min_cost(1):
            split = _run_split_ops(7)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(serial, split, strict=True):
        assert torch.equal(a, b)


def test_parallel_min_cost_is_restored_and_checked():
    ops = C._load()
    default = ops.cpu_set_parallel_min_cost(123)
    assert ops.cpu_set_parallel_min_cost(default) == 123
    with C.parallel_min_cost(5):
        assert ops.cpu_set_parallel_min_cost(5) == 5
    assert ops.cpu_set_parallel_min_cost(default) == default
    with pytest.raises(ValueError, match="parallel min cost must be >= 1, got 0"):
        ops.cpu_set_parallel_min_cost(0)


# ----------------------------------------------------------------------------- weight layouts

def test_prepacked_layouts_are_cached(gen):
    pw = rand_weight(CPU, gen, 9, 40, 2)
    act = ActQuant(8, per_token=True)
    x1, x2 = rand_x(CPU, gen, 1, 40), rand_x(CPU, gen, 2, 40)
    with C.use_isa("portable"):  # every level but amx reads these two layouts (amx: the byte copy, tested below)
        _check_cached_layouts(pw, act, x1, x2)


def _check_cached_layouts(pw, act, x1, x2):
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
    pw = rand_weight(CPU, gen, 9, 40, 4)
    args = dict(data=pw.data, zero_point=pw.zero_point, bits=pw.bits, k=pw.k, groups=1) | change
    prepack = getattr(C._load(), C._PREPACK[layout])
    with pytest.raises(ValueError, match=error):
        prepack(args["data"], args["zero_point"], args["bits"], args["k"], args["groups"])


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("m,k,n", [(2, 5, 3), (3, 31, 17), (17, 65, 33), (13, 129, 16), (30, 200, 47), (25, 96, 64)])
def test_both_layouts_every_isa(gen, wbits, m, k, n):
    """Tile and panel layouts through linear_int / linear give the reference's integers at every ISA
    (every row-strip tail of the 12-row VNNI and 4-row AVX2 panel kernels, odd N, K not a multiple of a block)."""
    pw = rand_weight(CPU, gen, n, k, wbits)
    x = rand_x(CPU, gen, m, k)
    act = ActQuant(8, per_token=True)
    pa = R.quantize_activation(x, act)
    ref = R.linear_int(pa, pw)
    ref_y = R.linear(x, pw, None, act)
    tiles, panels = C.tile_weight(pw), C.panel_weight(pw)
    ops = C._load()
    for isa in supported_isas():
        with C.use_isa(isa):
            for w, corr in (tiles, panels):
                got = ops.cpu_linear_int(pa.data, pa.zero_point, pa.bits, pa.k, w, corr, pw.bits, pw.n)
                assert_equal(got, ref)
                y = ops.cpu_linear(x, w, corr, pw.scale, pw.bits, pw.n, pw.k, None, act.scale, act.zero_point,
                                   act.bits, act.per_token, act.symmetric)
                assert_equal(y, ref_y)


# ----------------------------------------------------------------------------- errors

def test_compiled_ops_guard_their_arguments(gen):
    """The C++ wrappers check what they read (called directly, without dispatch's contract)."""
    pw = rand_weight(CPU, gen, 6, 20, 4)
    act = ActQuant(8, per_token=True)
    x = rand_x(CPU, gen, 2, 20)
    s, z = torch.tensor([0.1]), torch.tensor([3])
    cases = [
        (TypeError, "x must be float32, float16 or bfloat16", lambda: C._load().cpu_linear(
            x.long(), *C.tile_weight(pw), pw.scale, 4, 6, 20, None, None, None, 8, True, False)),
        (ValueError, "x has 21 input features, weight expects K=20", lambda: C.linear(rand_x(CPU, gen, 2, 21), pw, None, act)),
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
    pwc = rand_weight(CPU, gen, 4, 18, 4, shape=(4, 2, 3, 3))
    xc = rand_x(CPU, gen, 1, 2, 5, 5)
    sact = static_act(xc, 8)
    cases += [
        (ValueError, "x has 3 channels, weight expects 2", lambda: C.conv2d(rand_x(CPU, gen, 1, 3, 5, 5), pwc, None, sact)),
        (ValueError, "is smaller than the dilated kernel", lambda: C.conv2d(rand_x(CPU, gen, 1, 2, 2, 2), pwc, None, sact)),
        (ValueError, "stride must be >= 1", lambda: C.conv2d(xc, pwc, None, sact, 0)),
        (ValueError, "divide the 4 weight rows", lambda: C.conv2d(xc, pwc, None, sact, 1, 0, 1, 3)),
        (ValueError, r"w_shape must be \[O, C/groups, kh, kw\]", lambda: C.conv2d(xc, pw, None, sact)),
        (TypeError, "x_codes must be uint8", lambda: C._load().cpu_conv2d_int(xc, 0, *C.tile_weight(pwc), 4, [4, 2, 3, 3],
                                                                              [1, 1], [0, 0], [1, 1], 1)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ----------------------------------------------------------------------------- AMX level

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_amx_convs_read_one_byte_per_code_and_match_vnni_bit_for_bit(gen, bits):
    """On the amx level a 2/3/4-bit conv weight is read from an 8-bit copy of its panels (the tiles take bytes;
    unpacking per call was slower than VNNI); the integers, so every output, are the VNNI level's and the
    reference's. 40 channels x 3x3: K = 360 is 5 full 64-k tile steps + a 40-byte tail per call; 2 panels + 8
    rows; stride 2 and padding 1 (the implicit GEMM's segments) and a 1x1 conv (one contiguous row)."""
    if "amx" not in supported_isas():
        pytest.skip("this CPU (or OS) does not offer AMX-INT8: the amx level cannot run here")
    for shape, stride, padding in (((40, 40, 3, 3), 2, 1), ((40, 40, 1, 1), 1, 0)):
        pw = rand_weight(CPU, gen, shape[0], shape[1] * shape[2] * shape[3], bits, shape=shape)
        x = rand_x(CPU, gen, 2, 40, 11, 13)
        act = static_act(x, 8)
        b = torch.randn(40, generator=gen)
        with C.use_isa("amx"):
            got = C.conv2d(x, pw, b, act, stride, padding)
        assert (("byte_panel", 1) in pw.cache["cpu"]) == (bits != 8)
        with C.use_isa("avx512vnni"):
            vnni = C.conv2d(x, pw, b, act, stride, padding)
        assert torch.equal(got, vnni)
        assert_equal(got, R.conv2d(x, pw, b, act, stride, padding), bits=bits, shape=shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_amx_linear_rows_read_one_byte_per_code_and_match_vnni_bit_for_bit(gen, bits):
    """Several rows on the amx level: 2/4-bit weights from the byte copy (the eager op and the frozen call), one
    row from the tile layout; every output the VNNI level's. K = 200: 3 full 64-k steps + an 8-byte tail."""
    if "amx" not in supported_isas():
        pytest.skip("this CPU (or OS) does not offer AMX-INT8: the amx level cannot run here")
    pw = rand_weight(CPU, gen, 40, 200, bits)
    b = torch.randn(40, generator=gen)
    for x in (rand_x(CPU, gen, 37, 200), rand_x(CPU, gen, 200)):
        act = static_act(x, 8)
        with C.use_isa("amx"):
            got = C.linear(x, pw, b, act)
            frozen = C.linear_call(pw, b, act)(x)
        with C.use_isa("avx512vnni"):
            vnni = C.linear(x, pw, b, act)
        assert torch.equal(got, vnni) and torch.equal(frozen, vnni)
        assert_equal(got, R.linear(x, pw, b, act), bits=bits, rows=x.numel() // 200)
    assert (("byte_panel", 1) in pw.cache["cpu"]) == (bits != 8)
