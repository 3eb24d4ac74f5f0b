"""linear_int / linear (packed GEMM) on every backend row against the reference.

Exact: int32 results. Float outputs: see ``assert_float_output`` (cpu exact, triton / cuda 1 ulp).
Weight-only Linear: at most about twice as far from fp64 as the reference (DESIGN's float rule).
"""
from __future__ import annotations

import pytest
import torch

from dfqkern.formats import PackedWeight, code_max, symmetric_zero_point
from dfqkern.kernels import reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import (assert_equal, assert_float_output, assert_nan_equal, ctx, make_act, rand_weight, rand_x,
                          with_nonfinite)

# (m, k, n): M = 1 / 3 / 17 / 64, K odd and not a multiple of any tile, N odd, K = 5 with N = 1
GEMM_SHAPES = [(1, 77, 13), (3, 63, 5), (17, 300, 9), (1, 5, 1), (4, 129, 8), (1, 512, 12), (64, 69, 33),
               (3, 33, 5), (200, 131, 24)]
ACTS = [(False, False), (True, False), (True, True)]  # (per_token, symmetric)


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("per_token,symmetric", ACTS)
def test_linear_int_and_linear(row, gen, wbits, abits, m, k, n, per_token, symmetric):
    pw = rand_weight(row, gen, n, k, wbits)
    x = rand_x(row, gen, m, k)
    bias = rand_x(row, gen, n)
    act = make_act(x, abits, per_token, symmetric)
    why = dict(row=row.id, wbits=wbits, abits=abits, m=m, k=k, n=n, per_token=per_token, sym=symmetric)
    pa = R.quantize_activation(x, act)
    assert_equal(row.call("linear_int", pa, pw), R.linear_int(pa, pw), op="linear_int", **why)
    assert_float_output(row, row.call("linear", x, pw, bias, act), R.linear(x, pw, bias, act), op="linear", **why)
    assert_float_output(row, row.call("linear", x, pw, None, act), R.linear(x, pw, None, act), op="no bias", **why)


def test_linear_int_large_k(row, gen):
    """A longer K (split-K on CUDA, several K blocks everywhere); every row against the reference."""
    for m, k, n in [(9, 4100, 70), (1, 4096, 64)]:
        pw = rand_weight(row, gen, n, k, 4)
        pa = R.quantize_activation(rand_x(row, gen, m, k), ActQuant(8, per_token=True))
        assert_equal(row.call("linear_int", pa, pw), R.linear_int(pa, pw), row=row.id, m=m, k=k)


def test_linear_int_extreme_codes(row, gen):
    # all-max codes and extreme zero points stress int8 centering and the row-sum corrections
    k, n = 300, 5
    for wbits, abits in [(8, 8), (4, 8), (8, 4), (2, 4)]:
        codes = torch.full((n, k), code_max(wbits))
        codes[1] = 0
        zp = torch.tensor([0, code_max(wbits), 1, symmetric_zero_point(wbits), 0])
        pw = PackedWeight.from_codes(row.dev(codes), row.dev(torch.ones(n)), row.dev(zp), wbits)
        x = row.dev(torch.cat([torch.full((2, k), 100.0), torch.full((2, k), -100.0),
                               torch.randn(1, k, generator=gen)]))
        for za in (0, code_max(abits)):
            pa = R.quantize_activation(x, ActQuant(abits, row.dev(torch.tensor([0.5])), row.dev(torch.tensor([za]))))
            assert_equal(row.call("linear_int", pa, pw), R.linear_int(pa, pw), wbits=wbits, abits=abits, za=za)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("per_token,symmetric", ACTS)
def test_linear_leading_dims_and_dtypes(row, gen, dtype, out_dtype, per_token, symmetric):
    k, n = 46, 19
    pw = rand_weight(row, gen, n, k, 4, symmetric=symmetric)
    x = rand_x(row, gen, 2, 3, k, dtype=dtype)
    act = make_act(x, 8, per_token, symmetric)
    bias = rand_x(row, gen, n)
    got = row.call("linear", x, pw, bias, act, out_dtype)
    ref = R.linear(x, pw, bias, act, out_dtype)
    assert got.shape == (2, 3, n) and got.dtype == (out_dtype or dtype)
    assert_float_output(row, got, ref, row=row.id, dtype=dtype, out_dtype=out_dtype)


@pytest.mark.parametrize("wbits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_weight_only(row, gen, wbits, dtype):
    k, n = 69, 33
    pw = rand_weight(row, gen, n, k, wbits)
    x = rand_x(row, gen, 17, k, dtype=dtype)
    bias = rand_x(row, gen, n)
    got = row.call("linear", x, pw, bias, None, torch.float32)
    ref = R.linear(x, pw, bias, None, torch.float32)
    exact = x.double() @ pw.dequantize().double().T + bias.double()
    err, ref_err = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-7 * exact.abs().max(), ctx(err=float(err), ref_err=float(ref_err), wbits=wbits)
    if dtype == torch.float16:  # default out dtype follows x
        assert row.call("linear", x, pw, bias).dtype == torch.float16



@pytest.mark.parametrize("wbits", [2, 4, 8])
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("m,k,n", [(1, 77, 13), (17, 300, 9), (64, 69, 33)])
@pytest.mark.parametrize("per_token,symmetric", ACTS)
def test_linear_nonfinite_rows_are_nan(row, gen, wbits, abits, m, k, n, per_token, symmetric):
    """A row holding NaN / +Inf / -Inf gives NaN in every output feature; other rows are unchanged."""
    pw = rand_weight(row, gen, n, k, wbits)
    clean = rand_x(row, gen, m, k)
    act = make_act(clean, abits, per_token, symmetric)
    x = with_nonfinite(clean, gen, count=3)
    bias = rand_x(row, gen, n)
    why = dict(row=row.id, wbits=wbits, abits=abits, m=m, k=k, n=n, per_token=per_token, sym=symmetric)
    want = R.linear(x, pw, bias, act)
    bad_rows = ~torch.isfinite(x).all(dim=1)
    assert bool(torch.isnan(want[bad_rows]).all()) and not bool(torch.isnan(want[~bad_rows]).any()), ctx(**why)
    assert_nan_equal(row, row.call("linear", x, pw, bias, act), want, op="linear nonfinite", **why)
    assert_nan_equal(row, row.call("linear", x, pw, None, act), R.linear(x, pw, None, act), op="no bias", **why)
