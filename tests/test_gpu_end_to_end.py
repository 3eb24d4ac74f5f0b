"""GPU, end to end: packed models under ``torch.compile(fullgraph=True)`` (inductor) and the
differentiable fake-quant / AdaRound ops (forward and backward, eager and compiled) on CUDA tensors,
for each GPU backend (``cuda``: the compiled extension; ``triton``: compiled Triton kernels) against
the torch reference on the same tensors. Skipped with a reason where no CUDA device is present
(``scripts/gpu_check.sh`` runs them on a GPU machine); the per-kernel tests are in tests/kernels/.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch import nn

from dfqkern import autograd as A
from dfqkern.config import LayerQuant, QuantConfig
from dfqkern.kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU end-to-end tests)"),
]

CUDA = "cuda"
GPU_BACKENDS = ("cuda", "triton")


@pytest.fixture(params=GPU_BACKENDS)
def backend(request, monkeypatch):
    """A GPU backend that is available here, first in dispatch's order (``DFQKERN_BACKEND``, read per call)."""
    name = request.param
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: these tests need compiled Triton kernels")
    from dfqkern.kernels import available_backends

    if name not in available_backends():
        pytest.skip(f"the {name} backend is not available here (available: {available_backends()})")
    monkeypatch.setenv("DFQKERN_BACKEND", name)
    return name


def _sum_tol(terms: torch.Tensor) -> float:
    """Tolerance of a float32 sum of ``terms`` taken in another order."""
    return 1e-6 * float(terms.abs().sum()) + 1e-12


# ----------------------------------------------------------------------------- packed models, compiled

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 32, 1))
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.block(x)[:, :, ::2, ::2] + self.down(x))
        return self.head(y.mean((2, 3)))


class TinyTokenMixer(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 + residual, on [batch, tokens, features] (a ViT MLP block)."""

    def __init__(self, d=64):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


MODELS = {"cnn": (TinyCNN, (4, 3, 16, 16)), "tokens": (TinyTokenMixer, (3, 17, 64))}


def packed_fp16(kind: str, act_granularity: str = "per_tensor"):
    """A W4A8 model (every layer, so the backend under test serves them all), packed, fp16 on the GPU."""
    from dfqkern.quantize import calibrate_activations, pack_model, quantize_model

    torch.manual_seed(0)
    cls, shape = MODELS[kind]
    model = cls().eval().to(CUDA)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax",
                                          first_last_bits=None, act_granularity=act_granularity))
    calibrate_activations(q, torch.randn(16, *shape[1:], device=CUDA), progress=False)
    pack_model(q)
    return q.half(), torch.randn(shape, device=CUDA, dtype=torch.float16)


@pytest.mark.parametrize("kind,granularity", [("cnn", "per_tensor"), ("tokens", "per_tensor"), ("tokens", "per_token")])
def test_packed_model_compiles_fullgraph(backend, kind, granularity):
    q, x = packed_fp16(kind, granularity)
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True)(x)  # inductor; fullgraph: any graph break is an error
    assert compiled.dtype == torch.float16 and torch.isfinite(compiled).all()
    # the packed layers are opaque custom ops, so only inductor's fused fp16 glue (LayerNorm, GELU,
    # means, adds) may round differently from eager, and move a re-quantized activation by one code
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2 * float(eager.abs().max()))


def test_packed_model_on_gpu_matches_reference_backend(backend, monkeypatch):
    q, x = packed_fp16("cnn")
    with torch.inference_mode():
        got = q(x)
        monkeypatch.setenv("DFQKERN_BACKEND", "reference")
        want = q(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


# ----------------------------------------------------------------------------- fake-quant / AdaRound autograd

@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_fake_quant_autograd_on_gpu(backend, axis, dtype, drop_prob):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(48, 65, generator=g) * 2).to(CUDA, dtype)
    grad = torch.randn(48, 65, generator=g).to(CUDA, dtype)
    n = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(n, generator=g) * 0.1 + 0.02).to(CUDA)
    zp = torch.randint(0, 16, (n,), generator=g).float().to(CUDA)
    results = {}
    for b in (backend, "reference"):
        xv, sv, zv = (t.clone().requires_grad_() for t in (x, scale, zp))
        out = A.fake_quant(xv, sv, zv, 4, axis, grad_scale=0.5, drop_prob=drop_prob, seed=3, backend=b)
        out.backward(grad)
        results[b] = (out.detach(), xv.grad, sv.grad, zv.grad)
    (out, gx, gs, gz), (rout, rgx, rgs, rgz) = results[backend], results["reference"]
    assert torch.equal(out, rout) and torch.equal(gx, rgx)  # elementwise: exact on every backend
    tol = _sum_tol(grad.float() * 16)
    torch.testing.assert_close(gs, rgs, rtol=0, atol=tol)
    torch.testing.assert_close(gz, rgz, rtol=0, atol=tol)


@pytest.mark.parametrize("axis", [0, 1])
def test_adaround_autograd_on_gpu(backend, axis):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(24, 40, generator=g) * 0.05).to(CUDA)
    n = w.shape[axis]
    scale = (torch.rand(n, generator=g) * 0.01 + 0.002).to(CUDA)
    zp = torch.full((n,), 8, dtype=torch.int32, device=CUDA)
    base = R.adaround_base(w, scale, axis)
    v0 = R.adaround_init_v(w, scale, axis)
    gw = torch.randn(24, 40, generator=g).to(CUDA)
    results = {}
    for b in (backend, "reference"):
        v, s = v0.clone().requires_grad_(), scale.clone().requires_grad_()
        w_hat, reg = A.adaround(base, v, s, zp, 4, axis, beta=8.0, backend=b)
        ((w_hat * gw).sum() + 0.01 * reg).backward()
        results[b] = (w_hat.detach(), reg.detach(), v.grad, s.grad)
    (w_hat, reg, gv, gs), (rw, rreg, rgv, rgs) = results[backend], results["reference"]
    torch.testing.assert_close(w_hat, rw, rtol=1e-5, atol=1e-7)  # fast-math expf in the kernels
    torch.testing.assert_close(reg, rreg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gv, rgv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gs, rgs, rtol=1e-3, atol=_sum_tol(gw * 16))


def test_compiled_calibration_step_on_gpu(backend):
    """A fake-quant QuantLinear (LSQ weight scale) and an AdaRound loss, fwd + bwd under inductor with
    fullgraph=True, give the eager gradients."""
    from dfqkern.nn import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 32).to(CUDA), LayerQuant(4, 8), QuantConfig(act_granularity="per_token"))
    q.w_quant.scale.requires_grad_(True)
    x = torch.randn(16, 64, device=CUDA)

    def grads(fn):
        q.zero_grad()
        fn(x).square().sum().backward()
        return q.w_quant.scale.grad.clone(), q.bias.grad.clone()

    torch._dynamo.reset()
    eager = grads(q)
    compiled = grads(torch.compile(q, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)

    w = torch.randn(32, 64, device=CUDA) * 0.05
    s = torch.rand(32, device=CUDA) * 0.01 + 0.002
    base, zp = R.adaround_base(w, s), torch.full((32,), 8, dtype=torch.int32, device=CUDA)

    def loss(v):
        w_hat, reg = A.adaround(base, v, s, zp, 4, beta=4.0)
        return (w_hat @ x.t()).square().sum() + 0.01 * reg

    v = R.adaround_init_v(w, s).requires_grad_()
    loss(v).backward()
    g_eager, v.grad = v.grad.clone(), None
    torch.compile(loss, fullgraph=True)(v).backward()
    torch.testing.assert_close(v.grad, g_eager, rtol=1e-4, atol=1e-4)
