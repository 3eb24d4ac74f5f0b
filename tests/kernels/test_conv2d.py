"""conv2d_int / conv2d (packed convolution) on every backend row against the reference.

One case list (:class:`kernel_cases.ConvCase`): dense, strided, dilated, 1x1, 7x7 stem-like,
depthwise (with channel multiplier), grouped, output 1x1. A backend that does not cover a case
(grouped convolution on triton / cuda, 8-bit weights on cuda) declines it and the row skips.
Exact: int32 results; float outputs as ``assert_float_output``.
"""
from __future__ import annotations

import pytest
import torch

from dfqkern.kernels import reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import ConvCase as CC
from kernel_cases import assert_equal, assert_float_output, assert_nan_equal, ctx, rand_x, static_act, with_nonfinite

CONV_CASES = [
    CC(1, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1, "3x3 same"),
    CC(2, 6, 10, 7, 9, 3, 2, 2, (1, 0), (1, 2), 1, "non-square kernel, stride, asymmetric padding, dilation"),
    CC(1, 3, 13, 13, 8, 7, 7, 2, 3, 1, 1, "stem-like, K = 147"),
    CC(1, 8, 8, 8, 8, 3, 3, 2, 1, 1, 8, "depthwise, strided"),
    CC(1, 6, 9, 9, 12, 3, 3, 1, 2, 2, 6, "depthwise with channel multiplier 2, dilated"),
    CC(2, 10, 7, 6, 10, 5, 5, 1, 2, 1, 10, "depthwise 5x5, odd channels"),
    CC(1, 4, 9, 9, 8, 3, 3, 1, 2, 2, 4, "C/groups = 1 via groups = C"),
    CC(2, 8, 6, 6, 12, 3, 3, 1, 1, 1, 2, "grouped"),
    CC(1, 12, 5, 5, 9, 3, 3, 3, 1, 1, 3, "grouped, stride 3, 3 groups of 4 in / 3 out"),
    CC(1, 70, 5, 5, 33, 1, 1, 1, 0, 1, 1, "1x1, K not a multiple of 32"),
    CC(1, 16, 6, 6, 10, 1, 1, 2, 0, 1, 1, "1x1 strided (downsample)"),
    CC(1, 20, 4, 4, 5, 4, 4, 1, 0, 1, 1, "output 1x1"),
    CC(2, 5, 7, 6, 7, 1, 1, 1, 0, 1, 1, "1x1, odd channels"),
    CC(2, 3, 9, 8, 5, 3, 3, 2, 0, 1, 1, "stride 2, no padding"),
    CC(1, 4, 9, 9, 3, 3, 3, 1, 2, 2, 1, "dilation 2"),
    CC(2, 16, 8, 7, 33, 3, 3, 2, 1, 1, 1, "16 channels, 33 outputs"),
    CC(2, 64, 7, 7, 64, 1, 1, 1, 0, 1, 1, "64 channels 1x1"),
    CC(1, 5, 6, 10, 3, 1, 3, (2, 1), (0, 1), (1, 2), 1, "1x3 kernel, mixed stride / dilation"),
    # the CPU layout step transposes 16-channel x 16-pixel blocks (the partial channel block first) and
    # im2col builds a few output rows at a time (~16 KiB of GEMM rows): partial blocks, several chunks
    CC(1, 24, 7, 9, 16, 3, 3, 1, 1, 1, 1, "24 channels: a whole and a partial 16-channel block"),
    CC(1, 3, 20, 35, 16, 3, 3, 1, 1, 1, 1, "3x3 stem, C = 3, rows of 35 pixels, several im2col chunks"),
    CC(1, 36, 6, 7, 12, 3, 3, 1, 1, 1, 2, "grouped, 2 groups of 18 channels"),
    CC(1, 64, 8, 6, 16, 3, 3, 1, 1, 1, 1, "64 channels 3x3, several im2col chunks"),
    CC(1, 16, 23, 23, 20, 3, 3, 2, 1, 1, 1, "16 channels, stride 2, odd size, several im2col chunks"),
    # the CPU implicit GEMM (kernel rows of kw * C codes read in place from a padded image: groups 1, dilation_w 1,
    # kw * C a whole number of K blocks): per-segment skips with row dilation, strides, asymmetric padding, batches,
    # output rows longer than the micro-kernel's 12 (AVX-512) / 4 (AVX2) rows
    CC(2, 16, 9, 10, 20, 3, 5, (1, 2), (2, 1), (2, 1), 1, "implicit GEMM: 3x5, stride (1, 2), dilation (2, 1)"),
    CC(1, 32, 5, 37, 17, 2, 3, 1, (0, 2), 1, 1, "implicit GEMM: 2x3, 32 ch, 39-pixel output rows"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_conv2d_int(row, gen, case, wbits):
    pw = case.weight(row, gen, wbits)
    x = row.dev(torch.randint(0, 256, (case.n, case.c, case.h, case.w), generator=gen, dtype=torch.uint8))
    zp = row.dev(torch.randint(0, 256, (1,), generator=gen))
    ref = R.conv2d_int(x, zp, pw, *case.geometry)
    why = dict(row=row.id, case=case, wbits=wbits)
    assert_equal(row.call("conv2d_int", x, zp, pw, *case.geometry), ref, **why)
    got_cl = row.call("conv2d_int", x.to(memory_format=torch.channels_last), zp, pw, *case.geometry)
    assert_equal(got_cl.contiguous(), ref, layout="channels_last", **why)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("wbits", [2, 4, 8])
@pytest.mark.parametrize("abits", [4, 8])
def test_conv2d(row, gen, case, wbits, abits):
    pw = case.weight(row, gen, wbits)
    x = rand_x(row, gen, case.n, case.c, case.h, case.w)
    bias = rand_x(row, gen, case.o)
    act = static_act(x, abits)
    why = dict(row=row.id, case=case, wbits=wbits, abits=abits)
    codes = R.quantize(x, act.scale, act.zero_point, abits)
    assert_equal(row.call("conv2d_int", codes, act.zero_point, pw, *case.geometry),
                 R.conv2d_int(codes, act.zero_point, pw, *case.geometry), op="conv2d_int", **why)
    assert_float_output(row, row.call("conv2d", x, pw, bias, act, *case.geometry),
                        R.conv2d(x, pw, bias, act, *case.geometry), op="conv2d", **why)
    # channels-last input takes the strided path of the quantize kernels
    assert_float_output(row, row.call("conv2d", x.to(memory_format=torch.channels_last), pw, bias, act,
                                      *case.geometry).contiguous(),
                        R.conv2d(x, pw, bias, act, *case.geometry), op="conv2d channels_last", **why)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_conv2d_half_inputs(row, gen, dtype, out_dtype):
    case = CONV_CASES[1]
    pw = case.weight(row, gen, 4)
    x = rand_x(row, gen, case.n, case.c, case.h, case.w, dtype=dtype)
    act = static_act(x, 8)
    got = row.call("conv2d", x, pw, None, act, *case.geometry, out_dtype=out_dtype)
    assert got.dtype == (out_dtype or dtype)
    assert_float_output(row, got, R.conv2d(x, pw, None, act, *case.geometry, out_dtype=out_dtype), row=row.id)


def test_conv2d_channels_last_output_follows_input(row, gen):
    case = CONV_CASES[0]
    pw = case.weight(row, gen, 4)
    x = rand_x(row, gen, case.n, case.c, case.h, case.w).to(memory_format=torch.channels_last)
    y = row.call("conv2d", x, pw, None, static_act(x, 8), *case.geometry)
    if row.backend in ("triton", "cuda"):  # their outputs keep the input's memory format
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_depthwise_per_tensor_zero_point_act(row, gen):
    """Depthwise float conv with a 4-bit activation grid (CUDA runs its direct depthwise kernel)."""
    c = 24
    case = CC(2, c, 10, 10, c, 3, 3, 1, 1, 1, c)
    pw = case.weight(row, gen, 4)
    x = rand_x(row, gen, 2, c, 10, 10)
    act, bias = static_act(x, 4), rand_x(row, gen, c)
    assert_float_output(row, row.call("conv2d", x, pw, bias, act, *case.geometry),
                        R.conv2d(x, pw, bias, act, *case.geometry), row=row.id)


def test_conv2d_int_non_integer_zero_point_declined_or_exact(row, gen):
    # a non-integer activation zero point: the reference computes it; the cpu kernels decline it
    case = CONV_CASES[0]
    pw = case.weight(row, gen, 4)
    x = rand_x(row, gen, 1, case.c, case.h, case.w)
    act = ActQuant(8, row.dev(torch.tensor([0.05])), row.dev(torch.tensor([7.5])))
    assert_float_output(row, row.call("conv2d", x, pw, None, act, *case.geometry),
                        R.conv2d(x, pw, None, act, *case.geometry), row=row.id)


# dense, strided / dilated, depthwise (with multiplier), grouped, 1x1, 1x1 strided, dilation 2
NONFINITE_CASES = [CONV_CASES[i] for i in (0, 1, 3, 4, 7, 9, 10, 14)]


@pytest.mark.parametrize("case", NONFINITE_CASES, ids=str)
@pytest.mark.parametrize("abits", [4, 8])
def test_conv2d_nonfinite_pixels_are_nan(row, gen, case, abits):
    """An output pixel whose window covers an input pixel holding NaN / +Inf / -Inf (any channel) is NaN in
    every output channel; the other outputs are unchanged."""
    pw = case.weight(row, gen, 4)
    clean = rand_x(row, gen, case.n, case.c, case.h, case.w)
    act = static_act(clean, abits)
    x = with_nonfinite(clean, gen, count=3)
    bias = rand_x(row, gen, case.o)
    why = dict(row=row.id, case=str(case), abits=abits)
    want = R.conv2d(x, pw, bias, act, *case.geometry)
    assert bool(torch.isnan(want).any()) or not bool(
        R.nonfinite_pixels(x, (case.kh, case.kw), *case.geometry[:3]).any()), ctx(**why)
    assert_nan_equal(row, row.call("conv2d", x, pw, bias, act, *case.geometry), want, op="conv2d nonfinite", **why)
    assert_nan_equal(row, row.call("conv2d", x.to(memory_format=torch.channels_last), pw, bias, act, *case.geometry),
                     want, op="conv2d nonfinite channels_last", **why)
