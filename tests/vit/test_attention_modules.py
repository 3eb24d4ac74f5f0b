"""Quantized attention modules (dfqkern.nn.attention): swapped at quantize time, equal to the float modules
with quantization off, reported when not handled; the softmax and per-head quantizers against their formulas."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfqkern.calib.capture import quantization_disabled
from dfqkern.config import LayerRule, QuantConfig
from dfqkern.kernels import reference as R
from dfqkern.nn import QuantLayer, QuantLinear
from dfqkern.nn.attention import (HeadActQuantizer, QuantAttentionBase, QuantMultiheadAttention, SoftmaxQuantizer,
                                  QuantTransformerEncoderLayer)
from dfqkern.quantize import calibrate_activations, quantize_model
from vit_models import MODELS, build
from dfqkern.model_info import model_info

FAST = dict(grid=20)
EXPECTED_KINDS = {"timm_vit": {"timm_attention"}, "timm_swin": {"timm_window_attention"},
                  "torchvision_vit": {"multihead_attention"}, "vit_qkv": {"qkv_attention"},
                  "vit_mha": {"multihead_attention", "transformer_encoder_layer"}}


@pytest.mark.parametrize("name", list(MODELS))
def test_swapped_at_quantize_time_and_equal_in_float(name):
    model, x = build(name)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, **FAST))
    rep = model_info(q).report
    assert set(rep.attention.values()) == EXPECTED_KINDS[name] and not rep.unhandled
    attns = [m for m in q.modules() if isinstance(m, QuantAttentionBase)]
    assert attns and all(m.bits == 8 and m.q_quant is not None for m in attns)
    assert all(isinstance(m.input_projection(), QuantLinear) for m in attns)  # the projections really are swapped
    with torch.no_grad(), quantization_disabled(q):
        torch.testing.assert_close(q(x), model(x), rtol=1e-4, atol=1e-5)
    calibrate_activations(q, x, progress=False)  # every operand quantizer sees data (no "no activations")
    assert all(bool(m.q_quant.calibrated) and bool(m.v_quant.calibrated) for m in attns)


def test_encoder_fast_path_replaced_by_quant_linears():
    """The issue's failure: nn.TransformerEncoderLayer's eval fast path read the weights functionally, so the
    QuantLinear modules never ran. Now every one of them runs in a forward."""
    model, x = build("vit_mha")
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, **FAST))
    assert all(type(m) is QuantTransformerEncoderLayer for m in q.blocks.layers)
    ran = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n)) for n, m in q.named_modules()
             if isinstance(m, QuantLayer)]
    calibrate_activations(q, x, progress=False)
    for h in hooks:
        h.remove()
    assert ran == set(model_info(q).report.layers)


def _mha_pair(kdim=None, batch_first=True, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    return mha, QuantMultiheadAttention(mha).eval()


@pytest.mark.parametrize("case", ["self", "cross_kdim", "seq_first", "no_bias", "unbatched"])
def test_mha_twin_equals_torch_with_masks(case):
    mha, twin = _mha_pair(kdim=12 if case == "cross_kdim" else None, batch_first=case != "seq_first",
                          bias=case != "no_bias")
    g = torch.Generator().manual_seed(1)
    b, n, s = 3, 5, 7 if case == "cross_kdim" else 5
    q = torch.randn(b, n, 16, generator=g)
    kv = torch.randn(b, s, 12 if case == "cross_kdim" else 16, generator=g) if case == "cross_kdim" else q
    bool_mask = torch.rand(n, s, generator=g) < 0.3
    bool_mask[:, 0] = False  # no fully masked row
    float_mask = torch.randn(b * 4, n, s, generator=g)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, -2:] = True
    if case == "seq_first":
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    if case == "unbatched":
        q = kv = q[0]
        float_mask, kpm = float_mask[:4], kpm[0]
    kw_list = [dict(), dict(attn_mask=bool_mask), dict(attn_mask=float_mask, key_padding_mask=kpm),
               dict(need_weights=True, average_attn_weights=False, key_padding_mask=kpm)]
    with torch.no_grad():
        for kw in kw_list:
            want, want_w = mha(q, kv, kv, **kw)
            got, got_w = twin(q, kv, kv, **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


def test_mha_twin_causal():
    mha, twin = _mha_pair()
    x = torch.randn(2, 6, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        want = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
        torch.testing.assert_close(twin(x, x, x, is_causal=True, need_weights=False)[0], want, rtol=1e-5, atol=1e-5)


def test_encoder_with_padding_mask_equals_float():
    """A padded batch: torch's encoder would take the nested-tensor fast path; the swapped one computes the
    same outputs on the non-padded positions."""
    model, x = build("vit_mha")
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, **FAST))
    tokens = torch.randn(3, 9, 32)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad(), quantization_disabled(q):
        want = model.blocks(tokens, src_key_padding_mask=kpm)
        got = q.blocks(tokens, src_key_padding_mask=kpm)
    keep = ~kpm
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)


class MyAttention(nn.Module):
    """An attention-like module no kind handles."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mine = MyAttention()
        self.kv_bias = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.plain = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.mine(x)
        x = self.kv_bias(x, x, x, need_weights=False)[0]
        x = self.plain(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def test_unhandled_attention_is_reported_never_silent():
    q = quantize_model(Mixed().eval(), QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, **FAST,
                                                   rules=(LayerRule(pattern="plain.*", act_bits="float"),)))
    rep = model_info(q).report
    assert "MyAttention is an attention module with no quantized handler" in rep.unhandled["mine"]
    assert "add_bias_kv" in rep.unhandled["kv_bias"]
    assert "matmuls left in float" in rep.unhandled["plain"]  # weight-only projections: no operand bits
    assert rep.attention == {"plain": "multihead_attention"} and q.plain.bits is None
    assert type(q.kv_bias) is nn.MultiheadAttention and isinstance(q.mine.qkv, QuantLinear)
    x = torch.randn(2, 5, 8)
    calibrate_activations(q, x, progress=False)
    assert q(x).shape == (2, 3)


# ----------------------------------------------------------------------------- quantizers

def _softmax_samples(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n // 50, 50, generator=g) * 3).softmax(-1)


@pytest.mark.parametrize("bits", [4, 8])
def test_softmax_quantizer_grid_formula(bits):
    sq = SoftmaxQuantizer(bits)
    with torch.no_grad():
        sq.shift.fill_(3)
        sq.scale.fill_(1.0 / ((2 ** (bits - 1) - 1) * 8))
    levels = 2 ** (bits - 1) - 1
    p = _softmax_samples()
    fine, coarse = 1.0 / (levels * 8), 1.0 / levels
    want = []
    for v in p.reshape(-1).tolist():  # written out element by element
        lo = round(v / fine)
        want.append(lo * fine if lo <= levels else min(round(v / coarse), levels) * coarse)
    torch.testing.assert_close(sq(p).reshape(-1), torch.tensor(want), rtol=0, atol=1e-7)
    c_fine, c_coarse = sq.codes(p)
    assert c_fine.dtype == torch.uint8 and int(c_fine.max()) <= levels and int(c_coarse.max()) <= levels
    assert not bool(((c_fine > 0) & (c_coarse > 0)).any())


def test_softmax_quantizer_observes_best_shift_and_beats_uniform():
    p = _softmax_samples(seed=1)
    for bits in (4, 8):
        sq = SoftmaxQuantizer(bits)
        sq.set_mode("observe")
        sq(p)
        sq.finalize()
        levels = 2 ** (bits - 1) - 1

        def err(shift):
            fine, coarse = 1.0 / (levels * 2 ** shift), 1.0 / levels
            lo = torch.round(p / fine)
            fq = torch.where(lo <= levels, lo * fine, torch.round(p / coarse).clamp(max=levels) * coarse)
            return (fq - p).abs().pow(2.4).sum().item()

        errors = [err(s) for s in range(9)]
        assert int(sq.shift) == min(range(9), key=errors.__getitem__)
        assert sq.scale.item() == pytest.approx(1.0 / (levels * 2 ** int(sq.shift)))
        # the reason for this grid: a uniform b-bit grid over [0, 1] has a larger error on softmax outputs
        # (measured 0.78x at 4 bits and 0.41x at 8 bits of the uniform grid's on these samples)
        uniform = R.fake_quant_forward(p, torch.tensor([1.0 / (2 ** bits - 1)]), torch.tensor([0]), bits)
        assert min(errors) < 0.9 * (uniform - p).abs().pow(2.4).sum().item()


def test_softmax_quantizer_nan_propagates_and_is_straight_through():
    sq = SoftmaxQuantizer(8)
    p = torch.tensor([[0.5, 0.5], [math.nan, math.nan]], requires_grad=True)
    out = sq(p)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    out[0].sum().backward()
    assert torch.equal(p.grad[0], torch.ones(2))


def test_head_quantizer_one_range_per_head():
    x = torch.randn(4, 3, 5, 6) * torch.tensor([1.0, 5.0, 0.1]).reshape(1, 3, 1, 1)
    hq = HeadActQuantizer(8, 3, observer="minmax")
    hq.set_mode("observe")
    hq(x)
    hq.finalize()
    for h in range(3):
        s, z = R.qparams_from_range(x[:, h].min().reshape(1), x[:, h].max().reshape(1), 8, False)
        assert hq.scale[h].item() == pytest.approx(s.item()) and hq.zero_point[h].item() == z.item()
    want = R.fake_quant_forward(x, hq.scale.detach(), hq.zero_point, 8, 1)
    torch.testing.assert_close(hq(x), want)
