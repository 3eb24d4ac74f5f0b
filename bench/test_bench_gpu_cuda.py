"""GPU latency of the CUDA-extension kernels against the baselines, in the same process.

Run on a CUDA machine (after building the extension with CUDA):
    pytest bench/test_bench_gpu_cuda.py -q -s            # the table (CUDA-event medians)
    pytest bench/test_bench_gpu_cuda.py -q -s --benchmark-enable   # + pytest-benchmark wall clock
Skipped with a reason where no CUDA device or no CUDA build of dfqkern._C is present.

Timing: CUDA events around each call, 10 warm-up calls, median of 50, a 256 MiB buffer zeroed
before every repetition so the packed weights are read from DRAM (not from L2), like a layer
running after others. Peaks measured once per run: a 1 GiB device copy, 8192^3 fp16 matmul and
``torch._int_mm``. Per row: median µs, TOP/s, GB/s of the bytes the kernel must move, % of
``max(ops / peak, bytes / bandwidth)``, and speed-up over fp16 cuBLAS / cuDNN (or the torch op).

Columns: fp16 ``F.linear`` (cuBLAS), ``torch._int_mm`` (int8, M > 16), the CUDA packed GEMM alone
(``linear_int``) and fused with activation quantization (``linear``), on both A4 instructions
(``int4``: mma.m16n8k64 s4, emulated on sm_90; ``int8``: nibbles unpacked to mma.m16n8k32), and
the Triton backend when it is installed. Convs: fp16 ``F.conv2d`` (cuDNN, channels-last).
Goals (issue 5): W4A8 / W2A8 >= 1.5x fp16 cuBLAS for M <= 64 on ViT-B shapes; A4 int4 path >= 1.3x
the int8 path on sm_80-class GPUs; conv >= 1.5x cuDNN fp16 on ResNet-50 3x3 at batch 1-8.
The table is printed at the end and written to ``$DFQKERN_BENCH_DIR`` (default ``runs/``) as
``bench_gpu_cuda.md``.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfqkern.formats import PackedWeight, QuantScheme, packed_width, symmetric_zero_point
from dfqkern.kernels import cuda as CB
from dfqkern.kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CB.is_available(),
                       reason="needs a CUDA device and dfqkern._C built with CUDA (CUDA_HOME set at build time)"),
]

CUDA = "cuda"
ROWS: list[dict] = []


# ----------------------------------------------------------------------------- measurement

def event_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn`` by CUDA events, L2 flushed before every repetition."""
    for _ in range(warmup):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device=CUDA)
    events = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


@pytest.fixture(scope="module")
def peaks() -> dict:
    torch.backends.cudnn.benchmark = True
    src = torch.randn(1 << 29, device=CUDA, dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (event_ms(lambda: dst.copy_(src), 3, 10) * 1e-3)
    del src, dst
    s = 8192
    a = torch.randn(s, s, device=CUDA, dtype=torch.float16)
    fp16 = 2 * s ** 3 / (event_ms(lambda: torch.matmul(a, a), 3, 10) * 1e-3)
    a8 = torch.randint(-128, 128, (s, s), device=CUDA, dtype=torch.int8)
    b8 = torch.randint(-128, 128, (s, s), device=CUDA, dtype=torch.int8).t()
    int8 = 2 * s ** 3 / (event_ms(lambda: torch._int_mm(a8, b8), 3, 10) * 1e-3)
    return {"bw": bw, "fp16": fp16, "int8": int8}


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if not ROWS:
        return
    dev = torch.cuda.get_device_name()
    lines = [f"device: {dev} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})", "",
             "| kernel | shape | impl | median µs | TOP/s | GB/s | % roofline | speed-up |", "|" + "---|" * 8]
    for r in ROWS:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['tops']:.2f} | "
                     f"{r['gbs']:.0f} | {r['roof']:.0f} | {r['speedup']} |")
    out_dir = Path(os.environ.get("DFQKERN_BENCH_DIR", "runs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_gpu_cuda.md").write_text("\n".join(lines) + "\n")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        for line in lines:
            tr.write_line(line)


def record(benchmark, peaks, kernel, shape, impl, ms, ops, nbytes, peak_ops="int8", baseline_ms=None) -> None:
    t = ms * 1e-3
    floor = max(ops / peaks[peak_ops] if ops else 0.0, nbytes / peaks["bw"])
    row = dict(kernel=kernel, shape=shape, impl=impl, us=ms * 1e3, tops=ops / t / 1e12, gbs=nbytes / t / 1e9,
               roof=100 * floor / t, speedup="—" if baseline_ms is None else f"{baseline_ms / ms:.2f}×")
    ROWS.append(row)
    benchmark.extra_info[impl] = {k: row[k] for k in ("us", "tops", "gbs", "roof", "speedup")}


def wall_clock(benchmark, fn) -> None:
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


def a4_paths(abits: int) -> list[str]:
    return ["int4", "int8"] if abits == 4 else ["-"]


def with_path(path: str, fn):
    """Run ``fn`` with the A4 instruction forced (the backend reads the variable per call)."""
    if path == "-":
        return fn

    def forced():
        prev = os.environ.get(CB.A4_PATH_ENV)
        os.environ[CB.A4_PATH_ENV] = path
        try:
            return fn()
        finally:
            if prev is None:
                os.environ.pop(CB.A4_PATH_ENV, None)
            else:
                os.environ[CB.A4_PATH_ENV] = prev

    return forced


def triton_backend():
    try:
        import dfqkern.kernels.triton as tb
    except ImportError:
        return None
    return tb if tb.is_available() and not getattr(tb, "INTERPRET", False) else None


def random_packed_weight(n, k, bits, shape=None) -> PackedWeight:
    codes = torch.randint(0, 2 ** bits, (n, k), device=CUDA)
    zp = torch.full((n,), symmetric_zero_point(bits), device=CUDA)
    return PackedWeight.from_codes(codes, torch.rand(n, device=CUDA) * 0.01 + 0.001, zp, bits, shape=shape)


def static_act(x, bits) -> R.ActQuant:
    s, z = R.qparams_from_range(x.float().min().cpu(), x.float().max().cpu(), bits, False)
    return R.ActQuant(bits, s.reshape(1).to(CUDA), z.reshape(1).to(CUDA))


# ----------------------------------------------------------------------------- packed Linear (ViT-B)

VIT_LINEAR = [(768, 3072), (3072, 768), (768, 2304)]  # fc1, fc2, qkv as (K, N)
TOKENS = [1, 16, 64, 197, 197 * 8, 197 * 64]  # decode-like M <= 64, then 197 * B for B in 1, 8, 64


@pytest.mark.parametrize("scheme", ["w4a8", "w2a8", "w4a4", "w2a4"])
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("k,n", VIT_LINEAR, ids=lambda v: str(v))
def test_linear(benchmark, peaks, scheme, m, k, n):
    q = QuantScheme.parse(scheme)
    x = torch.randn(m, k, device=CUDA, dtype=torch.float16)
    w16 = torch.randn(n, k, device=CUDA, dtype=torch.float16) * 0.02
    b16 = torch.randn(n, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(n, k, q.wbits)
    act = static_act(x, q.abits)
    pa = CB.quantize_activation(x, act)
    shape, ops = f"M={m} K={k} N={n}", 2 * m * n * k
    w_bytes, a_bytes = n * packed_width(k, q.wbits) + 8 * n, m * packed_width(k, q.abits)

    t16 = event_ms(lambda: F.linear(x, w16, b16))
    record(benchmark, peaks, "linear", shape, "fp16 F.linear (cuBLAS)", t16, ops, 2 * (m * k + n * k + m * n), "fp16")
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        a8 = torch.randint(-128, 128, (m, k), device=CUDA, dtype=torch.int8)
        w8 = torch.randint(-128, 128, (n, k), device=CUDA, dtype=torch.int8)
        record(benchmark, peaks, "linear", shape, "torch._int_mm int8", event_ms(lambda: torch._int_mm(a8, w8.t())),
               ops, m * k + n * k + 4 * m * n, "int8", t16)
    for path in a4_paths(q.abits):
        tag = f"cuda {scheme}" + ("" if path == "-" else f" [{path} mma]")
        gemm = with_path(path, lambda: CB.linear_int(pa, pw))
        assert torch.equal(gemm(), R.linear_int(pa, pw)), f"{tag}: wrong integer result on {shape}"
        record(benchmark, peaks, "linear", shape, f"{tag} GEMM only", event_ms(gemm), ops,
               a_bytes + w_bytes + 4 * m * n, "int8", t16)
        fused = with_path(path, lambda: CB.linear(x, pw, b16, act, torch.float16))
        torch.testing.assert_close(fused(), R.linear(x, pw, b16, act, torch.float16), rtol=2 ** -10, atol=1e-3)
        record(benchmark, peaks, "linear", shape, f"{tag} act-quant + GEMM", event_ms(fused), ops,
               2 * m * k + 2 * a_bytes + w_bytes + 2 * m * n, "int8", t16)
    tb = triton_backend()
    if tb is not None:
        record(benchmark, peaks, "linear", shape, f"triton {scheme} act-quant + GEMM",
               event_ms(lambda: tb.linear(x, pw, b16, act, torch.float16)), ops,
               2 * m * k + 2 * a_bytes + w_bytes + 2 * m * n, "int8", t16)
    wall_clock(benchmark, lambda: CB.linear(x, pw, b16, act, torch.float16))


# ----------------------------------------------------------------------------- packed Conv2d (ResNet-50 3x3)

CONVS = {  # name: (C, O, H, k, stride)  -- ResNet-50's 3x3 convs (conv2 of each stage) and a stride-2 one
    "r50.3x3.64@56": (64, 64, 56, 3, 1),
    "r50.3x3.128s2@56": (128, 128, 56, 3, 2),
    "r50.3x3.128@28": (128, 128, 28, 3, 1),
    "r50.3x3.256@14": (256, 256, 14, 3, 1),
    "r50.3x3.512@7": (512, 512, 7, 3, 1),
}


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4", "w2a4"])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d(benchmark, peaks, scheme, batch, name):
    c, o, h, k, s = CONVS[name]
    q = QuantScheme.parse(scheme)
    pad = k // 2
    x = torch.randn(batch, c, h, h, device=CUDA, dtype=torch.float16).to(memory_format=torch.channels_last)
    w16 = (torch.randn(o, c, k, k, device=CUDA, dtype=torch.float16) * 0.02).to(memory_format=torch.channels_last)
    b16 = torch.randn(o, device=CUDA, dtype=torch.float16)
    pw = random_packed_weight(o, k * k * c, q.wbits, shape=(o, c, k, k))
    act = static_act(x, q.abits)
    oh = (h + 2 * pad - k) // s + 1
    ops, shape = 2 * batch * oh * oh * o * c * k * k, f"B={batch} {name}"
    t16 = event_ms(lambda: F.conv2d(x, w16, b16, s, pad))
    record(benchmark, peaks, "conv2d", shape, "fp16 F.conv2d (cuDNN, NHWC)", t16, ops,
           2 * (x.numel() + w16.numel() + batch * o * oh * oh), "fp16")
    nbytes = 2 * x.numel() + x.numel() * q.abits // 8 + o * packed_width(k * k * c, q.wbits) + 2 * batch * o * oh * oh
    want = R.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16)
    for path in a4_paths(q.abits):
        tag = f"cuda {scheme}" + ("" if path == "-" else f" [{path} mma]")
        fused = with_path(path, lambda: CB.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16))
        torch.testing.assert_close(fused(), want, rtol=2 ** -10, atol=1e-3)
        record(benchmark, peaks, "conv2d", shape, f"{tag} act-quant + implicit GEMM", event_ms(fused), ops, nbytes,
               "int8", t16)
    tb = triton_backend()
    if tb is not None and q.wbits == 4:
        record(benchmark, peaks, "conv2d", shape, f"triton {scheme} act-quant + implicit GEMM",
               event_ms(lambda: tb.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16)), ops, nbytes, "int8", t16)
    wall_clock(benchmark, lambda: CB.conv2d(x, pw, b16, act, s, pad, 1, 1, torch.float16))


@pytest.mark.parametrize("batch", [1, 8])
def test_depthwise_conv2d(benchmark, peaks, batch):
    c, h = 384, 28  # a MobileNet-style depthwise 3x3
    x = torch.randn(batch, c, h, h, device=CUDA, dtype=torch.float16).to(memory_format=torch.channels_last)
    w16 = torch.randn(c, 1, 3, 3, device=CUDA, dtype=torch.float16) * 0.1
    pw = random_packed_weight(c, 9, 4, shape=(c, 1, 3, 3))
    act = static_act(x, 8)
    ops, shape = 2 * batch * h * h * c * 9, f"B={batch} dw3x3.{c}@{h}"
    t16 = event_ms(lambda: F.conv2d(x, w16, None, 1, 1, 1, c))
    record(benchmark, peaks, "depthwise", shape, "fp16 F.conv2d (cuDNN)", t16, ops, 4 * x.numel(), "fp16")
    fn = lambda: CB.conv2d(x, pw, None, act, 1, 1, 1, c, torch.float16)  # noqa: E731
    torch.testing.assert_close(fn(), R.conv2d(x, pw, None, act, 1, 1, 1, c, torch.float16), rtol=2 ** -10, atol=1e-3)
    record(benchmark, peaks, "depthwise", shape, "cuda w4a8 depthwise", event_ms(fn), ops, 4 * x.numel(), "int8", t16)
    wall_clock(benchmark, fn)


# ----------------------------------------------------------------------------- fake-quant / AdaRound

FQ = {"vit.fc1.weight": ((3072, 768), 0), "r50.conv.weight": ((256, 256, 3, 3), 0),
      "vit.act B=8": ((197 * 8, 768), 1), "r50.act B=64": ((64, 64, 56, 56), 1)}


@pytest.mark.parametrize("name", list(FQ))
def test_fake_quant(benchmark, peaks, name):
    shape, axis = FQ[name]
    x, g = torch.randn(shape, device=CUDA), torch.randn(shape, device=CUDA)
    c = shape[axis]
    scale = torch.rand(c, device=CUDA) * 0.05 + 0.01
    zp = torch.randint(0, 256, (c,), device=CUDA, dtype=torch.int32)
    nbytes = x.numel() * 4
    assert torch.equal(CB.fake_quant_forward(x, scale, zp, 8, axis), R.fake_quant_forward(x, scale, zp, 8, axis))
    t_torch = event_ms(lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, axis, 0, 255))
    record(benchmark, peaks, "fake_quant fwd", name, "torch.fake_quantize_per_channel_affine", t_torch, 0,
           2 * nbytes, "fp16")
    record(benchmark, peaks, "fake_quant fwd", name, "cuda fused",
           event_ms(lambda: CB.fake_quant_forward(x, scale, zp, 8, axis)), 0, 2 * nbytes, "fp16", t_torch)
    xl, sl, zl = x.clone().requires_grad_(True), scale.clone().requires_grad_(True), zp.float().requires_grad_(True)
    out = torch._fake_quantize_learnable_per_channel_affine(xl, sl, zl, axis, 0, 255, 1.0)
    t_lsq = event_ms(lambda: torch.autograd.grad(out, (xl, sl, zl), g, retain_graph=True))
    record(benchmark, peaks, "fake_quant bwd (LSQ)", name, "torch._fake_quantize_learnable_per_channel_affine",
           t_lsq, 0, 3 * nbytes, "fp16")
    bwd = lambda: CB.fake_quant_backward(g, x, scale, zp, 8, axis)  # noqa: E731
    record(benchmark, peaks, "fake_quant bwd (LSQ)", name, "cuda fused", event_ms(bwd), 0, 3 * nbytes, "fp16", t_lsq)
    wall_clock(benchmark, bwd)


ADA = {"vit.fc1.weight": (3072, 768), "vit.fc2.weight": (768, 3072), "r50.conv.weight": (256, 256, 3, 3)}


def _eager_adaround_step(base, v, scale, zp, g, bits, beta, lam):
    shape = (-1,) + (1,) * (v.dim() - 1)
    h = R.rectified_sigmoid(v)
    s, z = scale.reshape(shape), zp.reshape(shape).float()
    w_hat = s * (torch.clamp(base + h + z, 0, 2 ** bits - 1) - z)
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return torch.autograd.grad((w_hat * g).sum() + lam * reg, (v, scale))


@pytest.mark.parametrize("name", list(ADA))
def test_adaround(benchmark, peaks, name):
    shape = ADA[name]
    bits, beta, lam = 4, 10.0, 0.01
    w = torch.randn(shape, device=CUDA) * 0.05
    scale = torch.rand(shape[0], device=CUDA) * 0.01 + 0.002
    zp = torch.full((shape[0],), 8, device=CUDA, dtype=torch.int32)
    base, v, g = R.adaround_base(w, scale), R.adaround_init_v(w, scale), torch.randn(shape, device=CUDA)
    nbytes = 7 * w.numel() * 4
    vl, sl = v.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    t_eager = event_ms(lambda: _eager_adaround_step(base, vl, sl, zp, g, bits, beta, lam))
    record(benchmark, peaks, "adaround fwd+bwd", name, "eager torch autograd", t_eager, 0, nbytes, "fp16")

    def fused():
        CB.adaround_forward(base, v, scale, zp, bits, 0, beta, False)
        return CB.adaround_backward(g, base, v, scale, zp, bits, 0, beta, lam)

    gv, _ = fused()
    torch.testing.assert_close(gv, R.adaround_backward(g, base, v, scale, zp, bits, 0, beta, lam)[0],
                               rtol=1e-4, atol=1e-6)
    record(benchmark, peaks, "adaround fwd+bwd", name, "cuda fused", event_ms(fused), 0, nbytes, "fp16", t_eager)
    wall_clock(benchmark, fused)
