"""Observers (minmax, mse Lp grid search), WeightQuantizer (nearest / AdaRound) and ActQuantizer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfqkern.config import ObserverSpec
from dfqkern.formats import code_max, symmetric_zero_point
from dfqkern.kernels import reference as R
from dfqkern.nn import ActQuantizer, WeightQuantizer
from dfqkern.nn.observers import RangeTracker, channel_range, mse_qparams, weight_qparams

SETTINGS = settings(max_examples=30, deadline=None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def lp_error(x, scale, zp, bits, axis, p):
    """Per-channel sum |x - fq(x)|^p, written out per channel."""
    fq = R.fake_quant_forward(x, scale, zp, bits, axis)
    err = (fq - x).abs().pow(p)
    if axis is None:
        return err.sum().reshape(1)
    return err.transpose(0, axis).reshape(x.shape[axis], -1).sum(1)


# ----------------------------------------------------------------------------- observers

def test_channel_range():
    x = torch.randn(3, 4, 5, generator=_gen(0))
    lo, hi = channel_range(x, 1)
    assert torch.equal(lo, x.amin(dim=(0, 2))) and torch.equal(hi, x.amax(dim=(0, 2)))
    lo, hi = channel_range(x, None)
    assert lo.shape == (1,) and lo.item() == x.min().item() and hi.item() == x.max().item()


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(), seed=st.integers(0, 10 ** 6),
       heavy=st.booleans())
def test_mse_observer_is_the_grid_argmin(bits, symmetric, seed, heavy):
    g = _gen(seed)
    w = torch.randn(4, 24, generator=g)
    if heavy:  # outliers: clipping should win
        w = w * torch.exp(torch.randn(4, 24, generator=g))
    grid, min_clip, p = 12, 0.3, 2.4
    scale, zp = mse_qparams(w, bits, symmetric, 0, spec=ObserverSpec(lp=p, grid=grid, min_clip=min_clip))
    lo, hi = w.amin(1), w.amax(1)
    # brute force over the same candidate ratios, per channel
    errs, cands = [], []
    for ratio in torch.linspace(1.0, min_clip, grid).tolist():
        s, z = R.qparams_from_range(lo * ratio, hi * ratio, bits, symmetric)
        errs.append(lp_error(w, s, z, bits, 0, p))
        cands.append((s, z))
    errs = torch.stack(errs)  # [grid, C]
    best = errs.min(0).values
    got = lp_error(w, scale, zp, bits, 0, p)
    torch.testing.assert_close(got, best, rtol=1e-6, atol=0)
    # never worse than plain min/max (ratio 1 is a candidate)
    s_mm, z_mm = weight_qparams(w, bits, symmetric, "minmax")
    assert torch.all(got <= lp_error(w, s_mm, z_mm, bits, 0, p) * (1 + 1e-6))
    # every chosen (scale, zp) is one of the candidates of its channel
    for c in range(4):
        assert any(s[c] == scale[c] and z[c] == zp[c] for s, z in cands)


def test_mse_clips_outliers_and_minmax_does_not():
    w = torch.randn(2, 4096, generator=_gen(1)) ** 3  # heavy tails: a few large values set min/max
    s_mm, _ = weight_qparams(w, 4, False, "minmax")
    s_mse, _ = weight_qparams(w, 4, False, "mse")
    assert torch.all(s_mse < 0.85 * s_mm)
    s_ref, z_ref = R.qparams_from_range(w.amin(1), w.amax(1), 4, False)
    assert torch.equal(s_mm, s_ref)


def test_observer_name_errors():
    with pytest.raises(ValueError, match="observer must be 'minmax' or 'mse', got 'percentile'"):
        weight_qparams(torch.randn(2, 3), 4, False, "percentile")
    t = RangeTracker()
    t.update(torch.randn(10))
    with pytest.raises(ValueError, match="observer must be 'minmax' or 'mse', got 'kl'"):
        t.qparams(8, False, "kl")


def test_range_tracker():
    t = RangeTracker(sample_size=64, seed=3)
    with pytest.raises(RuntimeError, match="no activations were observed"):
        t.qparams(8, False, "minmax")
    t.update(torch.empty(0))  # empty batches are ignored
    assert t.lo is None
    batches = [torch.randn(100, generator=_gen(i)) * (i + 1) for i in range(5)]
    for b in batches:
        t.update(b.reshape(10, 10))
    allx = torch.cat(batches)
    assert t.lo.item() == allx.min().item() and t.hi.item() == allx.max().item()
    assert t.n_sampled <= 64 + 16 and sum(s.numel() for s in t.samples) == t.n_sampled
    s, z = t.qparams(8, False, "minmax")
    s_ref, z_ref = R.qparams_from_range(allx.min().reshape(1), allx.max().reshape(1), 8, False)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    # mse uses the running range for its grid: the chosen range never exceeds it
    s_mse, _ = t.qparams(8, False, "mse")
    assert s_mse.item() <= s_ref.item() * (1 + 1e-6)
    # the sample is reproducible from the seed
    t2 = RangeTracker(sample_size=64, seed=3)
    for b in batches:
        t2.update(b.reshape(10, 10))
    assert all(torch.equal(a, b) for a, b in zip(t.samples, t2.samples))
    with pytest.raises(ValueError, match="activations contain NaN or Inf"):
        t.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="activations contain NaN or Inf"):
        t.update(torch.tensor([float("-inf")]))


# ----------------------------------------------------------------------------- WeightQuantizer

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_weight_quantizer_nearest(bits, symmetric, observer):
    w = torch.randn(6, 3, 3, 3, generator=_gen(bits))
    q = WeightQuantizer(bits, 6, symmetric)
    q.observe(w, observer, ObserverSpec(grid=10))
    s_ref, z_ref = weight_qparams(w, bits, symmetric, observer, ObserverSpec(grid=10))
    assert torch.equal(q.scale.data, s_ref) and torch.equal(q.zero_point, z_ref)
    if symmetric:
        assert q.zero_point.tolist() == [symmetric_zero_point(bits)] * 6
    assert torch.equal(q(w), R.fake_quant_forward(w, q.scale, q.zero_point, bits, 0))
    codes = q.codes(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= code_max(bits)
    assert torch.equal(R.dequantize(codes, q.scale, q.zero_point, 0), q(w))
    assert not q.scale.requires_grad  # frozen unless a method learns it
    q.enabled = False
    assert q(w) is w


def test_weight_quantizer_errors():
    with pytest.raises(ValueError, match=r"weight bits must be one of \(2, 3, 4, 8\), got 5"):
        WeightQuantizer(5, 4)
    with pytest.raises(ValueError, match=r"activation bits must be one of \(2, 3, 4, 8\), got 5"):
        ActQuantizer(5)
    with pytest.raises(AttributeError):  # the width is fixed at construction (one owner: the layer's LayerQuant)
        ActQuantizer(4).bits = 3


def test_adaround_lifecycle_and_state_dict():
    w = torch.randn(5, 7, generator=_gen(2))
    q = WeightQuantizer(4, 5)
    q.observe(w, "minmax")
    v = q.start_adaround(w)
    assert q.rounding == "soft" and v is q.alpha and v.requires_grad and v.shape == w.shape
    assert "alpha" in dict(q.named_parameters()) and "base" in dict(q.named_buffers())
    w_soft = q(w)
    assert q.last_reg is not None and q.last_reg.item() > 0
    assert (w_soft - w).abs().max() <= 0.51 * q.scale.max()  # starts near the float weight
    # learning: push V and check codes follow sign(V)
    with torch.no_grad():
        q.alpha.copy_(torch.randn(5, 7, generator=_gen(3)) * 5)
    codes = q.codes(w)
    expect = torch.clamp(q.base + (q.alpha >= 0).float() + q.zero_point[:, None].float(), 0, 15)
    assert torch.equal(codes, expect.to(torch.uint8))
    q.harden()
    assert q.rounding == "hard"
    w_hard = q(w)
    assert q.last_reg is None
    assert torch.equal(w_hard, R.dequantize(codes, q.scale, q.zero_point, 0))
    # a fresh quantizer loads the AdaRound state and reproduces the hard result
    q2 = WeightQuantizer(4, 5)
    q2.load_state_dict(q.state_dict())
    assert q2.rounding == "hard" and torch.equal(q2(w), w_hard) and torch.equal(q2.codes(w), codes)
    # the soft gradient reaches V
    q3 = WeightQuantizer(4, 5)
    q3.observe(w, "minmax")
    v3 = q3.start_adaround(w)
    (q3(w).sum() + 0.01 * q3.last_reg).backward()
    assert v3.grad is not None and v3.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- ActQuantizer

@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_act_quantizer_observe_finalize(observer, symmetric):
    a = ActQuantizer(8, symmetric=symmetric, observer=observer, spec=ObserverSpec(grid=20))
    x = torch.randn(64, 16, generator=_gen(0))
    with pytest.raises(RuntimeError, match="before calibration"):
        a(x)
    with pytest.raises(RuntimeError, match="finalize\\(\\) called before any observation"):
        a.finalize()
    a.set_mode("observe")
    assert a(x) is x  # observing passes float through
    a(x * 2)
    a.finalize()
    assert a.mode == "quant" and bool(a.calibrated)
    if observer == "minmax":
        s_ref, z_ref = R.qparams_from_range((2 * x).min().reshape(1), (2 * x).max().reshape(1), 8, symmetric)
        assert torch.equal(a.scale.data, s_ref) and torch.equal(a.zero_point, z_ref)
    if symmetric:
        assert a.zero_point.item() == 128
    assert torch.equal(a(x), R.fake_quant_forward(x, a.scale, a.zero_point, 8))
    a.set_mode("off")
    assert a(x) is x
    with pytest.raises(ValueError, match=r"mode must be one of \('observe', 'quant', 'off'\), got 'train'"):
        a.set_mode("train")
    # calibration state round-trips through state_dict
    b = ActQuantizer(8, symmetric=symmetric)
    b.load_state_dict(a.state_dict())
    b.set_mode("quant")
    a.set_mode("quant")
    assert bool(b.calibrated) and torch.equal(b(x), a(x))


def test_act_quantizer_per_token():
    a = ActQuantizer(4, per_token=True)
    assert bool(a.calibrated)  # dynamic: nothing to calibrate
    x = torch.randn(2, 3, 10, generator=_gen(4))
    y = a(x)
    rows = x.reshape(-1, 10)
    s, z = R.qparams_from_range(rows.amin(1), rows.amax(1), 4, False)
    assert torch.equal(y, R.fake_quant_forward(rows, s, z, 4, 0).reshape(x.shape))
    a.set_mode("observe")  # per-token keeps quantizing: there is nothing to observe
    a.finalize()
    assert a.mode == "quant"


def test_qdrop_in_training_only_and_fresh_masks():
    def make():
        a = ActQuantizer(4, seed=5)
        a.set_mode("observe")
        a(torch.randn(256, generator=_gen(0)))
        a.finalize()
        a.drop_prob = 0.5
        return a

    a = make()
    x = torch.randn(4000, generator=_gen(1))
    fq = R.fake_quant_forward(x, a.scale, a.zero_point, 4)
    a.eval()
    assert torch.equal(a(x), fq)
    a.train()
    y1, y2 = a(x), a(x)
    kept1, kept2 = (y1 == x) & (fq != x), (y2 == x) & (fq != x)
    assert 0.4 < kept1.float().sum() / (fq != x).float().sum() < 0.6
    assert not torch.equal(kept1, kept2)  # every forward draws a fresh mask
    assert torch.equal(y1[~kept1], fq[~kept1])
    b = make().train()  # reproducible from the seed
    assert torch.equal(b(x), y1) and torch.equal(b(x), y2)
