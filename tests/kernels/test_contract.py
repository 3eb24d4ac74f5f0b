"""The argument contract (dfqkern.kernels.contract): every backend row, reached through dispatch, rejects
bad input with the same error naming the argument; what a backend declines falls back; the rounding
constants the C++ / CUDA kernels use equal the Python definition.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dfqkern.kernels import Unsupported, contract, dispatch
from dfqkern.kernels import reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import assert_close, assert_equal, rand_weight, rand_x, static_act

ROOT = Path(__file__).resolve().parents[2]


def _bad_calls(row, gen):
    """(exception, message regex, op, args, kwargs) for every argument the contract checks."""
    x = rand_x(row, gen, 2, 20)
    pw = rand_weight(row, gen, 6, 20, 4)
    act = ActQuant(8, per_token=True)
    s, z = row.dev(torch.tensor([0.1])), row.dev(torch.tensor([3]))
    x43 = rand_x(row, gen, 4, 3)
    pwc = rand_weight(row, gen, 4, 18, 4, shape=(4, 2, 3, 3))
    xc = rand_x(row, gen, 1, 2, 5, 5)
    sact = static_act(xc, 8)
    pa = R.quantize_activation(rand_x(row, gen, 2, 12), act)
    meta1 = torch.ones(1, device="meta")
    qkv, s3, z3 = rand_x(row, gen, 1, 5, 12), row.dev(torch.full((3,), 0.1)), row.dev(torch.zeros(3, dtype=torch.int32))
    return [
        (TypeError, "x must be a torch.Tensor", "quantize", ([1.0], s, z, 4), {}),
        (TypeError, "x must be a floating-point tensor", "quantize", (x.to(torch.int32), s, z, 4), {}),
        (ValueError, r"bits must be one of \(2, 3, 4, 8\), got 5", "quantize", (x, s, z, 5), {}),
        (ValueError, r"axis must be in \[-2, 1\]", "quantize", (x, s, z, 4, 2), {}),
        (ValueError, "scale: per-channel parameter has 3 elements but input has 4 along axis 0", "quantize",
         (x43, row.dev(torch.ones(3)), row.dev(torch.zeros(3)), 4, 0), {}),
        (ValueError, "scale: per-tensor parameter must have one element", "fake_quant_forward",
         (x, row.dev(torch.ones(2)), row.dev(torch.zeros(2)), 4), {}),
        (ValueError, "scale: per-channel parameter has 1 elements but input has 20 along axis 1",
         "fake_quant_forward", (x, s, z, 4, 1), {}),
        (ValueError, r"drop_prob must be in \[0, 1\]", "fake_quant_forward", (x, s, z, 4, None, 1.5), {}),
        (ValueError, "tensors must be on one device, got x=.*, scale=meta", "fake_quant_forward", (x, meta1, z, 4), {}),
        (ValueError, "grad and x must have one shape", "fake_quant_backward", (x[:1], x, s, z, 4), {}),
        (TypeError, "codes must be an integer tensor", "dequantize", (x, s, z), {}),
        (ValueError, "base and v must have one shape", "adaround_forward", (x[:1], x, s, z, 4, None), {}),
        (TypeError, "v must be a floating-point tensor", "adaround_forward", (x, x.int(), s, z, 4, None), {}),
        (ValueError, "grad and v must have one shape", "adaround_backward", (x[:1], x, x, s, z, 4, None), {}),
        (ValueError, r"x must be 2-D \[M, K\]", "quantize_activation", (rand_x(row, gen, 2, 2, 10), act), {}),
        (ValueError, "activation K=12 does not match weight K=20", "linear_int", (pa, pw), {}),
        (TypeError, "x must be a floating-point tensor", "linear", (x.long(), pw, None, act), {}),
        (ValueError, "x has 21 input features, weight expects K=20", "linear", (rand_x(row, gen, 2, 21), pw, None, act), {}),
        (ValueError, "bias must have 6 elements, got 5", "linear", (x, pw, row.dev(torch.zeros(5)), act), {}),
        (ValueError, "bias=meta", "linear", (x, pw, torch.zeros(6, device="meta"), act), {}),
        (ValueError, "out_dtype must be a floating-point", "linear", (x, pw, None, act, torch.int32), {}),
        (TypeError, "pw must be a PackedWeight", "linear", (x, pw.data, None, act), {}),
        (ValueError, "x has 3 channels, weight expects 2", "conv2d", (rand_x(row, gen, 1, 3, 5, 5), pwc, None, sact), {}),
        (ValueError, "is smaller than the dilated kernel", "conv2d", (rand_x(row, gen, 1, 2, 2, 2), pwc, None, sact), {}),
        (ValueError, "stride must be >= 1", "conv2d", (xc, pwc, None, sact, 0), {}),
        (ValueError, "padding must be >= 0", "conv2d", (xc, pwc, None, sact, 1, -1), {}),
        (ValueError, "must divide the 4 output channels", "conv2d", (xc, pwc, None, sact, 1, 0, 1, 3), {}),
        (ValueError, "act.per_token is not supported for conv2d", "conv2d", (xc, pwc, None, act), {}),
        (ValueError, "weight must be a packed Conv2d weight", "conv2d", (xc, pw, None, sact), {}),
        (ValueError, r"x must be NCHW", "conv2d", (xc[0], pwc, None, sact), {}),
        (ValueError, "act.zero_point must lie in", "conv2d",
         (xc, pwc, None, ActQuant(8, row.dev(torch.tensor([0.1])), torch.tensor([300]))), {}),
        (ValueError, "x=meta", "linear", (torch.randn(2, 20, device="meta"), pw, None, act), {}),
        (ValueError, "x=meta", "conv2d", (torch.randn(1, 2, 5, 5, device="meta"), pwc, None, sact), {}),
        (TypeError, "x must be a floating-point tensor", "conv2d", (xc.to(torch.int64), pwc, None, sact), {}),
        (ValueError, "weight must be a packed Conv2d weight", "conv2d_int",
         (row.dev(torch.zeros(1, 2, 5, 5, dtype=torch.uint8)), z, pw), {}),
        (ValueError, "x_codes must be NCHW", "conv2d_int", (torch.zeros(2, 5, 5, dtype=torch.uint8), z, pwc), {}),
        (ValueError, "stride must be an int or a pair of ints", "conv2d_int",
         (row.dev(torch.zeros(1, 2, 5, 5, dtype=torch.uint8)), z, pwc, (1, 2, 3)), {}),
        (TypeError, "qkv must be float32", "attention_qkv", (qkv.half(), 2, 0.5, s3, z3, 8, 0.1, 0.2, 7), {}),
        (ValueError, r"qkv must be \[B, N, 3 \* heads \* head_dim\] with heads=2", "attention_qkv",
         (qkv[..., :-3], 2, 0.5, s3, z3, 8, 0.1, 0.2, 7), {}),
        (ValueError, "scale and zero_point must have 3 .* or 3 \\* heads = 6", "attention_qkv",
         (qkv, 2, 0.5, s3[:2], z3[:2], 8, 0.1, 0.2, 7), {}),
        (TypeError, "zero_point must be an integer tensor", "attention_qkv", (qkv, 2, 0.5, s3, s3, 8, 0.1, 0.2, 7), {}),
        (ValueError, "fine and coarse must be finite and > 0", "attention_qkv",
         (qkv, 2, 0.5, s3, z3, 8, 0.1, float("inf"), 7), {}),
        (ValueError, "levels must be an int in", "attention_qkv", (qkv, 2, 0.5, s3, z3, 8, 0.1, 0.2, 0), {}),
        (ValueError, f"tokens and head_dim must be at most {contract.MATMUL_MAX_K}", "attention_qkv",
         (torch.zeros(1, 1, 6 * (contract.MATMUL_MAX_K + 1), device=row.device), 2, 0.5, s3, z3, 8, 0.1, 0.2, 7), {}),
        (ValueError, "qkv=.*, scale=meta", "attention_qkv",
         (qkv, 2, 0.5, torch.ones(3, device="meta"), z3, 8, 0.1, 0.2, 7), {}),
    ]


def test_errors_name_the_argument(row, gen):
    """Through dispatch, every backend row gets the contract's error (checked before any backend runs)."""
    for exc, msg, op, args, kwargs in _bad_calls(row, gen):
        with pytest.raises(exc, match=msg):
            dispatch.call(op, row.device, *args, backend=row.backend, **kwargs)


def test_reference_act_quant_errors():
    with pytest.raises(ValueError, match=r"act bits must be one of \(4, 8\)"):
        ActQuant(2, per_token=True)
    with pytest.raises(ValueError, match="static activation quantization needs scale and zero_point"):
        ActQuant(8)


def test_unsupported_combinations_fall_back(row, gen):
    """What a backend declines raises Unsupported when forced (strict) and falls back automatically."""
    pw = rand_weight(row, gen, 6, 20, 4)
    x = rand_x(row, gen, 2, 20)
    cw = rand_weight(row, gen, 4, 9 * 2, 4, shape=(4, 2, 3, 3))
    xc = rand_x(row, gen, 1, 4, 6, 6)
    act = static_act(xc, 8)
    calls = [("linear", (x, pw, None, None)),  # weight-only
             ("conv2d", (xc, cw, None, act, 1, 0, 1, 2)),  # grouped, not depthwise
             ("conv2d", (xc, rand_weight(row, gen, 4, 36, 4, shape=(4, 4, 3, 3)), None, act, 1, "same")),
             ("conv2d_int", (row.dev(torch.zeros(1, 2, 5, 5, dtype=torch.int32)), row.dev(torch.tensor(0)),
                             rand_weight(row, gen, 4, 18, 4, shape=(4, 2, 3, 3))))]  # int32 codes
    mod = dispatch.backend_module(dispatch.Backend(row.backend))
    for op, args in calls:
        ref = getattr(R, op)(*args)
        try:
            got = getattr(mod, op)(*args)
        except Unsupported:
            with pytest.raises(Unsupported):
                dispatch.call(op, row.device, *args, backend=row.backend)
            got = dispatch.call(op, row.device, *args)  # automatic order: a later backend serves it
        if ref.dtype.is_floating_point:
            assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5, op=op, row=row.id)
        else:
            assert_equal(got, ref, op=op, row=row.id)


# ----------------------------------------------------------------------------- rounding constants

def _header_constant(text: str, name: str) -> float:
    m = re.search(rf"constexpr (?:float|double) {name} = ([^;]+);", text)
    assert m, f"{name} not found in csrc/common/rounding.h"
    expr = re.sub(r"(\d)f\b", r"\1", m.group(1).replace("static_cast<float>", ""))  # 1.1f -> 1.1
    return float(eval(expr, {}))  # noqa: S307  (a numeric literal expression from our own header)


def test_cpp_rounding_constants_equal_python():
    """csrc/common/rounding.h (read by csrc/cpu and csrc/cuda) holds the contract's values."""
    text = (ROOT / "csrc" / "common" / "rounding.h").read_text()
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    assert f32(_header_constant(text, "kZeta")) == f32(contract.ZETA)
    assert f32(_header_constant(text, "kGamma")) == f32(contract.GAMMA)
    assert f32(_header_constant(text, "kStretch")) == f32(contract.ZETA - contract.GAMMA)
    assert f32(_header_constant(text, "kScaleEps")) == f32(contract.SCALE_EPS)
    for src in list((ROOT / "csrc").rglob("*.cpp")) + list((ROOT / "csrc").rglob("*.cu")) + \
            list((ROOT / "csrc").rglob("*.h")) + list((ROOT / "csrc").rglob("*.cuh")):
        if src.name != "rounding.h":  # no second definition anywhere else
            assert not re.search(r"1e-8f|constexpr float k(Zeta|Gamma|Stretch|ScaleEps)\b", src.read_text()), src


def test_reference_reads_the_contract_constants():
    assert (R.ZETA, R.GAMMA, R.SCALE_EPS) == (contract.ZETA, contract.GAMMA, contract.SCALE_EPS)
    assert R.Unsupported is contract.Unsupported
    scale, _ = R.qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 4, False)
    assert scale.item() == pytest.approx(contract.SCALE_EPS)


def test_pair_and_output_size():
    assert contract.pair(3, "stride") == (3, 3) and contract.pair((1, 2), "stride") == (1, 2)
    assert contract.pair([2], "stride") == (2, 2)
    with pytest.raises(Unsupported, match="string padding"):
        contract.pair("same", "padding")
    with pytest.raises(ValueError, match="dilation must be an int or a pair of ints"):
        contract.pair((1, 2.5), "dilation")
    assert contract.conv_output_size(7, 6, 3, 3, (2, 1), (1, 0), (1, 2)) == (4, 2)
