"""Custom-op autograd (dfqkern.autograd): gradients equal the reference backward; torch.compile traces them."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from dfqkern import autograd as A
from dfqkern.config import LayerQuant, QuantConfig
from dfqkern.kernels import Backend, available_backends
from dfqkern.kernels import reference as R
from dfqkern.nn import QuantLinear


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _triton_interpreted_without_gpu(monkeypatch):
    """The triton rows run interpreted on a CPU machine; triton reads TRITON_INTERPRET at call time too,
    so it must be set while they run (not only when the kernel suites imported triton)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _cpu_backends():
    """Backends that serve CPU tensors here: 'reference' always, plus e.g. the compiled 'cpu' one when built."""
    from dfqkern.kernels import dispatch

    return [b for b in available_backends() if "cpu" in dispatch.backend_module(Backend(b)).DEVICES]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_fake_quant_grads_equal_reference(per_channel, bits, drop_prob, backend):
    """Through the custom op, each backend's forward / backward equals the reference: exactly for the
    reference itself, within float tolerance (summation order) for a compiled backend."""
    g = _gen(bits * 10 + per_channel)
    x = torch.randn(6, 9, generator=g) * 2
    axis = 0 if per_channel else None
    n = 6 if per_channel else 1
    scale = torch.rand(n, generator=g) * 0.3 + 0.05
    zp_f = torch.randint(0, 2 ** bits, (n,), generator=g).float()
    grad = torch.randn(6, 9, generator=g)
    xv, sv, zv = x.clone().requires_grad_(), scale.clone().requires_grad_(), zp_f.clone().requires_grad_()
    out = A.fake_quant(xv, sv, zv, bits, axis, grad_scale=0.3, drop_prob=drop_prob, seed=11, backend=backend)
    out.backward(grad)
    gx, gs, gz = R.fake_quant_backward(grad, x, scale, zp_f, bits, axis, 0.3, drop_prob, 11)
    ref_out = R.fake_quant_forward(x, scale, zp_f, bits, axis, drop_prob, 11)
    if backend == "reference":
        assert torch.equal(out.detach(), ref_out) and torch.equal(xv.grad, gx)
        assert torch.equal(sv.grad, gs.reshape(scale.shape)) and torch.equal(zv.grad, gz.reshape(zp_f.shape))
    else:
        torch.testing.assert_close(out.detach(), ref_out, rtol=1e-6, atol=1e-6)
        assert torch.equal(xv.grad, gx)  # a mask times the incoming gradient: exact on every backend
        torch.testing.assert_close(sv.grad, gs.reshape(scale.shape), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zv.grad, gz.reshape(zp_f.shape), rtol=1e-5, atol=1e-5)
    # an integer zero point (the quantizers' buffer) gets no gradient; x and scale still do
    xv2, sv2 = x.clone().requires_grad_(), scale.clone().requires_grad_()
    A.fake_quant(xv2, sv2, zp_f.to(torch.int32), bits, axis, drop_prob=drop_prob, seed=11,
                 backend=backend).backward(grad)
    assert torch.equal(xv2.grad, gx)
    torch.testing.assert_close(sv2.grad, gs.reshape(scale.shape) / 0.3, rtol=1e-5, atol=1e-5)


def test_fake_quant_noncontiguous_and_backend_argument():
    x = torch.randn(8, 6).t()  # non-contiguous
    s, z = torch.tensor([0.1]), torch.tensor([8], dtype=torch.int32)
    ref = R.fake_quant_forward(x.contiguous(), s, z, 4)
    assert torch.equal(A.fake_quant(x, s, z, 4), ref)
    assert torch.equal(A.fake_quant(x, s, z, 4, backend="reference"), ref)
    assert torch.equal(A.fake_quant(x, s, z, 4, backend=Backend.REFERENCE), ref)
    with pytest.raises(ValueError, match=r"backend must be one of .*'tpu'"):
        A.fake_quant(x, s, z, 4, backend="tpu")


@pytest.mark.parametrize("use", ["both", "w_only", "reg_only"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_adaround_grads_equal_reference(use, bits, backend):
    g = _gen(bits)
    w = torch.randn(5, 3, 2, 2, generator=g)
    scale = torch.rand(5, generator=g) * 0.2 + 0.05
    zp = torch.randint(0, 2 ** bits, (5,), generator=g, dtype=torch.int32)
    base = R.adaround_base(w, scale)
    v = torch.randn(w.shape, generator=g) * 2
    grad = torch.randn(w.shape, generator=g)
    vv, sv = v.clone().requires_grad_(), scale.clone().requires_grad_()
    w_hat, reg = A.adaround(base, vv, sv, zp, bits, 0, beta=4.0, backend=backend)
    w_ref, reg_ref = R.adaround_forward(base, v, scale, zp, bits, 0, 4.0)
    if backend == "reference":
        assert torch.equal(w_hat.detach(), w_ref) and torch.equal(reg.detach(), reg_ref)
    else:
        torch.testing.assert_close(w_hat.detach(), w_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(reg.detach(), reg_ref, rtol=1e-5, atol=1e-5)
    lam = 0.37
    loss = {"both": (w_hat * grad).sum() + lam * reg, "w_only": (w_hat * grad).sum(), "reg_only": lam * reg}[use]
    loss.backward()
    g_w = grad if use != "reg_only" else torch.zeros_like(grad)
    gv, gs = R.adaround_backward(g_w, base, v, scale, zp, bits, 0, 4.0, lam if use != "w_only" else 0.0)
    torch.testing.assert_close(vv.grad, gv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sv.grad, gs, rtol=1e-5, atol=1e-5)


def test_hard_adaround_has_no_gradient():
    w = torch.randn(3, 4)
    s = torch.full((3,), 0.1)
    v = torch.randn(3, 4, requires_grad=True)
    w_hat, reg = A.adaround(R.adaround_base(w, s), v, s, torch.zeros(3, dtype=torch.int32), 4, hard=True)
    assert reg.item() == 0.0
    with pytest.raises(RuntimeError, match="hard AdaRound rounding has no gradient"):
        w_hat.sum().backward()


def test_fake_quant_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom op."""
    x = torch.randn(4, 8, requires_grad=True)
    for args in [(x, torch.tensor([0.1], requires_grad=True), torch.tensor([3]), 4, None, 1.0, 0.0, 0, None),
                 (x, torch.rand(4, requires_grad=True) + 0.05, torch.full((4,), 2.0, requires_grad=True), 2, 0, 0.5,
                  0.5, 7, None)]:
        result = torch.library.opcheck(torch.ops.dfqkern.fake_quant.default, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_adaround_opcheck():
    """Regression: the backward once called float(grad_reg), a data-dependent guard under AOT tracing."""
    w = torch.randn(5, 8)
    s = (torch.rand(5) + 0.1).requires_grad_()
    args = (R.adaround_base(w, s.detach()), torch.randn(5, 8, requires_grad=True), s,
            torch.zeros(5, dtype=torch.int32), 4, 0, 2.0, False, None)
    result = torch.library.opcheck(torch.ops.dfqkern.adaround.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ----------------------------------------------------------------------------- torch.compile

def _quant_linear(lq: LayerQuant, cfg: QuantConfig, calibrate: bool) -> QuantLinear:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(8, 5), lq, cfg)
    if calibrate and q.a_quant is not None and not q.a_quant.per_token:
        q.a_quant.set_mode("observe")
        q(torch.randn(32, 8))
        q.a_quant.finalize()
    return q


def _compile_and_compare(module, backend):
    torch._dynamo.reset()
    x = torch.randn(4, 8, generator=_gen(5))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = module(x1)
    y_eager.square().sum().backward()
    g_eager = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    compiled = torch.compile(module, backend=backend, fullgraph=True)  # fullgraph: any graph break is an error
    y = compiled(x2)
    y.square().sum().backward()
    assert torch.equal(y, y_eager)
    assert torch.equal(x2.grad, x1.grad)
    for n, p in module.named_parameters():
        if n in g_eager:
            assert torch.equal(p.grad, g_eager[n]), n


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_weight_only_quant_linear(backend):
    _compile_and_compare(_quant_linear(LayerQuant(4, None), QuantConfig(), False), backend)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_per_token_quant_linear(backend):
    _compile_and_compare(_quant_linear(LayerQuant(4, 8), QuantConfig(act_granularity="per_token"), False), backend)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_learned_scales(backend):
    """LSQ path: scale parameters that require grad, traced through the custom backward op."""
    q = _quant_linear(LayerQuant(4, 8), QuantConfig(act_granularity="per_token"), False)
    q.w_quant.scale.requires_grad_(True)
    _compile_and_compare(q, backend)
    assert q.w_quant.scale.grad is not None and q.w_quant.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_static_activation_quant_linear(backend):
    """Regression: `if not bool(self.calibrated)` in ActQuantizer.forward was a graph break."""
    _compile_and_compare(_quant_linear(LayerQuant(4, 8), QuantConfig(), True), backend)


def test_explain_small_quantized_model_has_no_graph_break():
    """A fake-quant conv -> relu -> linear model traces as one graph (torch._dynamo.explain)."""
    from dfqkern.quantize import calibrate_activations, quantize_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    q = quantize_model(model, QuantConfig(grid=5))
    calibrate_activations(q, torch.randn(8, 3, 5, 5), progress=False)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(q)(torch.randn(2, 3, 5, 5))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_compile_adaround_backward_aot():
    torch._dynamo.reset()
    w = torch.randn(5, 8)
    s = torch.rand(5) + 0.1
    base = R.adaround_base(w, s)
    v = torch.randn(5, 8, requires_grad=True)

    def loss_fn(v):
        w_hat, reg = A.adaround(base, v, s, torch.zeros(5, dtype=torch.int32), 4)
        return w_hat.square().sum() + 0.01 * reg

    torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(v).backward()
    g_compiled = v.grad.clone()
    v.grad = None
    loss_fn(v).backward()
    assert torch.equal(g_compiled, v.grad)
