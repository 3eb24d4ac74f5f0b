"""attention_qkv (the packed attention core on a fused qkv projection's output) on every backend row.

Bit for bit against the reference (which uses torch's softmax, as the compiled op does): attention shapes,
1-sized and odd dims, per-tensor and per-head operand parameters, 4- and 8-bit codes, q scalings that round
in float32, non-finite inputs, NaN rows (scores that overflow), non-contiguous qkv; the reference itself
against the step-by-step definition; argument errors (the contract through dispatch, the C++ guards
directly). The CPU rows run each ISA level's elementwise and matmul kernels."""
from __future__ import annotations

import math

import pytest
import torch

from dfqkern.kernels import contract, dispatch, reference as R
from kernel_cases import assert_equal, assert_nan_equal, cpu_backend

# (B, N, heads, head_dim): the CIFAR ViT at batch 1, then awkward ones
SHAPES = [(1, 65, 4, 32), (2, 5, 1, 3), (3, 1, 2, 8), (1, 17, 3, 7), (2, 33, 2, 16)]


def _params(gen, heads: int, per_head: bool, bits: int, spread: float = 1.0):
    """(scale, zero_point, fine, coarse, levels) as a calibrated module holds them."""
    n = 3 * heads if per_head else 3
    scale = (torch.rand(n, generator=gen) * 0.05 + 0.01) * spread
    zero = torch.randint(0, 2 ** bits, (n,), generator=gen, dtype=torch.int32)
    levels = 2 ** (bits - 1) - 1
    shift = int(torch.randint(0, 9, (1,), generator=gen))
    fine = torch.tensor(1.0 / (levels * 2 ** shift), dtype=torch.float32)
    return scale, zero, float(fine), float(fine * 2 ** shift), levels


def _qkv(gen, b, n, heads, d, scale=2.0):
    return torch.randn(b, n, 3 * heads * d, generator=gen) * scale


@pytest.mark.parametrize("b,n,heads,d", SHAPES)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "head"])
@pytest.mark.parametrize("bits", [8, 4])
def test_attention_qkv_random(row, gen, b, n, heads, d, per_head, bits):
    scale, zero, fine, coarse, levels = _params(gen, heads, per_head, bits)
    qkv = row.dev(_qkv(gen, b, n, heads, d))
    args = (heads, d ** -0.5, row.dev(scale), row.dev(zero), bits, fine, coarse, levels)
    got = row.call("attention_qkv", qkv, *args)
    assert got.shape == (b, n, heads * d) and got.dtype == torch.float32 and got.is_contiguous()
    assert_equal(got, R.attention_qkv(qkv, *args), row=row.id, shape=(b, n, heads, d), per_head=per_head,
                 bits=bits)


def test_attention_qkv_nonfinite_and_nan_rows(row, gen):
    """NaN / Inf in qkv saturate like quantize; scores that overflow to inf make a NaN probability row, whose
    outputs are NaN (as the float path's); the other rows stay finite."""
    heads, d = 2, 8
    scale, zero, fine, coarse, levels = _params(gen, heads, True, 8)
    qkv = _qkv(gen, 2, 9, heads, d)
    qkv[0, 1, 3] = math.nan
    qkv[1, 4, 20] = math.inf
    qkv[1, 2, 40] = -math.inf
    # Head 0's q scale: every finite q of head 0 quantizes to its zero point, but the NaN (batch 0, query 1,
    # dim 3) quantizes to code 0, so (q - zq) = -128 there; key 0's dim 3 sits below its zero point, so that
    # score is positive and overflows to +inf: query 1's probabilities are NaN. Pinned, not random: a random
    # zq of 0, or keys all on one side of zk, left no +inf (~1 run in 100).
    scale[0] = 3e38
    zero[0] = zero[heads] = 128
    qkv[0, 0, heads * d + 3] = -1.0
    args = (heads, d ** -0.5, row.dev(scale), row.dev(zero), 8, fine, coarse, levels)
    got = row.call("attention_qkv", row.dev(qkv), *args)
    want = R.attention_qkv(qkv, *args[:2], scale, zero, *args[4:])
    assert torch.isnan(want).any() and not torch.isnan(want[..., d:]).any()  # NaN only in head 0's columns
    assert_nan_equal(row, got, want, exact=True, row=row.id)


def test_attention_qkv_reads_a_non_contiguous_qkv(row, gen):
    heads, d = 2, 4
    scale, zero, fine, coarse, levels = _params(gen, heads, False, 8)
    qkv = _qkv(gen, 2, 11, heads, 2 * d)[..., ::2]  # every other column of a wider tensor
    assert not qkv.is_contiguous()
    args = (heads, 0.3, row.dev(scale), row.dev(zero), 8, fine, coarse, levels)
    assert_equal(row.call("attention_qkv", row.dev(qkv), *args), R.attention_qkv(qkv.contiguous(), *args))


def test_reference_follows_the_step_by_step_definition(gen):
    """The reference twin against the definition written out with one matmul per code range and the
    quantizer's own codes: quantize (q scaled first), q.k^T, softmax, two-range codes, attn.v."""
    from dfqkern.nn.attention import SoftmaxQuantizer

    b, n, heads, d = 2, 7, 3, 4
    scale, zero, _, _, _ = _params(gen, heads, True, 8)
    sq = SoftmaxQuantizer(8)
    sq.shift.fill_(3)
    sq.scale.fill_(1.0 / (sq.levels * 8))
    fine, coarse = sq.steps()
    qkv = _qkv(gen, b, n, heads, d)
    q_mult = d ** -0.5
    x = qkv.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    s, z = scale.reshape(3, 1, heads, 1, 1), zero.reshape(3, 1, heads, 1, 1)
    q = R.quantize(x[0] * torch.tensor(q_mult, dtype=torch.float32), scale[:heads], zero[:heads], 8, 1)
    k = R.quantize(x[1], scale[heads:2 * heads], zero[heads:2 * heads], 8, 1)
    v = R.quantize(x[2], scale[2 * heads:], zero[2 * heads:], 8, 1)
    scores = (q.double() - z[0]) @ (k.double() - z[1]).transpose(-2, -1)
    probs = (scores.float() * (s[0] * s[1])).softmax(-1)
    c_fine, c_coarse = sq.codes(probs, fine, coarse)
    vv = v.double() - z[2]
    out = ((c_fine.double() @ vv).float() * fine + (c_coarse.double() @ vv).float() * coarse) * s[2]
    want = out.transpose(1, 2).reshape(b, n, heads * d)
    got = R.attention_qkv(qkv, heads, q_mult, scale, zero, 8, float(fine), float(coarse), sq.levels)
    assert c_fine.any() and c_coarse.any()  # both ranges in use
    assert torch.equal(got, want)


def test_reference_softmax_codes_are_the_quantizer_codes(gen):
    from dfqkern.nn.attention import SoftmaxQuantizer

    sq = SoftmaxQuantizer(4)
    sq.shift.fill_(2)
    sq.scale.fill_(1.0 / (sq.levels * 4))
    fine, coarse = sq.steps()
    p = (torch.randn(3, 5, 11, generator=gen) * 3).softmax(-1)
    edge = (sq.levels + 0.5) * fine  # the range boundary and its neighbours, 0, 1, NaN, +-inf
    p[0, 0, :6] = torch.stack([edge, torch.nextafter(edge, torch.tensor(0.0)), torch.nextafter(edge, torch.tensor(1.0)),
                               torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.nan)])
    p[1, 1, :2] = torch.tensor([math.inf, -math.inf])
    got, want = R.softmax_codes(p, fine, coarse, sq.levels), sq.codes(p, fine, coarse)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- errors and the CPU op itself

def _ok(gen, heads=2, d=4):
    scale, zero, fine, coarse, levels = _params(gen, heads, False, 8)
    return [_qkv(gen, 1, 5, heads, d), heads, 0.5, scale, zero, 8, fine, coarse, levels]


@pytest.mark.parametrize("i,value,exc,msg", [
    (0, "float64", TypeError, "qkv must be float32"),
    (0, "2d", ValueError, r"qkv must be \[B, N, 3 \* heads \* head_dim\]"),
    (0, "odd_width", ValueError, r"qkv must be \[B, N, 3 \* heads \* head_dim\]"),
    (1, 0, ValueError, "heads must be"),
    (2, math.inf, ValueError, "q_mult must be finite"),
    (3, "int_scale", TypeError, "scale must be a floating-point tensor"),
    (3, "two", ValueError, "scale and zero_point must have 3"),
    (4, "float_zp", TypeError, "zero_point must be an integer tensor"),
    (5, 5, ValueError, "bits"),
    (6, 0.0, ValueError, "fine and coarse must be finite and > 0"),
    (8, 256, ValueError, "levels must be"),
])
def test_contract_errors_name_the_argument(gen, i, value, exc, msg):
    args = _ok(gen)
    conv = {"float64": lambda a: a.double(), "2d": lambda a: a[0], "odd_width": lambda a: a[..., :-1],
            "int_scale": lambda a: a.int(), "two": lambda a: a[:2], "float_zp": lambda a: a.float()}
    args[i] = conv[value](args[i]) if isinstance(value, str) else value
    for backend in ("reference", "cpu"):
        if backend not in dispatch.available_backends():
            continue
        with pytest.raises(exc, match=msg):
            dispatch.attention_qkv(*args, backend=backend)


def test_cpu_runs_the_compiled_kernel_not_the_reference(gen, monkeypatch):
    cpu = cpu_backend()
    args = _ok(gen)
    want = R.attention_qkv(*args)

    def gone(*a, **k):
        raise AssertionError("the CPU backend fell back to the reference")

    monkeypatch.setattr(R, "attention_qkv", gone)
    assert_equal(dispatch.attention_qkv(*args, backend="cpu"), want)
    assert_equal(cpu.attention_qkv(*args), want)


@pytest.mark.parametrize("direct", [True, False], ids=["pybind", "dispatcher"])
def test_cpu_op_guards_its_arguments(gen, direct):
    """The C++ wrapper checks what it reads (called directly, without dispatch's contract)."""
    ops = cpu_backend()._load()
    op = __import__("dfqkern._C", fromlist=["cpu_attention_qkv"]).cpu_attention_qkv if direct \
        else ops.cpu_attention_qkv
    qkv, heads, m, s, z, bits, fine, coarse, levels = _ok(gen)
    cases = [
        (TypeError, "qkv must be float32", lambda: op(qkv.half(), heads, m, s, z, bits, fine, coarse, levels)),
        (ValueError, "qkv must be", lambda: op(qkv[..., :-1], heads, m, s, z, bits, fine, coarse, levels)),
        (ValueError, "heads must be >= 1", lambda: op(qkv, 0, m, s, z, bits, fine, coarse, levels)),
        (ValueError, "bits must be one of", lambda: op(qkv, heads, m, s, z, 5, fine, coarse, levels)),
        (TypeError, "scale must be a floating-point", lambda: op(qkv, heads, m, z, z, bits, fine, coarse, levels)),
        (TypeError, "zero_point must be an integer", lambda: op(qkv, heads, m, s, s, bits, fine, coarse, levels)),
        (ValueError, "scale and zero_point must have 3", lambda: op(qkv, heads, m, s[:2], z[:2], bits, fine, coarse,
                                                                    levels)),
        (ValueError, "q_mult must be finite", lambda: op(qkv, heads, math.nan, s, z, bits, fine, coarse, levels)),
        (ValueError, "fine and coarse must be", lambda: op(qkv, heads, m, s, z, bits, -1.0, coarse, levels)),
        (ValueError, r"levels must be in \[1, 255\]", lambda: op(qkv, heads, m, s, z, bits, fine, coarse, 0)),
    ]
    big = torch.zeros(1, contract.MATMUL_MAX_K + 1, 6)  # more tokens than an exact int32 attn.v allows
    cases.append((ValueError, f"tokens and head_dim must be at most {contract.MATMUL_MAX_K}",
                  lambda: op(big, heads, m, s, z, bits, fine, coarse, levels)))
    if direct:  # the dispatcher would route a meta operand away from the CPU kernel before the wrapper runs
        cases.append((ValueError, "qkv must be a CPU tensor",
                      lambda: op(qkv.to("meta"), heads, m, s, z, bits, fine, coarse, levels)))
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()
