"""The cached eager call of packed attention (dfqkern.nn.packed_attention) computes exactly what the general
packed path computes: the same logits bit for bit on every attention kind and static operand setting, masks,
NaN rows and returned weights included, and it follows quantizer writes and backend changes.

The reference is the general path itself (``QuantAttentionBase._eager_call`` returning None), whose
agreement with fake quantization test_packed_attention.py checks; the softmax codes are also compared
with ``SoftmaxQuantizer.codes`` directly."""
from __future__ import annotations

import copy

import pytest
import torch

from dfqkern.config import QuantConfig
from dfqkern.nn.attention import QuantAttentionBase, QuantMultiheadAttention
from dfqkern.nn.packed_attention import AttentionCall
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model, set_backend
from vit_models import MODELS, build

STATIC = {"a8_tensor": (8, {}), "a4_tensor": (4, {}), "a8_head": (8, {"attn_granularity": "per_head"}),
          "a4_head": (4, {"attn_granularity": "per_head"})}


def _packed(name, setting="a8_tensor"):
    model, x = build(name)
    bits, extra = STATIC[setting]
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=bits, first_last_bits=None, grid=20, **extra))
    calibrate_activations(q, x, progress=False)
    return pack_model(q), x


@pytest.fixture
def general(monkeypatch):
    """``general(fn)``: ``fn()`` with the eager call switched off (the general packed path)."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(QuantAttentionBase, "_eager_call", lambda self, *a, **k: None)
            return fn()
    return run


def _attention(model):
    return [m for m in model.modules() if isinstance(m, QuantAttentionBase)]


@pytest.mark.parametrize("setting", list(STATIC))
@pytest.mark.parametrize("name", list(MODELS))
def test_eager_call_logits_equal_the_general_path_bit_for_bit(name, setting, general):
    q, x = _packed(name, setting)
    with torch.no_grad():
        want = general(lambda: q(x[:3]))
        got = q(x[:3])
        got1 = q(x[:1])  # batch 1, the latency case
        want1 = general(lambda: q(x[:1]))
    assert all(isinstance(m._eager, AttentionCall) for m in _attention(q))  # the eager call did run
    assert torch.equal(got, want) and torch.equal(got1, want1)
    with torch.inference_mode():  # as the latency benchmark runs it
        assert torch.equal(q(x[:3]), want)


def test_fused_qkv_path_runs_for_timm_layout_and_matches():
    """QuantTimmAttention runs the whole core in one attention_qkv kernel call per module on the qkv output
    (no separate quantize calls; the logits equal the general path: the test above)."""
    q, x = _packed("vit_qkv")
    calls = []
    mods = _attention(q)
    with torch.no_grad():
        q(x[:1])  # builds the calls
        for m in mods:
            real_core, real_quantize = m._eager.core, m._eager.quantize
            m._eager.core = lambda *a, _real=real_core: calls.append(("core", tuple(a[0].shape))) or _real(*a)
            m._eager.quantize = lambda *a, _real=real_quantize: calls.append(("quantize",)) or _real(*a)
        q(x[:1])
    assert len(calls) == len(mods) and all(c[0] == "core" for c in calls), calls
    assert all(c[1][0] == 1 and c[1][2] == 3 * m.attn_dim for c, m in zip(calls, mods)), calls


def test_fused_qkv_chain_runs_where_the_core_does_not(general):
    """With a mask (additive bias) the fused call keeps its step-by-step chain: one quantize call on the qkv
    output, one for the stacked softmax levels, and the general path's logits."""
    q, x = _packed("vit_qkv")
    mod = _attention(q)[0]
    tokens = torch.randn(2, 6, mod.qkv.in_features, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(6, 6, dtype=torch.bool).tril_()
    with torch.no_grad():
        want = general(lambda: mod(tokens, attn_mask=mask))
        mod(tokens, attn_mask=mask)
        calls = []
        real = mod._eager.quantize
        mod._eager.quantize = lambda *a: calls.append(tuple(a[0].shape)) or real(*a)
        mod._eager.core = None  # would raise if called
        got = mod(tokens, attn_mask=mask)
    assert len(calls) == 2 and calls[0][2] == 3 and calls[1][2] == 2, calls
    assert torch.equal(got, want)


def test_fused_core_runs_only_on_the_backend_serving_matmul_int(general, monkeypatch):
    """A backend without attention_qkv (CUDA / Triton here) keeps its own kernels step by step: the core of
    the next backend (the reference) is not used in its place."""
    from dfqkern.kernels import dispatch

    q, x = _packed("vit_qkv")
    first = dispatch.first_backend("matmul_int", "cpu")
    mod = dispatch.backend_module(dispatch.Backend(first))
    if first == "reference":
        pytest.skip("the reference backend serves matmul_int here: no other backend to decline the core")
    monkeypatch.delattr(mod, "attention_qkv")
    with torch.no_grad():
        got = q(x[:1])
        assert all(m._eager.core is None for m in _attention(q))
        assert torch.equal(got, general(lambda: q(x[:1])))
    monkeypatch.undo()
    set_backend(q, "reference")  # forced: the reference serves both, so its core runs
    with torch.no_grad():
        q(x[:1])
    assert all(m._eager is not None and m._eager.core is not None for m in _attention(q))


def test_softmax_codes_equal_the_quantizer_codes():
    q, x = _packed("vit_qkv")
    mod = _attention(q)[0]
    with torch.no_grad():
        q(x[:1])
    call, sq = mod._eager, mod.attn_quant
    fine, _ = sq.steps()
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(2, 3, 7, 9, generator=g) * 4).softmax(-1)
    # the range boundary and its neighbours, exact 0 and 1, a NaN row and a NaN element
    edge = (sq.levels + 0.5) * fine
    below, above = torch.nextafter(edge, torch.tensor(0.0)), torch.nextafter(edge, torch.tensor(1.0))
    p[0, 0, 0, :5] = torch.stack([edge, below, above, torch.tensor(0.0), torch.tensor(1.0)])
    p[0, 1, 2] = float("nan")
    p[1, 2, 3, 4] = float("nan")
    want_fine, want_coarse = sq.codes(p)
    got = call._softmax_codes(p)
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 2, 7, 9)
    assert torch.equal(got[:, :, 0], want_fine) and torch.equal(got[:, :, 1], want_coarse)
    assert want_coarse.any() and want_fine.any()  # both ranges in use


@pytest.mark.parametrize("setting", ["a8_tensor", "a4_head"])
def test_masks_nan_rows_and_weights_equal_the_general_path(setting, general):
    """nn.MultiheadAttention with a fully masked key set for one sample (NaN rows) and returned weights."""
    q, x = _packed("vit_mha", setting)
    mha = next(m for m in q.modules() if isinstance(m, QuantMultiheadAttention))
    tokens = torch.randn(3, 5, mha.embed_dim, generator=torch.Generator().manual_seed(2)) * 3
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1] = True  # sample 1 attends to nothing: NaN rows
    kpm[2, 3:] = True
    bias = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    for kw in (dict(key_padding_mask=kpm, need_weights=True, average_attn_weights=False),
               dict(attn_mask=bias, need_weights=False), dict(is_causal=True, attn_mask=bias > 0, need_weights=True)):
        with torch.no_grad():
            want = general(lambda: mha(tokens, tokens, tokens, **kw))
            got = mha(tokens, tokens, tokens, **kw)
        assert isinstance(mha._eager, AttentionCall)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))
        if "key_padding_mask" in kw:
            assert torch.isnan(got[0][1]).all() and not torch.isnan(got[0][0]).any()


def test_eager_call_follows_quantizer_writes_and_backend(general):
    q, x = _packed("vit_qkv")
    with torch.no_grad():
        before = q(x[:2])
        mod = _attention(q)[0]
        first = mod._eager
        mod.q_quant.scale.mul_(1.5)  # in place: the cached scales would be stale
        mod.attn_quant.shift.fill_(int(mod.attn_quant.shift) + 1)
        mod.attn_quant.scale.div_(2)
        got = q(x[:2])
        assert mod._eager is not first
        assert not torch.equal(got, before)
        assert torch.equal(got, general(lambda: q(x[:2])))
        set_backend(q, "reference")  # forced backend: rebuilt, the reference kernels serve it
        assert mod._eager is None
        ref = q(x[:2])
        assert torch.equal(ref, general(lambda: q(x[:2])))
        torch.testing.assert_close(ref, got, rtol=1e-4, atol=1e-5)
        clone = copy.deepcopy(q)  # the call is not copied: the copy builds its own
        assert "_eager" not in _attention(clone)[0].__dict__
        assert torch.equal(clone(x[:2]), ref)


@pytest.mark.parametrize("setting", ["a8_tensor", "a4_head"])
def test_fused_operand_codes_equal_the_general_codes(setting):
    """The fused quantize of the qkv output gives q, k, v codes equal to the general path's per-operand codes,
    with a q scaling that rounds in float32 (head_dim 32: 32**-0.5; the tiny models' 16**-0.5 is exact)."""
    from dfqkern.nn.attention import _operand_codes
    from dfqkern.vit_nets import CifarViT

    torch.manual_seed(0)
    fp = CifarViT("qkv", dim=64, depth=1, num_heads=2).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bits, extra = STATIC[setting]
    q = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=bits, first_last_bits=None, grid=20, **extra))
    calibrate_activations(q, x, progress=False)
    pack_model(q)
    mod = _attention(q)[0]
    assert mod.head_dim == 32
    seen = {}

    def keep(m, args, out):
        seen.setdefault("qkv", out)

    mod.qkv.register_forward_hook(keep)
    with torch.no_grad():
        q(x)
    call = mod._eager
    assert call.fused
    codes = []
    call._finish = lambda qc, kc_t, vc, *rest: codes.append((qc, kc_t, vc)) or (None, None)
    qkv = seen["qkv"]  # [16, 65, 192]: about 66,000 values per operand
    call.attend_qkv(qkv, mod.num_heads, None, True)  # need_probs: the step-by-step chain, not the one-call core
    (qc, kc_t, vc), = codes
    b, n, _ = qkv.shape
    q_, k_, v_ = qkv.reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert torch.equal(qc, _operand_codes(mod.q_quant, q_ * mod.scale, None)[0])
    assert torch.equal(kc_t, _operand_codes(mod.k_quant, k_, None)[0].transpose(-2, -1))
    assert torch.equal(vc, _operand_codes(mod.v_quant, v_, None)[0])
    assert len(qc.unique()) > 2 ** (bits - 1)  # the codes span the grid
