"""GPU latency of the Triton kernels against what a user would otherwise run, in the same process.

Run on a CUDA machine:  ``pytest bench/test_bench_gpu_triton.py -q -s`` (add ``--benchmark-enable``
for pytest-benchmark's wall-clock numbers, which include Python launch overhead). Skipped with a
reason where no CUDA device is present.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed before every repetition,
median). Peaks are measured once per run in the same process: a 1 GiB device copy (bandwidth,
bytes read + written), an 8192^3 fp16 ``torch.matmul`` and an 8192^3 ``torch._int_mm``. For each
kernel: median latency, TFLOP/s (TOP/s for integer kernels), GB/s of the fewest bytes it must move,
percent of its roofline ``max(ops / peak_ops, bytes / peak_bw) / time`` and the speed-up over the
baseline. The table is printed at the end and written to ``$DFQKERN_BENCH_DIR`` (default ``runs/``)
as ``bench_gpu_triton.md``.

Baselines: fp16 ``F.linear`` (cuBLAS, with bias) and ``torch._int_mm`` for the packed GEMM; fp16
``F.conv2d`` (cuDNN, channels-last, benchmark mode) for the conv; ``torch.fake_quantize_per_channel_affine``
(forward) and ``torch._fake_quantize_learnable_per_channel_affine`` (backward via autograd) for
fake-quant; an eager autograd AdaRound step for AdaRound.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfqkern.formats import PackedWeight, QuantScheme, packed_width, symmetric_zero_point
from dfqkern.kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: the Triton kernels are benchmarked on GPU only"),
]

CUDA = "cuda"
ROWS: list[dict] = []


# ----------------------------------------------------------------------------- measurement helpers

def bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events, warm-up, L2 flush between repetitions)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


@pytest.fixture(scope="module")
def backend():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: benchmarks need compiled kernels")
    import dfqkern.kernels.triton as tb

    assert tb.is_available() and not tb.INTERPRET
    return tb


@pytest.fixture(scope="module")
def peaks() -> dict:
    """Peak rates measured in this run: bytes/s, fp16 FLOP/s, int8 OP/s."""
    torch.backends.cudnn.benchmark = True
    n = 1 << 29  # 1 GiB of fp16
    src = torch.randn(n, device=CUDA, dtype=torch.float16)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (bench_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    s = 8192
    a = torch.randn(s, s, device=CUDA, dtype=torch.float16)
    b = torch.randn(s, s, device=CUDA, dtype=torch.float16)
    fp16 = 2 * s ** 3 / (bench_ms(lambda: torch.matmul(a, b)) * 1e-3)
    a8 = torch.randint(-128, 128, (s, s), device=CUDA, dtype=torch.int8)
    b8 = torch.randint(-128, 128, (s, s), device=CUDA, dtype=torch.int8).t()  # column-major: the fast int8 layout
    int8 = 2 * s ** 3 / (bench_ms(lambda: torch._int_mm(a8, b8)) * 1e-3)
    return {"bw": bw, "fp16": fp16, "int8": int8}


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if not ROWS:
        return
    head = "| kernel | shape | impl | median µs | TFLOP/s (TOP/s) | GB/s | % roofline | speed-up |"
    lines = [head, "|" + "---|" * 8]
    for r in ROWS:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['tops']:.2f} | "
                     f"{r['gbs']:.0f} | {r['roof']:.0f} | {r['speedup']} |")
    text = "\n".join(lines)
    out_dir = Path(os.environ.get("DFQKERN_BENCH_DIR", "runs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_gpu_triton.md").write_text(text + "\n")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        for line in lines:
            tr.write_line(line)


def record(benchmark, peaks, kernel: str, shape: str, impl: str, ms: float, ops: float, nbytes: float,
           peak_ops: str, baseline_ms: float | None = None) -> dict:
    t = ms * 1e-3
    floor = max(ops / peaks[peak_ops] if ops else 0.0, nbytes / peaks["bw"])
    row = dict(kernel=kernel, shape=shape, impl=impl, us=ms * 1e3, tops=ops / t / 1e12, gbs=nbytes / t / 1e9,
               roof=100 * floor / t, speedup="—" if baseline_ms is None else f"{baseline_ms / ms:.2f}×")
    ROWS.append(row)
    benchmark.extra_info[impl] = {k: row[k] for k in ("us", "tops", "gbs", "roof", "speedup")}
    return row


def wall_clock(benchmark, fn) -> None:
    """pytest-benchmark's own (wall-clock, launch overhead included) numbers for our kernel."""
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


def random_packed_weight(n: int, k: int, bits: int, shape=None) -> PackedWeight:
    codes = torch.randint(0, 2 ** bits, (n, k), device=CUDA)
    zp = torch.full((n,), symmetric_zero_point(bits), device=CUDA)
    scale = torch.rand(n, device=CUDA) * 0.01 + 0.001
    return PackedWeight.from_codes(codes, scale, zp, bits, shape=shape)


def static_act(x: torch.Tensor, bits: int) -> R.ActQuant:
    s, z = R.qparams_from_range(x.float().min().cpu(), x.float().max().cpu(), bits, False)
    return R.ActQuant(bits, s.reshape(1).to(CUDA), z.reshape(1).to(CUDA))


# ----------------------------------------------------------------------------- packed Linear (ViT-B)

VIT_LINEAR = [(768, 3072), (3072, 768), (768, 2304)]  # fc1, fc2, qkv as (K, N)
TOKENS = [1, 16, 64, 197, 197 * 8, 197 * 64]  # decode-like M <= 64, then 197 * B for B in 1, 8, 64


@pytest.mark.parametrize("scheme", ["w4a8", "w2a8", "w4a4", "w2a4", "w8a8"])
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("k,n", VIT_LINEAR, ids=lambda v: str(v))
def test_linear(benchmark, backend, peaks, scheme, m, k, n):
    q = QuantScheme.parse(scheme)
    x = torch.randn(m, k, device=CUDA, dtype=torch.float16)
    w16 = torch.randn(n, k, device=CUDA, dtype=torch.float16) * 0.02
    b16 = torch.randn(n, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(n, k, q.wbits)
    act = static_act(x, q.abits)
    y = backend.linear(x, pw, b16, act, torch.float16)
    ref = R.linear(x, pw, b16, act, torch.float16)
    torch.testing.assert_close(y, ref, rtol=2 ** -9, atol=1e-3)  # sanity on this shape (fp16 output)
    pa = backend.quantize_activation(x, act)

    shape = f"M={m} K={k} N={n}"
    ops = 2 * m * n * k
    t16 = bench_ms(lambda: F.linear(x, w16, b16))
    record(benchmark, peaks, "linear", shape, "fp16 F.linear (cuBLAS)", t16, ops, 2 * (m * k + n * k + m * n), "fp16")
    if m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's shape constraints
        a8 = torch.randint(-128, 128, (m, k), device=CUDA, dtype=torch.int8)
        w8 = torch.randint(-128, 128, (n, k), device=CUDA, dtype=torch.int8)
        record(benchmark, peaks, "linear", shape, "torch._int_mm int8", bench_ms(lambda: torch._int_mm(a8, w8.t())),
               ops, m * k + n * k + 4 * m * n, "int8", t16)
    w_bytes = n * packed_width(k, q.wbits) + 8 * n
    a_bytes = m * packed_width(k, q.abits)
    record(benchmark, peaks, "linear", shape, f"triton {scheme} GEMM only (linear_int)",
           bench_ms(lambda: backend.linear_int(pa, pw)), ops, a_bytes + w_bytes + 4 * m * n, "int8", t16)
    fused = lambda: backend.linear(x, pw, b16, act, torch.float16)  # noqa: E731
    record(benchmark, peaks, "linear", shape, f"triton {scheme} act-quant + GEMM (linear)", bench_ms(fused), ops,
           2 * m * k + 2 * a_bytes + w_bytes + 2 * m * n, "int8", t16)
    wall_clock(benchmark, fused)


@pytest.mark.parametrize("wbits", [4, 2])
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("k,n", VIT_LINEAR, ids=lambda v: str(v))
def test_linear_weight_only(benchmark, backend, peaks, wbits, m, k, n):
    x = torch.randn(m, k, device=CUDA, dtype=torch.float16)
    w16 = torch.randn(n, k, device=CUDA, dtype=torch.float16) * 0.02
    b16 = torch.randn(n, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(n, k, wbits)
    torch.testing.assert_close(backend.linear(x, pw, b16), R.linear(x, pw, b16), rtol=2 ** -9, atol=1e-3)
    shape = f"M={m} K={k} N={n}"
    ops = 2 * m * n * k
    t16 = bench_ms(lambda: F.linear(x, w16, b16))
    record(benchmark, peaks, "linear weight-only", shape, "fp16 F.linear (cuBLAS)", t16, ops,
           2 * (m * k + n * k + m * n), "fp16")
    fn = lambda: backend.linear(x, pw, b16)  # noqa: E731
    record(benchmark, peaks, "linear weight-only", shape, f"triton w{wbits}a16", bench_ms(fn), ops,
           2 * m * k + n * packed_width(k, wbits) + 8 * n + 2 * m * n, "fp16", t16)
    wall_clock(benchmark, fn)


# ----------------------------------------------------------------------------- packed Conv2d (ResNet)

CONVS = {  # name: (C, O, H, k, stride)
    "r18.3x3.64@56": (64, 64, 56, 3, 1),
    "r18.3x3.128s2@56": (64, 128, 56, 3, 2),
    "r18.3x3.256@14": (256, 256, 14, 3, 1),
    "r50.1x1.256-64@56": (256, 64, 56, 1, 1),
    "r50.1x1.1024-256@14": (1024, 256, 14, 1, 1),
}


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d(benchmark, backend, peaks, scheme, batch, name):
    c, o, h, k, s = CONVS[name]
    q = QuantScheme.parse(scheme)
    pad = k // 2
    x = torch.randn(batch, c, h, h, device=CUDA, dtype=torch.float16).to(memory_format=torch.channels_last)
    w16 = (torch.randn(o, c, k, k, device=CUDA, dtype=torch.float16) * 0.02).to(memory_format=torch.channels_last)
    b16 = torch.randn(o, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(o, k * k * c, q.wbits, shape=(o, c, k, k))
    act = static_act(x, q.abits)
    y = backend.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16)
    torch.testing.assert_close(y, R.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16), rtol=2 ** -9, atol=1e-3)
    oh = (h + 2 * pad - k) // s + 1
    ops = 2 * batch * oh * oh * o * c * k * k
    shape = f"B={batch} {name}"
    t16 = bench_ms(lambda: F.conv2d(x, w16, b16, s, pad))
    record(benchmark, peaks, "conv2d", shape, "fp16 F.conv2d (cuDNN, NHWC)", t16, ops,
           2 * (x.numel() + w16.numel() + batch * o * oh * oh), "fp16")
    fused = lambda: backend.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16)  # noqa: E731
    nbytes = 2 * x.numel() + 2 * x.numel() + o * packed_width(k * k * c, q.wbits) + 2 * batch * o * oh * oh
    record(benchmark, peaks, "conv2d", shape, f"triton {scheme} act-quant + implicit GEMM", bench_ms(fused), ops,
           nbytes, "int8", t16)
    wall_clock(benchmark, fused)


# ----------------------------------------------------------------------------- fake-quant

FQ = {  # name: (shape, axis)
    "vit.fc1.weight": ((3072, 768), 0),
    "r18.conv.weight": ((256, 256, 3, 3), 0),
    "vit.act B=8": ((197 * 8, 768), 1),
    "r18.act B=64": ((64, 64, 56, 56), 1),
}


@pytest.mark.parametrize("name", list(FQ))
def test_fake_quant(benchmark, backend, peaks, name):
    shape, axis = FQ[name]
    x = torch.randn(shape, device=CUDA)
    g = torch.randn(shape, device=CUDA)
    c = shape[axis]
    scale = torch.rand(c, device=CUDA) * 0.05 + 0.01
    zp = torch.randint(0, 256, (c,), device=CUDA, dtype=torch.int32)
    nbytes = x.numel() * 4
    torch.testing.assert_close(backend.fake_quant_forward(x, scale, zp, 8, axis),
                               R.fake_quant_forward(x, scale, zp, 8, axis), rtol=0, atol=0)

    t_torch = bench_ms(lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, axis, 0, 255))
    record(benchmark, peaks, "fake_quant fwd", name, "torch.fake_quantize_per_channel_affine", t_torch, 0,
           2 * nbytes, "fp16")
    record(benchmark, peaks, "fake_quant fwd", name, "triton fused",
           bench_ms(lambda: backend.fake_quant_forward(x, scale, zp, 8, axis)), 0, 2 * nbytes, "fp16", t_torch)

    xl = x.clone().requires_grad_(True)
    sl = scale.clone().requires_grad_(True)
    zl = zp.float().requires_grad_(True)
    out = torch._fake_quantize_learnable_per_channel_affine(xl, sl, zl, axis, 0, 255, 1.0)
    t_lsq = bench_ms(lambda: torch.autograd.grad(out, (xl, sl, zl), g, retain_graph=True))
    record(benchmark, peaks, "fake_quant bwd (LSQ)", name, "torch._fake_quantize_learnable_per_channel_affine",
           t_lsq, 0, 3 * nbytes, "fp16")
    zf = zp.float()
    bwd = lambda: backend.fake_quant_backward(g, x, scale, zf, 8, axis)  # noqa: E731
    record(benchmark, peaks, "fake_quant bwd (LSQ)", name, "triton fused", bench_ms(bwd), 0, 3 * nbytes, "fp16",
           t_lsq)
    wall_clock(benchmark, bwd)


# ----------------------------------------------------------------------------- AdaRound

ADA = {"vit.fc1.weight": (3072, 768), "vit.fc2.weight": (768, 3072), "r50.conv.weight": (256, 256, 3, 3)}


def _eager_adaround_step(base, v, scale, zp, g, bits, beta, lam):
    """What a user writes without the fused kernels: autograd through the rectified sigmoid."""
    shape = (-1,) + (1,) * (v.dim() - 1)
    h = R.rectified_sigmoid(v)
    s = scale.reshape(shape)
    z = zp.reshape(shape).float()
    w_hat = s * (torch.clamp(base + h + z, 0, 2 ** bits - 1) - z)
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return torch.autograd.grad((w_hat * g).sum() + lam * reg, (v, scale))


@pytest.mark.parametrize("name", list(ADA))
def test_adaround(benchmark, backend, peaks, name):
    shape = ADA[name]
    bits, beta, lam = 4, 10.0, 0.01
    w = torch.randn(shape, device=CUDA) * 0.05
    scale = torch.rand(shape[0], device=CUDA) * 0.01 + 0.002
    zp = torch.full((shape[0],), 8, device=CUDA, dtype=torch.int32)
    base = R.adaround_base(w, scale)
    v = R.adaround_init_v(w, scale)
    g = torch.randn(shape, device=CUDA)
    nbytes = 7 * w.numel() * 4  # forward: base, v -> w_hat; backward: g, base, v -> grad_v

    vl, sl = v.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    t_eager = bench_ms(lambda: _eager_adaround_step(base, vl, sl, zp, g, bits, beta, lam))
    record(benchmark, peaks, "adaround fwd+bwd", name, "eager torch autograd", t_eager, 0, nbytes, "fp16")

    def fused():
        backend.adaround_forward(base, v, scale, zp, bits, 0, beta, False)
        return backend.adaround_backward(g, base, v, scale, zp, bits, 0, beta, lam)

    gv, gs = fused()
    rv, rs = R.adaround_backward(g, base, v, scale, zp, bits, 0, beta, lam)
    torch.testing.assert_close(gv, rv, rtol=1e-4, atol=1e-6)
    record(benchmark, peaks, "adaround fwd+bwd", name, "triton fused", bench_ms(fused), 0, nbytes, "fp16", t_eager)
    wall_clock(benchmark, fused)
