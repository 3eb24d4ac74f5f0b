"""GPU latency of the packed kernels (CUDA extension and Triton) against the ops they replace.

Run on a CUDA machine (``scripts/gpu_check.sh`` does, once per backend in its own process, so a
kernel that breaks the CUDA context cannot take the other backend's rows with it)::

    DFQKERN_BENCH_BACKENDS=cuda DFQKERN_BENCH_DIR=runs/gpu python3 -m pytest bench/test_bench_gpu_kernels.py -q
    python3 bench/gpu_tables.py runs/gpu/gpu_records.jsonl runs/gpu

``DFQKERN_BENCH_BACKENDS``: comma-separated subset of ``cuda,triton`` (default both). Every row is
timed by :func:`gpu_timing.time_ms` (one method for all) and recorded as it is measured; the
baselines are measured in the same process. The sections run cheapest first (the Linear sweep,
with Triton's autotuning, last), so a run cut short by its time limit loses the fewest rows. After
a sanity check against the torch reference:

* packed Linear W4A8 / W2A8 / W4A4 / W2A4 (CUDA A4 on both instructions: int4 mma and int8 mma
  after unpacking) vs fp16 and bf16 ``F.linear`` (cuBLAS) on ViT-B shapes and K=N=4096, M in
  1, 16, 64, 197, 1024; A4 rows also vs the A8 row of the same backend and weight width;
* implicit-GEMM Conv2d W4A8 vs fp16 ``F.conv2d`` (cuDNN, channels-last, benchmark mode) on
  ResNet-50's 3x3 convs at batch 1 and 8;
* exact int32 attention matmul (``matmul_int``: q.k^T and attn.v of uint8 codes, zero point per row of
  q / per column of k^T) vs fp16 ``torch.matmul`` of the same shape, ViT-B/16 at batch 1 and 8
  (section ``attention``);
* fused fake-quant forward vs ``torch.fake_quantize_per_channel_affine``; forward + LSQ backward vs
  ``torch._fake_quantize_learnable_per_channel_affine`` + autograd; fused AdaRound forward +
  backward vs the same step in eager autograd.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import gpu_tables as T
from gpu_timing import Recorder, env_record, measure_peaks

from dfqkern.formats import PackedWeight, QuantScheme, packed_width, symmetric_zero_point
from dfqkern.kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: GPU benchmarks only"),
]

CUDA = "cuda"
BACKENDS = tuple(b.strip() for b in os.environ.get("DFQKERN_BENCH_BACKENDS", "cuda,triton").split(",") if b.strip())
if set(BACKENDS) - {"cuda", "triton"}:
    raise ValueError(f"DFQKERN_BENCH_BACKENDS must list cuda and/or triton, got {BACKENDS}")
RUN = "kernels:" + "+".join(BACKENDS)


@pytest.fixture(scope="module")
def rec() -> Recorder:
    torch.backends.cudnn.benchmark = True
    r = Recorder(RUN)
    r(**env_record())
    for name, value in measure_peaks().items():
        r(kind="peak", name=name, value=value)
    return r


@pytest.fixture(scope="module")
def kernels():
    """``kernels(name)``: the backend module, or a skip saying why it cannot run here."""
    def get(name: str):
        if name == "cuda":
            from dfqkern.kernels import cuda as CB

            if not CB.is_available():
                pytest.skip("dfqkern._C has no CUDA kernels (build with nvcc and a CUDA torch: scripts/gpu_check.sh)")
            return CB
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            pytest.skip("TRITON_INTERPRET=1: benchmarks need compiled Triton kernels")
        try:
            import dfqkern.kernels.triton as TB
        except ImportError as e:
            pytest.skip(f"triton is not importable: {e}")
        if not TB.is_available() or TB.INTERPRET:
            pytest.skip("the Triton backend is not available on CUDA here")
        return TB

    return get


def random_packed_weight(n: int, k: int, bits: int, shape=None) -> PackedWeight:
    codes = torch.randint(0, 2 ** bits, (n, k), device=CUDA)
    zp = torch.full((n,), symmetric_zero_point(bits), device=CUDA)
    return PackedWeight.from_codes(codes, torch.rand(n, device=CUDA) * 0.01 + 0.001, zp, bits, shape=shape)


def static_act(x: torch.Tensor, bits: int) -> R.ActQuant:
    s, z = R.qparams_from_range(x.float().min().cpu(), x.float().max().cpu(), bits, False)
    return R.ActQuant(bits, s.reshape(1).to(CUDA), z.reshape(1).to(CUDA))


def _close(fn, want_fn, **tol):
    return lambda: torch.testing.assert_close(fn(), want_fn(), **tol)


# ----------------------------------------------------------------------------- fake-quant / AdaRound

FQ = {  # name: (shape, channel axis)
    "ViT-B fc1 weight [3072, 768]": ((3072, 768), 0), "R50 conv weight [256, 256, 3, 3]": ((256, 256, 3, 3), 0),
    "ViT-B act batch 8 [1576, 768]": ((197 * 8, 768), 1), "R50 act batch 64 [64, 64, 56, 56]": ((64, 64, 56, 56), 1),
}
FQ_TORCH_FWD = "torch.fake_quantize_per_channel_affine"
FQ_TORCH_LSQ = "torch._fake_quantize_learnable_per_channel_affine + autograd"
ADA_EAGER = "eager torch autograd"


def _fq_inputs(name):
    shape, axis = FQ[name]
    c = shape[axis]
    return (torch.randn(shape, device=CUDA), torch.randn(shape, device=CUDA), torch.rand(c, device=CUDA) * 0.05 + 0.01,
            torch.randint(0, 256, (c,), device=CUDA, dtype=torch.int32), axis)


@pytest.mark.parametrize("name", list(FQ))
def test_fake_quant_baselines(rec, name):
    x, g, scale, zp, axis = _fq_inputs(name)
    rec.measure(lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, axis, 0, 255), section="fake-quant fwd",
                case=name, impl=FQ_TORCH_FWD, role="baseline")
    xl, sl, zl = x.clone().requires_grad_(True), scale.clone().requires_grad_(True), zp.float().requires_grad_(True)

    def lsq():
        out = torch._fake_quantize_learnable_per_channel_affine(xl, sl, zl, axis, 0, 255, 1.0)
        return torch.autograd.grad(out, (xl, sl, zl), g)

    rec.measure(lsq, section="fake-quant fwd+bwd", case=name, impl=FQ_TORCH_LSQ, role="baseline")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FQ))
def test_fake_quant(rec, kernels, name, backend):
    mod = kernels(backend)
    x, g, scale, zp, axis = _fq_inputs(name)
    impl = f"{backend} fused"
    fwd = lambda: mod.fake_quant_forward(x, scale, zp, 8, axis)  # noqa: E731
    rec.measure(fwd, section="fake-quant fwd", case=name, impl=impl, vs=[FQ_TORCH_FWD], backend=backend,
                check=_close(fwd, lambda: R.fake_quant_forward(x, scale, zp, 8, axis), rtol=0, atol=0))


def _fake_quant_step(mod, name):
    x, g, scale, zp, axis = _fq_inputs(name)
    zf = zp.float()
    return (lambda: mod.fake_quant_forward(x, scale, zf, 8, axis),
            lambda: mod.fake_quant_backward(g, x, scale, zf, 8, axis),
            lambda: R.fake_quant_backward(g, x, scale, zf, 8, axis))


ADA = {"ViT-B fc1 weight [3072, 768]": (3072, 768), "ViT-B fc2 weight [768, 3072]": (768, 3072),
       "R50 conv weight [256, 256, 3, 3]": (256, 256, 3, 3)}
ADA_BITS, ADA_BETA, ADA_LAMBDA = 4, 10.0, 0.01


def _ada_inputs(name):
    shape = ADA[name]
    w = torch.randn(shape, device=CUDA) * 0.05
    scale = torch.rand(shape[0], device=CUDA) * 0.01 + 0.002
    zp = torch.full((shape[0],), symmetric_zero_point(ADA_BITS), device=CUDA, dtype=torch.int32)
    return R.adaround_base(w, scale), R.adaround_init_v(w, scale), scale, zp, torch.randn(shape, device=CUDA)


@pytest.mark.parametrize("name", list(ADA))
def test_adaround_baseline(rec, name):
    base, v, scale, zp, g = _ada_inputs(name)
    vl, sl = v.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    shape = (-1,) + (1,) * (v.dim() - 1)

    def eager():  # what a user writes without the fused kernels: autograd through the rectified sigmoid
        h = R.rectified_sigmoid(vl)
        s, z = sl.reshape(shape), zp.reshape(shape).float()
        w_hat = s * (torch.clamp(base + h + z, 0, 2 ** ADA_BITS - 1) - z)
        reg = (1 - (2 * h - 1).abs().pow(ADA_BETA)).sum()
        return torch.autograd.grad((w_hat * g).sum() + ADA_LAMBDA * reg, (vl, sl))

    rec.measure(eager, section="adaround fwd+bwd", case=name, impl=ADA_EAGER, role="baseline")


def _adaround_step(mod, name):
    base, v, scale, zp, g = _ada_inputs(name)
    return (lambda: mod.adaround_forward(base, v, scale, zp, ADA_BITS, 0, ADA_BETA, False),
            lambda: mod.adaround_backward(g, base, v, scale, zp, ADA_BITS, 0, ADA_BETA, ADA_LAMBDA),
            lambda: R.adaround_backward(g, base, v, scale, zp, ADA_BITS, 0, ADA_BETA, ADA_LAMBDA))


# One training step of a fused op: (inputs -> forward, backward, reference backward), cases, section, the eager
# baseline it is compared with, and the tolerance of its first gradient (fake-quant's grad_x is exact).
STEPS = [pytest.param(make, name, section, baseline, tol, id=f"{section.split()[0]}-{name}")
         for make, cases, section, baseline, tol in (
             (_fake_quant_step, FQ, "fake-quant fwd+bwd", FQ_TORCH_LSQ, dict(rtol=0, atol=0)),
             (_adaround_step, ADA, "adaround fwd+bwd", ADA_EAGER, dict(rtol=1e-4, atol=1e-6)))
         for name in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,name,section,baseline,tol", STEPS)
def test_fused_step(rec, kernels, make, name, section, baseline, tol, backend):
    forward, backward, reference_backward = make(kernels(backend), name)

    def step():
        forward()
        return backward()

    rec.measure(step, section=section, case=name, impl=f"{backend} fused", vs=[baseline], backend=backend,
                check=_close(lambda: step()[0], lambda: reference_backward()[0], **tol))


# ----------------------------------------------------------------------------- attention matmul

MATMULS = {  # ViT-B/16: 12 heads, 197 tokens, head dim 64; (batch dims, M, K, N, b is a transposed view as k^T)
    "ViT-B q.k^T [12, 197, 64] x [12, 64, 197]": ((12,), 197, 64, 197, True),
    "ViT-B attn.v [12, 197, 197] x [12, 197, 64]": ((12,), 197, 197, 64, False),
}
MATMUL_BATCHES = (1, 8)
MATMUL_FP16 = "fp16 torch.matmul"


def matmul_case(name: str, batch: int) -> str:
    return f"{name}, batch {batch}"


def _matmul_inputs(name, batch):
    heads, m, k, n, b_transposed = MATMULS[name]
    a = torch.randint(0, 256, (batch, *heads, m, k), device=CUDA, dtype=torch.uint8)
    if b_transposed:
        b = torch.randint(0, 256, (batch, *heads, n, k), device=CUDA, dtype=torch.uint8).transpose(-2, -1)
    else:
        b = torch.randint(0, 256, (batch, *heads, k, n), device=CUDA, dtype=torch.uint8)
    za = torch.randint(0, 256, (batch, *heads, m, 1), device=CUDA, dtype=torch.int32)  # per token
    zb = torch.randint(0, 256, (batch, *heads, 1, n), device=CUDA, dtype=torch.int32)
    return a, za, b, zb


@pytest.mark.parametrize("batch", MATMUL_BATCHES)
@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul_int_baseline(rec, name, batch):
    a, _, b, _ = _matmul_inputs(name, batch)
    a16, b16 = a.half(), b.half()  # b16 keeps b's strides (k^T stays a transposed view)
    rec.measure(lambda: torch.matmul(a16, b16), section="attention", case=matmul_case(name, batch), impl=MATMUL_FP16,
                role="baseline", batch=batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", MATMUL_BATCHES)
@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul_int(rec, kernels, name, batch, backend):
    mod = kernels(backend)
    a, za, b, zb = _matmul_inputs(name, batch)
    fn = lambda: mod.matmul_int(a, za, b, zb)  # noqa: E731
    rec.measure(fn, section="attention", case=matmul_case(name, batch), impl=f"{backend} int32 exact",
                check=_close(fn, lambda: R.matmul_int(a, za, b, zb), rtol=0, atol=0), vs=[MATMUL_FP16], batch=batch,
                backend=backend)


# ----------------------------------------------------------------------------- implicit-GEMM conv

CONVS = {  # ResNet-50's 3x3 convs: (C = O, H, stride)
    "R50 3x3 64ch @56": (64, 56, 1), "R50 3x3 128ch @56 s2": (128, 56, 2), "R50 3x3 128ch @28": (128, 28, 1),
    "R50 3x3 256ch @14": (256, 14, 1), "R50 3x3 512ch @7": (512, 7, 1),
}
BATCHES = (1, 8)


def conv_case(name: str, batch: int) -> str:
    return f"{name}, batch {batch}"


def _conv_input(name, batch):
    c, h, _ = CONVS[name]
    return torch.randn(batch, c, h, h, device=CUDA, dtype=torch.float16).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_baseline(rec, name, batch):
    c, _, s = CONVS[name]
    x = _conv_input(name, batch)
    w = (torch.randn(c, c, 3, 3, device=CUDA, dtype=torch.float16) * 0.02).to(memory_format=torch.channels_last)
    b = torch.randn(c, device=CUDA, dtype=torch.float16)
    rec.measure(lambda: F.conv2d(x, w, b, s, 1), section="conv", case=conv_case(name, batch), impl=T.CUDNN_FP16,
                role="baseline", batch=batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(CONVS))
def test_conv(rec, kernels, name, batch, backend):
    mod = kernels(backend)
    c, _, s = CONVS[name]
    x = _conv_input(name, batch)
    b = torch.randn(c, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(c, 9 * c, 4, shape=(c, c, 3, 3))
    act = static_act(x, 8)
    fn = lambda: mod.conv2d(x, pw, b, act, s, 1, 1, 1, torch.float16)  # noqa: E731
    rec.measure(fn, section="conv", case=conv_case(name, batch), impl=T.impl_label(backend, "w4a8"),
                check=_close(fn, lambda: R.conv2d(x, pw, b, act, s, 1, 1, 1, torch.float16), rtol=2 ** -9, atol=1e-3),
                vs=[T.CUDNN_FP16], batch=batch, scheme="w4a8", backend=backend)


# ----------------------------------------------------------------------------- packed Linear

LINEAR_SHAPES = {"ViT-B fc1 768->3072": (768, 3072), "ViT-B fc2 3072->768": (3072, 768),
                 "ViT-B qkv 768->2304": (768, 2304), "4096->4096": (4096, 4096)}  # (K, N)
TOKENS = (1, 16, 64, 197, 1024)


def _linear_variants():
    out = []
    for b in BACKENDS:
        for scheme in ("w4a8", "w2a8", "w4a4", "w2a4"):
            paths = ("int4", "int8") if b == "cuda" and scheme.endswith("a4") else (None,)
            out += [pytest.param(b, scheme, p, id=T.impl_label(b, scheme, p).replace(" ", "-")) for p in paths]
    return out


def linear_case(shape: str, m: int) -> str:
    return f"{shape}, M={m}"


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
def test_linear_baselines(rec, shape, m):
    k, n = LINEAR_SHAPES[shape]
    for dtype, label in ((torch.float16, T.FP16_CUBLAS), (torch.bfloat16, T.BF16_CUBLAS)):
        x = torch.randn(m, k, device=CUDA, dtype=dtype)
        w = torch.randn(n, k, device=CUDA, dtype=dtype) * 0.02
        b = torch.randn(n, device=CUDA, dtype=dtype)
        rec.measure(lambda: F.linear(x, w, b), section="linear", case=linear_case(shape, m), impl=label,  # noqa: B023
                    role="baseline", m=m)


@pytest.mark.parametrize("backend,scheme,path", _linear_variants())
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
def test_linear(rec, kernels, monkeypatch, shape, m, backend, scheme, path):
    mod = kernels(backend)
    if path is not None:
        monkeypatch.setenv(mod.A4_PATH_ENV, path)  # the CUDA backend reads it per call
    q = QuantScheme.parse(scheme)
    k, n = LINEAR_SHAPES[shape]
    x = torch.randn(m, k, device=CUDA, dtype=torch.float16)
    b16 = torch.randn(n, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(n, k, q.wbits)
    act = static_act(x, q.abits)
    fn = lambda: mod.linear(x, pw, b16, act, torch.float16)  # noqa: E731
    vs = [T.FP16_CUBLAS, T.BF16_CUBLAS] + ([T.impl_label(backend, f"w{q.wbits}a8")] if q.abits == 4 else [])
    # the fewest bytes: fp16 x in, packed weight + fp32 scale + int32 zero point + fp16 bias, fp16 y out
    nbytes = 2 * m * k + n * packed_width(k, q.wbits) + 10 * n + 2 * m * n
    rec.measure(fn, section="linear", case=linear_case(shape, m), impl=T.impl_label(backend, scheme, path),
                check=_close(fn, lambda: R.linear(x, pw, b16, act, torch.float16), rtol=2 ** -9, atol=1e-3),
                vs=vs, m=m, scheme=scheme, backend=backend, path=path, bytes=nbytes)
