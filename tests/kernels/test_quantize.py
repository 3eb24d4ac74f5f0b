"""quantize / dequantize / quantize_activation on every backend row against the reference (codes exact)."""
from __future__ import annotations

import pytest
import torch

from dfqkern.kernels import reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import assert_equal, ctx, make_act, rand_params, rand_x, static_act, with_nonfinite

QUANT_CASES = [  # (shape, axis)
    ((7,), None), ((5, 37, 9), 1), ((3, 17), -1), ((33, 4, 3, 3), 0), ((2, 3, 5, 7), None), ((1, 1), 0),
    ((4, 2, 4100), 2),
]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape,axis", QUANT_CASES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("float_zp", [False, True])
def test_quantize_dequantize(row, gen, shape, axis, bits, dtype, float_zp):
    x = rand_x(row, gen, *shape, dtype=dtype)
    s, z = rand_params(row, gen, shape, axis, bits, float_zp)
    why = dict(row=row.id, dtype=dtype, shape=shape, axis=axis, bits=bits, zp_float=float_zp)
    q = row.call("quantize", x, s, z, bits, axis)
    assert_equal(q, R.quantize(x, s, z, bits, axis), op="quantize", **why)
    assert_equal(row.call("dequantize", q, s, z, axis), R.dequantize(q, s, z, axis), op="dequantize", **why)


def test_quantize_noncontiguous_and_ties(row, gen):
    x = rand_x(row, gen, 9, 12, scale=50.0).t()  # non-contiguous, most values clipped
    s, z = row.dev(torch.tensor([0.1])), row.dev(torch.tensor([3], dtype=torch.int32))
    assert_equal(row.call("quantize", x, s, z, 4), R.quantize(x, s, z, 4), row=row.id)
    # ties: x * inv lands exactly on .5 -> round half to even, before the zero point is added
    x = row.dev(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 7.5]))
    one, four = row.dev(torch.tensor([1.0])), row.dev(torch.tensor([4]))
    assert_equal(row.call("quantize", x, one, four, 8), R.quantize(x, one, four, 8), row=row.id)


def test_round_half_even_ties(row):
    # values at and next to .5 ties: floor(x + 0.5) would get 0.49999997 and the even ties wrong
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 2.5000002, 3.4999998,
                         126.5, 127.5, -127.5, 1e9, -1e9, 0.0, -0.0])
    x = row.dev(ties.reshape(1, -1))
    act = ActQuant(8, row.dev(torch.tensor([1.0])), row.dev(torch.tensor([128])))
    assert_equal(row.call("quantize_activation", x, act).data, R.quantize_activation(x, act).data, row=row.id)
    one, zp = row.dev(torch.tensor(1.0)), row.dev(torch.tensor(128))
    assert_equal(row.call("fake_quant_forward", x, one, zp, 8), R.fake_quant_forward(x, one, zp, 8), row=row.id)


# K odd on purpose (per-token 4-bit packing pads a slot with each row's zero point), K = 1, K past a tile
ACT_SHAPES = [(1, 77), (3, 33), (17, 1), (5, 128), (1, 37), (3, 70), (17, 33), (64, 129)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_token,symmetric", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k", ACT_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_activation(row, gen, bits, per_token, symmetric, m, k, dtype):
    x = rand_x(row, gen, m, k, dtype=dtype)
    if per_token and m > 2:
        x[1] = 0.0  # all-zero row: scale clamps to SCALE_EPS
        x[2] = x[2].abs() + 0.1  # positive-only row: zero point at 0
    act = make_act(x, bits, per_token, symmetric)
    got, ref = row.call("quantize_activation", x, act), R.quantize_activation(x, act)
    why = dict(row=row.id, dtype=dtype, per_token=per_token, symmetric=symmetric, bits=bits, m=m, k=k)
    for field in ("data", "scale", "zero_point"):
        assert_equal(getattr(got, field), getattr(ref, field), field=field, **why)
    assert (got.bits, got.k) == (ref.bits, ref.k)


def test_quantize_activation_strided(row, gen):
    x = rand_x(row, gen, 40, 19, dtype=torch.float16).t()  # [19, 40], non-contiguous
    for act in (ActQuant(4, per_token=True), static_act(x, 8)):
        got, ref = row.call("quantize_activation", x, act), R.quantize_activation(x, act)
        assert_equal(got.data, ref.data, row=row.id, bits=act.bits)
        assert_equal(got.scale, ref.scale, row=row.id, bits=act.bits)
    x = rand_x(row, gen, 6, 40)[:, 3:35]  # row stride 40, contiguous rows
    act = ActQuant(4, per_token=True)
    assert_equal(row.call("quantize_activation", x, act).data, R.quantize_activation(x, act).data, row=row.id)


def test_empty_inputs(row):
    x = row.dev(torch.zeros(0, 5))
    s, z = row.dev(torch.tensor([0.1])), row.dev(torch.tensor([3]))
    assert row.call("fake_quant_forward", x, s, z, 4).shape == (0, 5)
    if row.backend != "reference":  # (formats.pack_codes cannot pack zero rows)
        pa = row.call("quantize_activation", row.dev(torch.zeros(0, 16)), ActQuant(8, per_token=True))
        assert pa.data.shape == (0, 16)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 1])
def test_quantize_nonfinite_codes(row, gen, bits, axis):
    """Codes cannot hold NaN: NaN -> code 0, +Inf / -Inf saturate (every backend alike)."""
    x = with_nonfinite(rand_x(row, gen, 4, 37), gen, count=12)
    s, z = rand_params(row, gen, (4, 37), axis, bits)
    q = row.call("quantize", x, s, z, bits, axis)
    want = R.quantize(x, s, z, bits, axis)
    assert_equal(q, want, row=row.id, bits=bits, axis=axis)
    assert bool((want[torch.isnan(x)] == 0).all()) and bool((want[x == float("inf")] == 2 ** bits - 1).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_token,symmetric", [(False, False), (True, False), (True, True)])
def test_quantize_activation_nonfinite(row, gen, bits, per_token, symmetric):
    """Per-token rows holding NaN / Inf: scale NaN, zero point 0 (2**(bits-1) symmetric), codes 0; static
    parameters: codes as quantize (the packed linear marks those rows itself)."""
    clean = rand_x(row, gen, 9, 45)
    act = make_act(clean, bits, per_token, symmetric)
    x = with_nonfinite(clean, gen, count=4)
    got = row.call("quantize_activation", x, act)
    want = R.quantize_activation(x, act)
    why = dict(row=row.id, bits=bits, per_token=per_token, sym=symmetric)
    assert_equal(got.data, want.data, op="codes", **why)
    assert_equal(got.zero_point.reshape(-1).to(torch.int32), want.zero_point.reshape(-1), op="zero point", **why)
    gs, ws = got.scale.reshape(-1), want.scale.reshape(-1).to(got.scale.device)
    assert torch.equal(torch.isnan(gs), torch.isnan(ws)), ctx(op="scale NaN", **why)
    assert_equal(torch.nan_to_num(gs), torch.nan_to_num(ws), op="scale", **why)
    if per_token:
        assert bool(torch.isnan(ws.cpu()[~torch.isfinite(x.cpu()).all(dim=1)]).all()), ctx(**why)
