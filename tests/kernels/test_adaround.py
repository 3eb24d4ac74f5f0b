"""adaround_forward / adaround_backward on every backend row against the reference.

Exact: hard rounding and its zero regularizer. Soft ``w_hat`` / ``grad_V``: the kernels' own
exp / log / sigmoid differ from torch's by a few fp32 ulps (rtol 1e-5 fp32, one ulp fp16; the CUDA
backward 1e-4). Regularizer and scale gradient: fp32 sums in another order (``SUM_REL``).
"""
from __future__ import annotations

import math

import pytest
import torch

from dfqkern.formats import code_max, symmetric_zero_point
from dfqkern.kernels import reference as R
from kernel_cases import SUM_REL, assert_close, assert_equal, assert_sum_close, rand_x

AR_CASES = [  # (shape, axis)
    ((37, 50), 0), ((16, 3, 3, 3), 0), ((7, 300), None), ((5, 9), 1), ((17, 33), 0), ((6, 5, 3, 3), 0),
    ((33,), None), ((24, 3, 3, 3), 1),
    # rows longer than a partial-sum flush (16 vector steps) and the drivers' 4096-element chunks, with tails
    ((3, 4100), 0), ((4133,), None),
]


def _inputs(row, gen, shape, axis, bits, symmetric, dtype):
    w = rand_x(row, gen, *shape, scale=1.0)
    n = 1 if axis is None else shape[axis]
    amax = w.abs().amax() if axis is None else w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
    s = (amax / (symmetric_zero_point(bits) - 1)).reshape(n)
    if symmetric:
        z = row.dev(torch.full((n,), symmetric_zero_point(bits), dtype=torch.int32))
    else:
        s = s / 2  # narrower grid: some weights clip
        z = row.dev(torch.randint(0, 2 ** bits, (n,), generator=gen, dtype=torch.int32))
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    base = R.adaround_base(w, s, axis)
    v = (R.adaround_init_v(w, s, axis) + rand_x(row, gen, *shape, scale=2.0)).to(dtype)
    return w, base, v, s, z


def _grad_scale_terms(g, rwh, s, axis, bits, rel):
    """|terms| of grad_scale = sum g * (c - zp) for assert_sum_close, plus the rounding each (c - zp) carries:
    c - zp comes from t = base + h + zp in fp32 (up to half an ulp of qmax + 1), which a kernel may form in
    another order, however small c - zp is (a row with c ~ zp failed at 5x rel * sum|g * (c - zp)|)."""
    terms = R.reduce_to_param((g.float() * rwh.float() / R.broadcast_param(s, rwh, axis)).abs(), axis)
    if rel == 0:
        return terms
    ulp_t = 2.0 ** (math.ceil(math.log2(code_max(bits) + 1)) - 23)
    return terms + R.reduce_to_param(g.float().abs(), axis) * ulp_t / rel


@pytest.mark.parametrize("shape,axis", AR_CASES)
@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaround_forward_backward(row, gen, shape, axis, beta, bits, symmetric, dtype):
    w, base, v, s, z = _inputs(row, gen, shape, axis, bits, symmetric, dtype)
    why = dict(row=row.id, shape=shape, axis=axis, beta=beta, bits=bits, dtype=dtype)
    rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -10
    rel = SUM_REL[row.backend]

    wh, reg = row.call("adaround_forward", base, v, s, z, bits, axis, beta)
    rwh, rreg = R.adaround_forward(base, v, s, z, bits, axis, beta)
    assert wh.dtype == rwh.dtype
    assert_close(wh, rwh, rtol=rtol, atol=1e-6 * float(rwh.abs().max().float()), op="w_hat", **why)
    terms = (1 - (2 * R.rectified_sigmoid(v.float()) - 1).abs().pow(beta)).abs().sum()
    assert reg.shape == rreg.shape == ()
    assert abs(float(reg) - float(rreg)) <= rel * float(terms) + 1e-6, (float(reg), float(rreg), why)

    hw, hreg = row.call("adaround_forward", base, v, s, z, bits, axis, beta, True)
    rhw, rhreg = R.adaround_forward(base, v, s, z, bits, axis, beta, True)
    assert_equal(hw, rhw, op="hard adaround", **why)
    assert float(hreg) == float(rhreg) == 0.0

    g = rand_x(row, gen, *shape, scale=1.0)
    gv, gs = row.call("adaround_backward", g, base, v, s, z, bits, axis, beta, 0.01)
    rgv, rgs = R.adaround_backward(g, base, v, s, z, bits, axis, beta, 0.01)
    gv_rtol = 1e-4 if row.backend == "cuda" else rtol
    assert_close(gv, rgv, rtol=gv_rtol, atol=1e-5 * float(rgv.abs().max().float()), op="grad_v", **why)
    terms = _grad_scale_terms(g, rwh, s, axis, bits, rel)
    assert_sum_close(gs, rgs, terms, rel, op="grad_scale", **why)


def test_adaround_regularizer_gradient_is_included(row, gen):
    w = rand_x(row, gen, 4, 9, scale=0.3)
    scale, zp = row.dev(torch.full((4,), 0.05)), row.dev(torch.full((4,), 2))
    base, v = R.adaround_base(w, scale), R.adaround_init_v(w, scale)
    g = torch.zeros_like(v)
    gv0, _ = row.call("adaround_backward", g, base, v, scale, zp, 2, 0, 2.0, 0.0)
    gv1, _ = row.call("adaround_backward", g, base, v, scale, zp, 2, 0, 2.0, 0.5)
    assert float(gv0.abs().max()) == 0.0 and float(gv1.abs().max()) > 0.0
    assert_close(gv1, R.adaround_backward(g, base, v, scale, zp, 2, 0, 2.0, 0.5)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("beta", [2.0, 7.3])
def test_adaround_saturated_v(row, gen, beta):
    """V far in either tail (the sigmoid's exp over- / underflows: h = 0 or 1, dh/dV = 0), around the
    vector exp's clamps (|V| ~ 87-89, 110) and at +-inf, mixed with ordinary values in one vector."""
    edges = torch.tensor([-float("inf"), -200.0, -110.5, -88.8, -88.3, -87.4, -87.3, -20.0, -2.4, -1e-3, 0.0,
                          1e-3, 2.4, 20.0, 87.3, 87.4, 88.3, 88.8, 110.5, 200.0, float("inf")])
    v = torch.cat([edges, torch.randn(43, generator=gen) * 3]).reshape(4, 16)
    v = row.dev(v[:, torch.randperm(16, generator=gen)])
    w = rand_x(row, gen, 4, 16, scale=1.0)
    s, z = row.dev(w.abs().amax(1).cpu() / 7), row.dev(torch.full((4,), 8, dtype=torch.int32))
    base, g = R.adaround_base(w, s), rand_x(row, gen, 4, 16, scale=1.0)
    why = dict(row=row.id, beta=beta)

    wh, reg = row.call("adaround_forward", base, v, s, z, 4, 0, beta)
    rwh, rreg = R.adaround_forward(base, v, s, z, 4, 0, beta)
    assert_close(wh, rwh, rtol=1e-5, atol=1e-6 * float(rwh.abs().max()), op="w_hat", **why)
    assert abs(float(reg) - float(rreg)) <= 1e-5 * float(rreg) + 1e-6, (float(reg), float(rreg), why)
    gv, gs = row.call("adaround_backward", g, base, v, s, z, 4, 0, beta, 0.01)
    rgv, rgs = R.adaround_backward(g, base, v, s, z, 4, 0, beta, 0.01)
    assert_close(gv, rgv, rtol=1e-4 if row.backend == "cuda" else 1e-5, atol=1e-5 * float(rgv.abs().max()),
                 op="grad_v", **why)
    terms = _grad_scale_terms(g, rwh, s, 0, 4, SUM_REL[row.backend])
    assert_sum_close(gs, rgs, terms, SUM_REL[row.backend], op="grad_scale", **why)
