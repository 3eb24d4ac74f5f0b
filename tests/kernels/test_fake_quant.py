"""fake_quant_forward / fake_quant_backward (STE, LSQ gradients, QDrop) on every backend row against the reference.

Exact: outputs and grad_x. LSQ scale / zero-point gradients are fp32 sums in another order:
``SUM_REL[backend] * sum(|terms|)`` per parameter (kernel_cases).
"""
from __future__ import annotations

import pytest
import torch

from dfqkern.formats import code_max
from dfqkern.kernels import reference as R
from kernel_cases import (SUM_REL, assert_equal, assert_nan_equal, assert_sum_close, ctx, rand_params, rand_x,
                          with_nonfinite)

FQ_CASES = [  # (shape, axis)
    ((5, 37, 9), 1), ((33, 4, 3, 3), 0), ((3000,), None), ((2, 3, 5, 7), None), ((6, 17), 1), ((17, 6), 0),
    ((17, 33), None), ((17, 33), 0), ((3, 17), -1), ((2, 6, 5, 3), 1), ((64,), None),
]


@pytest.mark.parametrize("shape,axis", FQ_CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype,float_zp", [(torch.float32, False), (torch.float16, True), (torch.float32, True)])
def test_fake_quant_forward_backward(row, gen, shape, axis, bits, drop_prob, dtype, float_zp):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    x = rand_x(row, gen, *shape, dtype=dtype)
    s, z = rand_params(row, gen, shape, axis, bits, float_zp)
    why = dict(row=row.id, dtype=dtype, shape=shape, axis=axis, bits=bits, drop=drop_prob)
    y = row.call("fake_quant_forward", x, s, z, bits, axis, drop_prob, seed)
    assert_equal(y, R.fake_quant_forward(x, s, z, bits, axis, drop_prob, seed), op="fq_forward", **why)
    g = rand_x(row, gen, *shape, dtype=dtype, scale=1.0)
    gx, gs, gz = row.call("fake_quant_backward", g, x, s, z, bits, axis, 0.37, drop_prob, seed)
    rgx, rgs, rgz = R.fake_quant_backward(g, x, s, z, bits, axis, 0.37, drop_prob, seed)
    assert_equal(gx, rgx, op="fq_backward grad_x", **why)
    g_abs = R.reduce_to_param(g.float().abs(), axis) * 0.37
    rel = SUM_REL[row.backend]
    assert_sum_close(gs, rgs, g_abs * (code_max(bits) + z.float().abs().reshape(-1) + 1), rel,
                     op="fq_backward grad_scale", **why)
    assert_sum_close(gz, rgz, g_abs * s.reshape(-1), rel, op="fq_backward grad_zp", **why)


def test_fake_quant_float_zero_point_and_full_drop(row, gen):
    x = rand_x(row, gen, 5, 9)
    scale, zp = row.dev(torch.tensor(0.1)), row.dev(torch.tensor(3.4))  # LSQ learns a float zero point
    assert_equal(row.call("fake_quant_forward", x, scale, zp, 4), R.fake_quant_forward(x, scale, zp, 4))
    assert_equal(row.call("fake_quant_forward", x, scale, zp, 4, None, 1.0, 5), x)  # p=1: threshold 2**32
    gx, gs, gz = row.call("fake_quant_backward", torch.ones_like(x), x, scale, zp, 4, None, 1.0, 1.0, 5)
    assert_equal(gx, torch.ones_like(x))
    assert float(gs.abs().sum()) == 0.0 and float(gz.abs().sum()) == 0.0


def test_qdrop_mask_matches_reference_hash(row, gen):
    x = rand_x(row, gen, 3, 1000)
    scale, zp = row.dev(torch.tensor(0.5)), row.dev(torch.tensor(8))
    out = row.call("fake_quant_forward", x, scale, zp, 4, None, 0.3, 99)
    kept_float = out == x
    mask = row.dev(R.qdrop_mask(x.shape, 0.3, 99))
    assert torch.equal(kept_float | ~mask, torch.ones_like(mask))  # every dropped element keeps its float
    assert 0.25 < mask.float().mean().item() < 0.35


def test_fake_quant_backward_mixed_dtypes(row, gen):
    x = rand_x(row, gen, 4, 6, dtype=torch.float16)
    grad = rand_x(row, gen, 4, 6)
    s, z = row.dev(torch.tensor([0.1])), row.dev(torch.tensor([8]))
    got = row.call("fake_quant_backward", grad, x, s, z, 4)
    want = R.fake_quant_backward(grad, x, s, z, 4)
    assert_equal(got[0], want[0], row=row.id)


@pytest.mark.parametrize("shape,axis", [((5, 37, 9), 1), ((3000,), None), ((17, 33), 0), ((2, 6, 5, 3), 1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quant_nonfinite_propagates(row, gen, shape, axis, bits, drop_prob, dtype):
    """NaN / +Inf / -Inf inputs give NaN at those elements (dropped QDrop elements keep their float)."""
    x = with_nonfinite(rand_x(row, gen, *shape, dtype=dtype), gen, count=9)
    s, z = rand_params(row, gen, shape, axis, bits)
    why = dict(row=row.id, dtype=dtype, shape=shape, axis=axis, bits=bits, drop=drop_prob)
    y = row.call("fake_quant_forward", x, s, z, bits, axis, drop_prob, 7)
    want = R.fake_quant_forward(x, s, z, bits, axis, drop_prob, 7)
    dropped = R.qdrop_mask(x.shape, drop_prob, 7, x.device) if drop_prob > 0 else torch.zeros_like(x, dtype=torch.bool)
    bad = ~torch.isfinite(x)
    assert bool(torch.isnan(want[bad & ~dropped]).all()), ctx(**why)  # the policy, on the reference itself
    torch.testing.assert_close(want[dropped], x[dropped], rtol=0, atol=0, equal_nan=True)  # dropped: x itself
    assert_nan_equal(row, y, want, exact=True, op="fq_forward nonfinite", **why)
