"""The pure-torch oracle (dfqkern.kernels.reference) against independent formulations.

(Its argument errors are the contract's: tests/kernels/test_contract.py, every backend row.)

Quantizer invariants are hypothesis properties; gradients are compared with torch.autograd on an
explicit differentiable chain written here; integer GEMM / conv with an independent int64
computation (exact equality).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dfqkern.formats import PackedWeight, code_max, conv_weight_to_matrix, symmetric_zero_point, unpack_codes
from dfqkern.kernels import reference as R

SETTINGS = settings(max_examples=30, deadline=None)
BITS = st.sampled_from([2, 3, 4, 8])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- quantizer invariants

@st.composite
def tensor_and_range(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    mag = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1e3]))
    shift = draw(st.sampled_from([0.0, 0.5, -0.9, 3.0]))  # all-positive / all-negative ranges too
    x = (torch.randn(shape, generator=_gen(draw(st.integers(0, 10 ** 6)))) + shift) * mag
    return x


@SETTINGS
@given(x=tensor_and_range(), bits=BITS, symmetric=st.booleans())
def test_quantize_invariants_per_tensor(x, bits, symmetric):
    lo, hi = x.min(), x.max()
    scale, zp = R.qparams_from_range(lo, hi, bits, symmetric)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and scale.item() > 0
    qmax = code_max(bits)
    assert 0 <= zp.item() <= qmax
    if symmetric:
        assert zp.item() == symmetric_zero_point(bits)
    codes = R.quantize(x, scale, zp, bits)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= qmax
    # Every x inside [lo, hi] (widened to 0) is within half a step of its dequantized value.
    deq = R.dequantize(codes, scale, zp)
    s = scale.item()
    tol = s / 2 * (1 + 1e-5) + 1e-6 * x.abs().max().item()
    assert (deq - x).abs().max().item() <= tol
    # The representable interval covers [min(lo, 0), max(hi, 0)] up to that half step.
    rep_lo, rep_hi = (0 - zp.item()) * s, (qmax - zp.item()) * s
    assert rep_lo <= min(lo.item(), 0.0) + tol and rep_hi >= max(hi.item(), 0.0) - tol
    # Zero is exactly representable: it maps to the zero point and back to exactly 0.
    zero = torch.zeros(3)
    assert R.quantize(zero, scale, zp, bits).tolist() == [zp.item()] * 3
    assert R.fake_quant_forward(zero, scale, zp, bits).tolist() == [0.0] * 3
    # fake-quant is dequantize(quantize(x)) and idempotent.
    fq = R.fake_quant_forward(x, scale, zp, bits)
    assert torch.equal(fq, deq)
    assert torch.equal(R.fake_quant_forward(fq, scale, zp, bits), fq)


@SETTINGS
@given(lo=st.floats(-100, 100, width=32, allow_subnormal=False), width=st.floats(0, 100, width=32), bits=BITS)
def test_qparams_widen_to_include_zero(lo, width, bits):
    hi = float(torch.tensor(lo + width, dtype=torch.float32))
    scale, zp = R.qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, False)
    s, qmax = scale.item(), code_max(bits)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    assert s == pytest.approx(max((hi0 - lo0) / qmax, R.SCALE_EPS), rel=1e-6)
    if lo >= 0:
        assert zp.item() == 0  # all-positive range: zero is the bottom code
    if hi <= 0 and (hi0 - lo0) / qmax > R.SCALE_EPS:
        assert zp.item() == qmax  # all-negative range: zero is the top code
    s_sym, zp_sym = R.qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, True)
    assert zp_sym.item() == symmetric_zero_point(bits)
    amax = max(-lo0, hi0)
    assert s_sym.item() == pytest.approx(max(amax / (symmetric_zero_point(bits) - 1), R.SCALE_EPS), rel=1e-6)


def test_degenerate_range_and_rounding_convention():
    scale, zp = R.qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 4, False)
    assert scale.item() == pytest.approx(R.SCALE_EPS) and zp.item() == 0
    # Round half to even on x * inv_scale, then add the zero point.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    codes = R.quantize(x, torch.tensor(1.0), torch.tensor(8), 4)
    assert codes.tolist() == [8, 10, 10, 8, 6]


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(), bits=BITS,
       symmetric=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_per_channel_broadcast_any_axis(shape, data, bits, symmetric, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(shape, generator=_gen(seed)) * 3
    ax = axis % len(shape)
    dims = [d for d in range(len(shape)) if d != ax]
    lo = x.amin(dim=dims) if dims else x
    hi = x.amax(dim=dims) if dims else x
    scale, zp = R.qparams_from_range(lo, hi, bits, symmetric)
    codes = R.quantize(x, scale, zp, bits, axis=axis)
    fq = R.fake_quant_forward(x, scale, zp, bits, axis=axis)
    for i in range(shape[ax]):
        xi = x.select(ax, i)
        assert torch.equal(codes.select(ax, i), R.quantize(xi, scale[i], zp[i], bits))
        assert torch.equal(fq.select(ax, i), R.fake_quant_forward(xi, scale[i], zp[i], bits))
    # reduce_to_param is the adjoint of broadcast_param
    ones = torch.ones_like(x)
    assert torch.equal(R.reduce_to_param(ones, axis), torch.full((shape[ax],), float(x.numel() // shape[ax])))


def test_fake_quant_keeps_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(5, 7).to(dtype)
        out = R.fake_quant_forward(x, torch.tensor(0.1), torch.tensor(8), 4)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), R.fake_quant_forward(x.float(), torch.tensor(0.1), torch.tensor(8),
                                                                      4), rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- fake-quant gradients

def clamp_inclusive(t, lo, hi):
    """clamp whose gradient passes at the boundaries too (torch.clamp's stops there): a value that rounds
    exactly onto the first or last code is representable, not clipped."""
    return torch.where(t < lo, torch.full_like(t, lo).detach(), torch.where(t > hi, torch.full_like(t, hi).detach(), t))


def explicit_fake_quant(x, scale, zp, bits, axis):
    """Differentiable LSQ chain: s * (clamp(round_ste(x / s) + z, 0, qmax) - z), written independently."""
    s = R.broadcast_param(scale, x, axis)
    z = R.broadcast_param(zp, x, axis)
    xs = x * (1.0 / s)
    r = torch.round(xs).detach() + (xs - xs.detach())  # straight-through rounding, value exactly round(xs)
    return s * (clamp_inclusive(r + z, 0, code_max(bits)) - z)


@SETTINGS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), bits=BITS, per_channel=st.booleans(),
       grad_scale=st.sampled_from([1.0, 0.37]), seed=st.integers(0, 10 ** 6))
def test_fake_quant_backward_matches_autograd(shape, bits, per_channel, grad_scale, seed):
    g = _gen(seed)
    x = torch.randn(shape, generator=g) * 2
    axis = 0 if per_channel else None
    n = shape[0] if per_channel else 1
    # a deliberately narrow range so that both clip sides are exercised
    scale = (torch.rand(n, generator=g) * 0.3 + 0.05)
    zp = torch.randint(0, code_max(bits) + 1, (n,), generator=g).float()
    grad = torch.randn(shape, generator=g)

    xv, sv, zv = x.clone().requires_grad_(), scale.clone().requires_grad_(), zp.clone().requires_grad_()
    out = explicit_fake_quant(xv, sv, zv, bits, axis)
    torch.testing.assert_close(out.detach(), R.fake_quant_forward(x, scale, zp, bits, axis), rtol=1e-6, atol=1e-6)
    gx_ref, gs_ref, gz_ref = torch.autograd.grad((out * grad).sum(), (xv, sv, zv))

    gx, gs, gz = R.fake_quant_backward(grad, x, scale, zp, bits, axis, grad_scale=grad_scale)
    assert gx.shape == x.shape and gs.shape == (n,) and gz.shape == (n,)
    # STE: the gradient passes unchanged (exactly) where autograd says the clamp passes it, else 0.
    assert torch.equal(gx, torch.where(gx_ref != 0, grad, torch.zeros_like(grad)))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(gs, gs_ref * grad_scale, rtol=1e-4, atol=1e-3)  # fp32 sums of terms up to 2**bits
    torch.testing.assert_close(gz, gz_ref * grad_scale, rtol=1e-4, atol=1e-3)


def test_ste_mask_and_lsq_cases_by_hand():
    # scale 1, zero point 1, 2-bit: representable reals -1, 0, 1, 2
    x = torch.tensor([-3.0, -1.0, 0.3, 1.6, 2.0, 5.0])
    gx, gs, gz = R.fake_quant_backward(torch.ones(6), x, torch.tensor([1.0]), torch.tensor([1]), 2)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # below: qmin - z = -1; inside: round(x) - x; above: qmax - z = 2
    expect = -1 + 0 + (0 - 0.3) + (2 - 1.6) + 0 + 2
    assert gs.item() == pytest.approx(expect, abs=1e-6)
    assert gz.item() == pytest.approx(-1.0 - 1.0)  # -s per clipped element


@SETTINGS
@given(bits=BITS, seed=st.integers(0, 10 ** 6), side=st.sampled_from(["below", "above", "both"]))
def test_lsq_scale_grad_finite_differences_where_smooth(bits, seed, side):
    """Where every element is clipped, the forward is linear in the scale: LSQ's gradient is its derivative.

    (Inside the range LSQ's gradient round(x/s) - x/s is a straight-through estimate, not a derivative;
    the autograd test above covers it.)
    """
    g = _gen(seed)
    s0, z = 0.1, int(torch.randint(0, code_max(bits) + 1, (1,), generator=g))
    far = 10 * (code_max(bits) + 1) * s0
    mag = torch.rand(64, generator=g) * far + far
    x = {"below": -mag, "above": mag, "both": mag * torch.sign(torch.randn(64, generator=g))}[side]
    grad = torch.randn(64, generator=g, dtype=torch.float64)
    zp = torch.tensor([z])

    def loss(s):
        return (R.fake_quant_forward(x.double(), torch.tensor([s]), zp, bits).double() * grad).sum().item()

    h = 1e-3
    fd = (loss(s0 + h) - loss(s0 - h)) / (2 * h)
    _, gs, _ = R.fake_quant_backward(grad.float(), x, torch.tensor([s0]), zp, bits)
    assert gs.item() == pytest.approx(fd, rel=1e-4, abs=1e-4)


# ----------------------------------------------------------------------------- QDrop

def _lowbias32(i: int, seed: int) -> int:
    m = 0xFFFFFFFF
    x = (i + seed * 0x9E3779B9) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash32_matches_python_spec():
    idx = torch.tensor([0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 32 - 1], dtype=torch.int64)
    for seed in (0, 1, 7, 2 ** 31 - 1, 0xDEADBEEF):
        assert R.hash32(idx, seed).tolist() == [_lowbias32(i, seed) for i in idx.tolist()]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_qdrop_mask_deterministic_and_fraction(p):
    shape = (40, 500)
    m1 = R.qdrop_mask(shape, p, seed=3)
    assert m1.dtype == torch.bool and m1.shape == shape
    assert torch.equal(m1, R.qdrop_mask(shape, p, seed=3))
    assert not torch.equal(m1, R.qdrop_mask(shape, p, seed=4))
    assert abs(m1.float().mean().item() - p) < 0.015
    assert not R.qdrop_mask(shape, 0.0, 3).any() and R.qdrop_mask(shape, 1.0, 3).all()


@SETTINGS
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), p=st.sampled_from([0.25, 0.5, 0.8]),
       bits=BITS, seed=st.integers(0, 2 ** 31 - 1), per_channel=st.booleans())
def test_qdrop_forward_backward(shape, p, bits, seed, per_channel):
    g = _gen(seed)
    x = torch.randn(shape, generator=g) * 2
    axis = 0 if per_channel else None
    n = shape[0] if per_channel else 1
    scale = torch.rand(n, generator=g) * 0.3 + 0.05
    zp = torch.randint(0, code_max(bits) + 1, (n,), generator=g).float()
    grad = torch.randn(shape, generator=g)
    mask = R.qdrop_mask(x.shape, p, seed)

    out = R.fake_quant_forward(x, scale, zp, bits, axis, drop_prob=p, seed=seed)
    fq = R.fake_quant_forward(x, scale, zp, bits, axis)
    assert torch.equal(out[mask], x[mask]) and torch.equal(out[~mask], fq[~mask])

    xv, sv, zv = x.clone().requires_grad_(), scale.clone().requires_grad_(), zp.clone().requires_grad_()
    ref_out = torch.where(mask, xv, explicit_fake_quant(xv, sv, zv, bits, axis))
    gx_ref, gs_ref, gz_ref = torch.autograd.grad((ref_out * grad).sum(), (xv, sv, zv), allow_unused=True)
    gx, gs, gz = R.fake_quant_backward(grad, x, scale, zp, bits, axis, drop_prob=p, seed=seed)
    assert torch.equal(gx[mask], grad[mask])  # dropped: float pass-through, full gradient even if clipped
    assert torch.equal(gx, torch.where(gx_ref != 0, grad, torch.zeros_like(grad)))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=0)
    # the scale gradient sums terms of size |x / scale| (up to ~150 here): fp32 rounding of each term
    # is ~|x / scale| * eps, so the tolerance scales with that sum (a fixed 1e-5 failed on a valid case)
    terms = (x / R.broadcast_param(scale, x, axis)).abs() * grad.abs()
    atol_s = max(1e-5, 8 * torch.finfo(torch.float32).eps * float(terms.sum()))
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=atol_s)
    torch.testing.assert_close(gz, gz_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- AdaRound

def explicit_adaround(base, v, scale, zp, bits, axis, beta):
    s = R.broadcast_param(scale, v, axis)
    z = R.broadcast_param(zp, v, axis).float()
    h = torch.clamp(torch.sigmoid(v) * (1.1 - (-0.1)) + (-0.1), 0, 1)
    c = clamp_inclusive(base + h + z, 0, code_max(bits))
    return (c - z) * s, (1 - (2 * h - 1).abs() ** beta).sum()


@SETTINGS
@given(shape=st.sampled_from([(5, 3), (4, 2, 3, 3), (1, 7), (3, 1, 2, 1)]), axis=st.sampled_from([0, 1]),
       bits=BITS, beta=st.sampled_from([2.0, 3.5, 20.0]), reg_grad=st.sampled_from([0.0, 0.01, 1.7]),
       seed=st.integers(0, 10 ** 6))
def test_adaround_forward_backward_vs_autograd(shape, axis, bits, beta, reg_grad, seed):
    g = _gen(seed)
    w = torch.randn(shape, generator=g)
    n = shape[axis]
    scale = torch.rand(n, generator=g) * 0.2 + 0.02  # narrow: some weights clip
    zp = torch.randint(0, code_max(bits) + 1, (n,), generator=g, dtype=torch.int32)
    base = R.adaround_base(w, scale, axis)
    v = torch.randn(shape, generator=g) * 3
    grad = torch.randn(shape, generator=g)

    w_hat, reg = R.adaround_forward(base, v, scale, zp, bits, axis, beta)
    vv, sv = v.clone().requires_grad_(), scale.clone().requires_grad_()
    w_ref, reg_ref = explicit_adaround(base, vv, sv, zp, bits, axis, beta)
    torch.testing.assert_close(w_hat, w_ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reg, reg_ref.detach(), rtol=1e-5, atol=1e-5)
    gv_ref, gs_ref = torch.autograd.grad((w_ref * grad).sum() + reg_grad * reg_ref, (vv, sv))
    gv, gs = R.adaround_backward(grad, base, v, scale, zp, bits, axis, beta, reg_grad)
    assert gv.shape == v.shape and gs.shape == (n,)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-5)


def test_adaround_hard_and_init():
    g = _gen(0)
    w = torch.randn(6, 10, generator=g)
    scale, zp = R.qparams_from_range(w.amin(1), w.amax(1), 4, False)
    base = R.adaround_base(w, scale)
    assert torch.equal(base, torch.floor(w * (1 / scale)[:, None]))
    v = R.adaround_init_v(w, scale)
    # The soft rounding starts at the float weight (up to the clamp of p to [1e-4, 1 - 1e-4]) wherever
    # the weight is inside the grid (the range ends may sit up to half a step outside it).
    w_soft, reg = R.adaround_forward(base, v, scale, zp, 4)
    t = w / scale[:, None] + zp[:, None]
    inside = (t >= 0) & (t <= 15)
    assert inside.float().mean() > 0.8
    assert (w_soft - w)[inside].abs().max().item() <= 2e-4 * scale.max().item() + 1e-6
    assert reg.item() > 0
    # Hard rounding: up where V >= 0, regularizer exactly 0.
    w_hard, reg_h = R.adaround_forward(base, v, scale, zp, 4, hard=True)
    expect = (torch.clamp(base + (v >= 0).float() + zp[:, None], 0, 15) - zp[:, None]) * scale[:, None]
    assert torch.equal(w_hard, expect) and reg_h.item() == 0.0
    # Rounding a value exactly at V=0 goes up; the hard result is always floor or floor + 1 (unclipped).
    assert set(((w_hard / scale[:, None]) - base).round().unique().tolist()) <= {0.0, 1.0}


def test_rectified_sigmoid_range():
    v = torch.linspace(-20, 20, 401)
    h = R.rectified_sigmoid(v)
    assert h.min().item() == 0.0 and h.max().item() == 1.0
    assert torch.all(h[1:] >= h[:-1])
    assert R.rectified_sigmoid(torch.tensor(0.0)).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- integer GEMM / conv

def _packed_weight(n, k, bits, g, shape=None):
    codes = torch.randint(0, code_max(bits) + 1, (n, k), generator=g).to(torch.uint8)
    zp = torch.randint(0, code_max(bits) + 1, (n,), generator=g, dtype=torch.int32)
    scale = torch.rand(n, generator=g) * 0.05 + 0.01
    return PackedWeight.from_codes(codes, scale, zp, bits, shape)


@SETTINGS
@given(m=st.sampled_from([1, 3, 17]), n=st.sampled_from([1, 5, 9]), k=st.sampled_from([1, 7, 33, 130]),
       wbits=BITS, abits=st.sampled_from([4, 8]), per_token=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_linear_int_exact(m, n, k, wbits, abits, per_token, seed):
    g = _gen(seed)
    pw = _packed_weight(n, k, wbits, g)
    x = torch.randn(m, k, generator=g)
    if per_token:
        act = R.ActQuant(abits, per_token=True)
    else:
        s, z = R.qparams_from_range(x.min(), x.max(), abits, False)
        act = R.ActQuant(abits, s, z)
    pa = R.quantize_activation(x, act)
    acc = R.linear_int(pa, pw)
    assert acc.dtype == torch.int32 and acc.shape == (x.shape[0], pw.n)
    a64 = pa.codes().long() - pa.zero_point.long().reshape(-1, 1)
    w64 = pw.codes().long() - pw.zero_point.long()[:, None]
    assert torch.equal(acc.long(), a64 @ w64.T)


def test_linear_int_extreme_magnitudes_exact():
    # Largest 8-bit products over a long K: the float64 path must still be exact.
    k = 4099
    pw = PackedWeight.from_codes(torch.full((2, k), 255, dtype=torch.uint8), torch.ones(2),
                                 torch.tensor([0, 255]), 8)
    x = torch.full((1, k), 1000.0)
    pa = R.quantize_activation(x, R.ActQuant(8, torch.tensor(1.0), torch.tensor(0)))
    assert R.linear_int(pa, pw).tolist() == [[255 * 255 * k, 0]]
    pa2 = R.quantize_activation(-x, R.ActQuant(8, torch.tensor(1.0), torch.tensor(255)))
    assert R.linear_int(pa2, pw).tolist() == [[-255 * 255 * k, 0]]


def test_per_token_activation_odd_k():
    """Regression: per-token zero points used to be passed to pack_codes as [M, 1] (crash when K pads)."""
    x = torch.randn(3, 5)
    pa = R.quantize_activation(x, R.ActQuant(4, per_token=True))
    assert torch.equal(pa.codes(), R.quantize(x, pa.scale, pa.zero_point, 4, axis=0))
    assert torch.equal(unpack_codes(pa.data, 4, 6)[:, 5].int(), pa.zero_point)  # pad slot = the row's zero point


def test_quantize_activation_params():
    g = _gen(1)
    x = torch.randn(4, 6, generator=g)
    pa = R.quantize_activation(x, R.ActQuant(8, per_token=True))
    s, z = R.qparams_from_range(x.amin(1), x.amax(1), 8, False)
    assert torch.equal(pa.scale, s) and torch.equal(pa.zero_point, z) and pa.k == 6
    assert torch.equal(pa.codes(), R.quantize(x, s, z, 8, axis=0))
    pa_sym = R.quantize_activation(x, R.ActQuant(4, per_token=True, symmetric=True))
    assert pa_sym.zero_point.tolist() == [8] * 4
    pa_t = R.quantize_activation(x, R.ActQuant(4, torch.tensor([0.1]), torch.tensor([7])))
    assert torch.equal(pa_t.codes(), R.quantize(x, torch.tensor(0.1), torch.tensor(7), 4))
    with pytest.raises(ValueError, match=r"act bits must be one of \(4, 8\)"):
        R.ActQuant(2, per_token=True)
    with pytest.raises(ValueError, match="static activation quantization needs scale and zero_point"):
        R.ActQuant(8)


@SETTINGS
@given(m=st.sampled_from([1, 3, 17]), n=st.sampled_from([1, 5]), k=st.sampled_from([4, 10, 33]),
       wbits=BITS, abits=st.sampled_from([None, 4, 8]), bias=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_linear_matches_fake_quant_and_epilogue(m, n, k, wbits, abits, bias, seed):
    g = _gen(seed)
    pw = _packed_weight(n, k, wbits, g)
    x = torch.randn(2, m, k, generator=g)  # leading dims are kept
    b = torch.randn(n, generator=g) if bias else None
    w_deq = pw.dequantize()
    if abits is None:
        y = R.linear(x, pw, b)
        ref = F.linear(x.double(), w_deq.double(), None if b is None else b.double())
    else:
        s, z = R.qparams_from_range(x.min(), x.max(), abits, False)
        act = R.ActQuant(abits, s, z)
        y = R.linear(x, pw, b, act)
        x_fq = R.fake_quant_forward(x, s, z, abits)
        ref = F.linear(x_fq.double(), w_deq.double(), None if b is None else b.double())
        # the epilogue: int accumulator * a_scale * w_scale + bias
        acc = R.linear_int(R.quantize_activation(x.reshape(-1, k), act), pw).double()
        epi = acc * s.double() * pw.scale.double() + (0 if b is None else b.double())
        torch.testing.assert_close(y.reshape(-1, n).double(), epi, rtol=1e-6, atol=1e-6)
    assert y.shape == (2, m, n) and y.dtype == x.dtype
    assert rel_err(y, ref) <= 1e-5 or (ref.norm() == 0 and y.norm() == 0)


def test_linear_out_dtype():
    g = _gen(2)
    pw = _packed_weight(3, 8, 4, g)
    x = torch.randn(2, 8, generator=g)
    act = R.ActQuant(8, torch.tensor(0.05), torch.tensor(128))
    assert R.linear(x, pw, act=act, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert R.linear(x.half(), pw, act=act).dtype == torch.float16



def conv_int64(xi, wi, stride, padding, dilation, groups):
    """Independent integer convolution: padded input, one shifted slice per kernel tap, int64 einsum."""
    (sh, sw), (ph, pw_), (dh, dw) = stride, padding, dilation
    n, c, h, w = xi.shape
    o, cg, kh, kw = wi.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw_ - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(xi, (pw_, pw_, ph, ph))
    out = torch.zeros(n, o, ho, wo, dtype=torch.int64)
    og = o // groups
    for gi in range(groups):
        xg, wg = xp[:, gi * cg:(gi + 1) * cg], wi[gi * og:(gi + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                out[:, gi * og:(gi + 1) * og] += torch.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    return out


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, groups, hw)
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, (7, 6)),
    (4, 6, (5, 5), (2, 2), (2, 2), (1, 1), 2, (9, 9)),
    (6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 6, (5, 8)),   # depthwise
    (6, 12, (3, 3), (2, 1), (0, 1), (1, 1), 6, (7, 7)),  # depthwise multiplier 2
    (5, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, (4, 3)),
    (3, 4, (2, 3), (1, 2), (1, 0), (2, 1), 1, (8, 9)),   # non-square, dilation
    (9, 3, (3, 1), (3, 2), (2, 0), (1, 3), 3, (10, 11)),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("wbits,abits", [(2, 4), (3, 8), (4, 4), (8, 8)])
def test_conv2d_int_exact_and_matches_fake_quant(case, wbits, abits):
    cin, cout, ks, stride, padding, dilation, groups, hw = case
    g = _gen(hash((case, wbits, abits)) % 2 ** 31)
    shape = (cout, cin // groups, *ks)
    wcodes = torch.randint(0, code_max(wbits) + 1, shape, generator=g)
    pw = PackedWeight.from_codes(conv_weight_to_matrix(wcodes), torch.rand(cout, generator=g) * 0.05 + 0.01,
                                 torch.randint(0, code_max(wbits) + 1, (cout,), generator=g), wbits, shape)
    x = torch.randn(2, cin, *hw, generator=g)
    s, z = R.qparams_from_range(x.min(), x.max(), abits, False)
    xc = R.quantize(x, s, z, abits)
    acc = R.conv2d_int(xc, z, pw, stride, padding, dilation, groups)
    assert acc.dtype == torch.int32
    ref = conv_int64(xc.long() - z.long(), wcodes.long() - pw.zero_point.long().reshape(-1, 1, 1, 1), stride,
                     padding, dilation, groups)
    assert torch.equal(acc.long(), ref)
    # The float op: equals conv2d(fake_quant(x), dequantized weight) within 1e-5 relative.
    bias = torch.randn(cout, generator=g)
    y = R.conv2d(x, pw, bias, R.ActQuant(abits, s, z), stride, padding, dilation, groups)
    y_ref = F.conv2d(R.fake_quant_forward(x, s, z, abits).double(), pw.dequantize().double(), bias.double(), stride,
                     padding, dilation, groups)
    assert y.shape == y_ref.shape and rel_err(y, y_ref) <= 1e-5
    y_w = R.conv2d(x, pw, None, None, stride, padding, dilation, groups)
    y_w_ref = F.conv2d(x.double(), pw.dequantize().double(), None, stride, padding, dilation, groups)
    assert rel_err(y_w, y_w_ref) <= 1e-5
