"""Packed attention runs q.k^T and attn.v on the integer op (dispatch.matmul_int), and equals fake-quant.

Tolerances: one attention module given the same q, k, v, packed vs fake-quant: the two compute the same
integers; only the float rounding of the score scaling differs (~1e-7), which can move a softmax output
across one of its rounding boundaries (measured: about one element in 10^5). So: at most 2 % of the
output elements differ by more than 1e-5 x the output's max magnitude, and none by more than one coarse
softmax step x max |v|. Whole model: max abs logit difference <= 5 % of the logits'
max magnitude, because a 1e-7 difference before a later layer's activation quantizer can move a value
across a rounding boundary (one step of that grid), and such steps compound over the blocks.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dfqkern.config import QuantConfig
from dfqkern.kernels import dispatch
from dfqkern.kernels import reference as R
from dfqkern.nn.attention import QuantAttentionBase
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model
from vit_models import MODELS, build

SETTINGS = {  # name -> (act bits, QuantConfig fields)
    "a8_tensor": (8, {}),
    "a4_tensor": (4, {}),
    "a8_head": (8, {"attn_granularity": "per_head"}),
    "a4_head": (4, {"attn_granularity": "per_head"}),
    "a8_token": (8, {"act_granularity": "per_token"}),
}


def _calibrated(name, setting):
    model, x = build(name)
    bits, extra = SETTINGS[setting]
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=bits, first_last_bits=None, grid=20, **extra))
    calibrate_activations(q, x, progress=False)
    return q, x


def _attend_inputs(model, x):
    """{module name: (args, kwargs)} of every attention module's first ``attend`` call (q, k, v, bias) on ``x``."""
    seen = {}
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAttentionBase)]
    for n, m in mods:
        def spy(*a, _n=n, _orig=m.attend, **kw):
            seen.setdefault(_n, (a, kw))
            return _orig(*a, **kw)
        m.attend = spy  # instance attribute: shadows the method for this module only
    with torch.no_grad():
        model(x)
    for _, m in mods:
        del m.attend
    return seen


def _backends_with_matmul(op: str = "matmul_int"):
    """The kernel backend modules serving ``op`` here: the packed paths call them through dispatch
    (general path) or resolved once (the cached eager call, dfqkern.nn.packed_attention)."""
    mods = (dispatch.backend_module(b) for b in dispatch.Backend)
    return [m for m in mods if m is not None and hasattr(m, op)]


@pytest.fixture
def spy(monkeypatch):
    """Records every backend matmul_int call (operand dtypes and shapes), then runs the real kernel."""
    calls = []
    for mod in _backends_with_matmul():
        def record(a, a_zp, b, b_zp, _real=mod.matmul_int):
            calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
            return _real(a, a_zp, b, b_zp)

        monkeypatch.setattr(mod, "matmul_int", record)
    return calls


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_attention_runs_on_integer_op_and_equals_fake_quant(name, setting, spy):
    q, x = _calibrated(name, setting)
    packed = pack_model(copy.deepcopy(q))
    inputs = _attend_inputs(q, x[:4])
    assert inputs
    for mod_name, (args, kwargs) in inputs.items():  # layer by layer: the same q, k, v (and bias) into both
        fq_mod, pk_mod = q.get_submodule(mod_name), packed.get_submodule(mod_name)
        assert pk_mod.is_packed and not fq_mod.is_packed
        spy.clear()
        with torch.no_grad():
            want = fq_mod.attend(*args, **kwargs)[0]
            assert not spy  # fake-quant: float matmuls on fake-quantized operands
            got = pk_mod.attend(*args, **kwargs)[0]
        # q.k^T, then attn.v for both softmax ranges (two calls, or one on the ranges' codes stacked along the
        # rows: the cached eager call), all on uint8 codes
        calls = 3 if SETTINGS[setting][1].get("act_granularity") == "per_token" else 2  # per token: general path
        assert len(spy) == calls and all(a == b == torch.uint8 for a, b, _, _ in spy), spy
        rows = spy[0][2][-2]
        assert sum(a_shape[-2] for _, _, a_shape, _ in spy[1:]) == 2 * rows, spy
        assert torch.isfinite(got).all()
        diff, scale = (got - want).abs(), want.abs().max().item()
        _, coarse = pk_mod.attn_quant.steps()
        v_max = args[2].abs().max().item() * 1.1  # |v| after fake quantization (its grid may overshoot a little)
        assert diff.max().item() <= coarse.item() * v_max, mod_name  # at most one softmax code apart
        assert (diff > 1e-5 * scale).float().mean().item() <= 0.02, mod_name  # and almost everywhere equal
    with torch.no_grad():
        fq, pk = q(x[:4]), packed(x[:4])
    assert (pk - fq).abs().max().item() <= 0.05 * fq.abs().max().item()


def test_packed_forward_needs_the_integer_op(monkeypatch):
    """With the integer op gone the packed model cannot run: there is no float fallback inside it."""
    q, x = _calibrated("vit_qkv", "a8_tensor")
    pack_model(q)

    def gone(*a, **k):
        raise RuntimeError("matmul_int unavailable")

    for op in ("matmul_int", "attention_qkv"):  # the fused qkv core runs its matmuls inside one kernel
        monkeypatch.setattr(dispatch, op, gone)
        for mod in _backends_with_matmul(op):
            monkeypatch.setattr(mod, op, gone)
    with torch.no_grad(), pytest.raises(RuntimeError, match="matmul_int unavailable"):
        q(x[:2])


def test_pack_refuses_three_bit_attention():
    model, x = build("vit_qkv")
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=3, first_last_bits=8, grid=20))
    calibrate_activations(q, x, progress=False)
    with pytest.raises(ValueError, match=r"cannot pack layer 'blocks\.0\.attn\.qkv'.*3-bit"):
        pack_model(q)
    assert not any(m.is_packed for m in q.modules() if isinstance(m, QuantAttentionBase))


def test_cpu_backend_forced_serves_the_integer_op():
    q, x = _calibrated("vit_mha", "a8_tensor")
    from dfqkern.quantize import set_backend

    pack_model(q)
    with torch.no_grad():
        auto = q(x[:2])
        set_backend(q, "cpu")
        assert torch.equal(q(x[:2]), auto)
        set_backend(q, "reference")
        torch.testing.assert_close(q(x[:2]), auto, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the op

def test_matmul_int_exact_with_broadcast_zero_points():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 7, 4), generator=g, dtype=torch.uint8)
    for za, zb in [(torch.tensor([3]), torch.tensor([200])),
                   (torch.randint(0, 256, (1, 3, 1, 1), generator=g), torch.randint(0, 256, (1, 3, 1, 1), generator=g)),
                   (torch.randint(0, 256, (2, 3, 5, 1), generator=g),
                    torch.randint(0, 256, (2, 3, 1, 4), generator=g))]:
        want = torch.zeros(2, 3, 5, 4, dtype=torch.int64)
        for i in range(2):  # written out as sums
            for h in range(3):
                ai = a[i, h].long() - za.expand(2, 3, 5, 1)[i, h].long()
                bi = b[i, h].long() - zb.expand(2, 3, 1, 4)[i, h].long()
                for m in range(5):
                    for n in range(4):
                        want[i, h, m, n] = (ai[m] * bi[:, n]).sum()
        for backend in ("reference", "cpu"):
            got = dispatch.matmul_int(a, za.int(), b, zb.int(), backend=backend)
            assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    big = torch.full((1, 1, 4000), 255, dtype=torch.uint8)  # 4000 * 255**2 > 2**24: float32 would round
    got = R.matmul_int(big, torch.tensor([0]), big.transpose(1, 2).contiguous(), torch.tensor([0]))
    assert int(got) == 4000 * 255 * 255


@pytest.mark.parametrize("args,error,match", [
    (lambda a, z: (a.float(), z, a.transpose(-1, -2), z), TypeError, "a must be a uint8 tensor of codes"),
    (lambda a, z: (a, z, a, z), ValueError, "a has K=6 but b has K=5"),
    (lambda a, z: (a, z, a[:1].transpose(-1, -2), z), ValueError, "a and b must have one batch shape"),
    (lambda a, z: (a, z.float(), a.transpose(-1, -2), z), TypeError, "a_zero_point must be an integer tensor"),
    (lambda a, z: (a, torch.zeros(2, 1, 5, 2, dtype=torch.int32), a.transpose(-1, -2), z), ValueError,
     r"a_zero_point of shape \(2, 1, 5, 2\) must have one element or broadcast to \(2, 1, 5, 1\)"),
])
def test_matmul_int_contract_names_the_argument(args, error, match):
    a = torch.zeros(2, 1, 5, 6, dtype=torch.uint8)
    with pytest.raises(error, match=match):
        dispatch.matmul_int(*args(a, torch.zeros(1, dtype=torch.int32)))
