"""CPU latency of the dfqkern CPU backend against what a user would otherwise run, in one process.

Run:  ``pytest bench/test_bench_cpu.py --benchmark-enable -q -p no:randomly``
(``--benchmark-disable``, the default from pyproject, runs every case once as a smoke test).
At the end a table of ratios is printed (bench/conftest.py) and written to
``$DFQKERN_BENCH_DIR/bench_cpu.md`` (default ``runs/``).

Every case is a pytest-benchmark group: the baselines and the dfqkern kernels of one group run in
the same session on the same inputs; the ratio column is ``baseline time / dfqkern time`` (> 1 means
dfqkern is faster), from medians and from minima (the machine may be shared: minima are the less
disturbed estimate). Threads: torch's intra-op setting (``torch.set_num_threads``, both sides; ``DFQKERN_BENCH_THREADS=n``
overrides it for the run).

Cases (targets from issue 4, on a 2-core AVX2 machine):
* Linear, M=1, K=N=4096: fp32 ``F.linear``, fbgemm dynamic int8 (``torch.ao.nn.quantized.dynamic.Linear``),
  dfqkern W4A8 / W2A8 (per-token dynamic activations, like fbgemm's dynamic mode) and the memory
  floor ``weight bytes / copy bandwidth`` (a ``copy_`` of a buffer of the packed weight's size, in
  the STREAM convention: bandwidth = bytes read + written per second, so the floor is half the copy
  time). Targets: W4A8 >= 2x fbgemm and <= 1.3x floor; W2A8 >= 3x fbgemm.
* Linear 197x768 -> 3072 (ViT-B MLP, one image): dfqkern W4A8 no slower than fbgemm int8.
* Conv2d 3x3, ResNet-18 shapes, batch 1: dfqkern W4A8 (static per-tensor activations) >= 2x fp32 F.conv2d.
* Fused fake-quant forward + backward, 512x512x3x3 weight, per-channel 4-bit: >= 10x
  ``torch._fake_quantize_learnable_per_channel_affine`` (forward + autograd backward).
* Fused AdaRound forward + backward + regularizer, same weight: >= 10x the eager chain (the reference
  ops under autograd, as a user writes AdaRound in PyTorch).
* Whole models at batch 1 (CIFAR ResNet-20, ResNet-18 224x224, random weights): W4A8 packed
  (``quantize_model`` -> ``calibrate_activations`` -> ``pack_model``), eager and through
  ``dfqkern.compile`` (its default frozen mode, captured before the timing), vs fp32 eager and onnxruntime.
* Peers (optional extras; skipped with the reason when absent): onnxruntime ``MatMulNBits`` (block 128,
  ``accuracy_level`` 4 = int8 compute, W4 and W2) in the Linear groups, torch's
  ``_weight_int4pack_mm_for_cpu`` (bf16 activations, group 128) for W4, and onnxruntime fp32 and
  static int8 QDQ for the whole models: onnxruntime's own flow on the float export (``quant_pre_process``,
  then ``quantize_static``: per-channel int8 weights, uint8 activations, MinMax on the images the packed
  model is calibrated on), checked to run every Conv as a ``QLinearConv`` (bench/ort_int8.py: without the
  pre-processing none did). onnxruntime runs with ``intra_op_num_threads`` = torch's thread count.
* Linear M=1 with a weight larger than the last-level cache (``linear M=1 ... > L3``; only when
  timing, not in the smoke run): dfqkern W4A8 / W2A8 against the DRAM copy floor of the same bytes.

dfqkern rows are measured at every ISA level this CPU supports (``[avx512vnni]``, ``[avx2]``);
the plain ``dfqkern`` row uses the automatic choice. The peers choose their kernels once per process,
from the CPU's best, so the peers that can be capped (fbgemm, oneDNN, MKL, ATen: the fp32 / fbgemm
Linear, torch int4pack, fp32 conv, fp32 eager models, eager fake-quant and AdaRound rows) also run in
one child process with their caps set to each lower dfqkern level (bench/forced_peers.py; rows
``... [avx2]``), and a forced dfqkern row's ratio is taken against the peer at the same ISA
(bench/conftest.py). onnxruntime (MLAS) cannot be capped: its rows are always at its own choice and
forced dfqkern rows are not judged against them.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import forced_peers  # bench/forced_peers.py
import machine  # bench/machine.py (pytest puts bench/ on the path through its conftest)
import ort_int8  # bench/ort_int8.py: onnxruntime's own static int8 flow, the whole-model peer
from dfqkern.formats import PackedWeight
from dfqkern.kernels import dispatch, reference as R
from dfqkern.kernels.reference import ActQuant

C = pytest.importorskip("dfqkern.kernels.cpu")
if not C.is_available():
    pytest.skip("dfqkern._C with CPU ops is not built (pip install --no-build-isolation -e .)",
                allow_module_level=True)


if os.environ.get("DFQKERN_BENCH_THREADS"):  # e.g. 1 on a machine whose other core is busy
    torch.set_num_threads(int(os.environ["DFQKERN_BENCH_THREADS"]))


def _isas() -> list[str]:
    out = []
    for isa in ("avx512vnni", "avx2"):
        try:
            with C.use_isa(isa):
                out.append(isa)
        except ValueError:
            pass
    return out


ISAS = _isas()
IMPL_ISAS = [None] + ISAS  # None: automatic choice
OWN_ISA = machine.best_isa()  # the level the peers pick for themselves
FORCED_HERE = forced_peers.forced_here()  # in the child: the level its peers are capped to
# Forcible peer tests run once in process (None: own choice) and once per level in a child process.
PEER_ISAS = pytest.mark.parametrize(forced_peers.PARAM, [None] + forced_peers.levels_to_force(ISAS, OWN_ISA),
                                    ids=lambda lv: f"forced-{lv}" if lv else "own-isa")


def _ort():
    """onnxruntime, or a skip naming the extra."""
    return pytest.importorskip("onnxruntime", reason="onnxruntime rows need the export extra: "
                                                     "pip install dfqkern[export]")


def _ort_session(model_bytes: bytes):
    """A CPU session with torch's thread count."""
    _ort()
    return ort_int8.session(model_bytes, torch.get_num_threads())


def _label(name: str, isa: str | None) -> str:
    return name if isa is None else f"{name} [{isa}]"


def _in_child(request, peer_isa) -> bool:
    """True when this peer row is measured by the child process forced to ``peer_isa`` (in the parent): its row
    is then taken from there. False when it runs here: at the peers' own ISA, or inside that child."""
    if peer_isa == FORCED_HERE:
        return False
    if FORCED_HERE:
        pytest.skip(f"this child process measures only peers forced to {FORCED_HERE}")
    forced_peers.record_child_row(request, peer_isa, torch.get_num_threads())
    return True


def run(benchmark, group: str, name: str, fn, role: str, isa: str | None = None, **meta):
    """Benchmark ``fn`` as row ``name`` of ``group``; ``role`` is 'baseline', 'dfqkern' or 'floor'.

    ``isa`` forces the CPU kernels' instruction set for the whole measurement (set once, outside
    the timed calls). Each row records the ISA it ran at and whether that was forced: a dfqkern row
    is forced by ``isa`` (or ``DFQKERN_CPU_ISA``), a baseline by running in a forced child."""
    benchmark.group = group
    if role == "dfqkern":
        env_forced = os.environ.get("DFQKERN_CPU_ISA", "auto") not in ("", "auto")
        meta.update(isa=isa or C.isa(), forced=bool(isa) or env_forced)
    elif role == "baseline":
        if FORCED_HERE and forced_peers.unforceable(name):
            pytest.skip(f"{name}: {forced_peers.unforceable(name)}")
        meta.update(isa=FORCED_HERE or OWN_ISA, forced=FORCED_HERE is not None)
        isa, name = None, _label(name, FORCED_HERE)
    benchmark.extra_info.update(row=_label(name, isa), role=role, **meta)
    with torch.no_grad(), (C.use_isa(isa) if isa else _nothing()):
        fn()  # warm-up: prepacked layouts, allocator, thread pool
        benchmark(fn)


@contextlib.contextmanager
def _nothing():
    yield


def rand_pw(n: int, k: int, bits: int, shape=None, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    zp = torch.full((n,), 2 ** (bits - 1), dtype=torch.int32)
    return PackedWeight.from_codes(codes, torch.rand(n, generator=g) * 0.01 + 0.001, zp, bits, shape=shape)


# ----------------------------------------------------------------------------- Linear

LINEAR = {"linear M=1 K=N=4096": (1, 4096, 4096), "linear 197x768->3072": (197, 768, 3072)}


def _fbgemm_linear(k: int, n: int, bias):
    import torch.ao.nn.quantized.dynamic as nnqd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nnqd.Linear(k, n)
        w = torch.randn(n, k) * 0.02
        qw = torch.quantize_per_channel(w, w.abs().amax(1) / 127 + 1e-8, torch.zeros(n, dtype=torch.long), 0,
                                        torch.qint8)
        q.set_weight_bias(qw, bias)
    return q


@PEER_ISAS
@pytest.mark.parametrize("group", list(LINEAR))
@pytest.mark.parametrize("impl", ["fp32 F.linear", "fbgemm int8 dynamic"])
def test_linear_baselines(benchmark, group, impl, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    m, k, n = LINEAR[group]
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.02, torch.randn(n)
    if impl == "fp32 F.linear":
        run(benchmark, group, impl, lambda: F.linear(x, w, b), "baseline", weight_bytes=w.numel() * 4)
    else:
        q = _fbgemm_linear(k, n, b)
        run(benchmark, group, impl, lambda: q(x), "baseline", weight_bytes=n * k, primary=True)


@pytest.mark.parametrize("group", list(LINEAR))
@pytest.mark.parametrize("wbits", [4, 2, 8])
@pytest.mark.parametrize("isa", IMPL_ISAS)
def test_linear_dfqkern(benchmark, group, wbits, isa):
    m, k, n = LINEAR[group]
    pw = rand_pw(n, k, wbits)
    x, b = torch.randn(m, k), torch.randn(n)
    act = ActQuant(8, per_token=True)
    run(benchmark, group, f"dfqkern W{wbits}A8", lambda: dispatch.linear(x, pw, b, act), "dfqkern", isa,
        weight_bytes=pw.nbytes(), wbits=wbits)


def _matmul_nbits_session(m: int, k: int, n: int, bits: int, block: int = 128):
    """onnxruntime's ``MatMulNBits`` (com.microsoft) with random packed weights, no zero points
    (the symmetric default 2**(bits-1)), int8 compute (accuracy_level 4)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    kb = (k + block - 1) // block
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, kb, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * kb, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
                              initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return _ort_session(model.SerializeToString()), b.nbytes + scales.nbytes


@pytest.mark.parametrize("group", list(LINEAR))
@pytest.mark.parametrize("wbits", [4, 2])
def test_linear_onnxruntime_matmulnbits(benchmark, group, wbits):
    _ort()
    pytest.importorskip("onnx", reason="the MatMulNBits row builds its graph with onnx (pip install dfqkern[export])")
    m, k, n = LINEAR[group]
    sess, nbytes = _matmul_nbits_session(m, k, n, wbits)
    a = torch.randn(m, k).numpy()
    run(benchmark, group, f"onnxruntime MatMulNBits W{wbits} block 128 int8", lambda: sess.run(None, {"A": a}),
        "baseline", weight_bytes=nbytes, wbits=wbits)


@PEER_ISAS
@pytest.mark.parametrize("group", list(LINEAR))
def test_linear_torch_int4pack(benchmark, group, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    m, k, n = LINEAR[group]
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None:
        pytest.skip(f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu")
    g = torch.Generator().manual_seed(0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 2)
    scales_zeros = (torch.rand(k // 128, n, 2, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)
    run(benchmark, group, "torch _weight_int4pack_mm_for_cpu W4 bf16 group 128",
        lambda: op(x, packed, 128, scales_zeros), "baseline", weight_bytes=n * k // 2, wbits=4)


def _dram_rows(wbits: int) -> int:
    """Rows of a K=4096 weight whose ``wbits`` packed bytes are at least twice the last-level cache."""
    llc = machine.last_level_cache_bytes() or 32 << 20
    return -(-2 * llc // (4096 * wbits // 8) // 4096) * 4096


@pytest.mark.parametrize("wbits", [4, 2])
@pytest.mark.parametrize("isa", IMPL_ISAS)
def test_linear_beyond_cache(benchmark, wbits, isa):
    """M=1 GEMV on a weight twice the last-level cache, and the DRAM copy floor of the same bytes."""
    if benchmark.disabled:
        pytest.skip("weights larger than L3 are timed only with --benchmark-enable (GiBs of memory)")
    n, k = _dram_rows(wbits), 4096
    group = f"linear M=1 K=4096 N={n} (W{wbits} weight 2x L3)"
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (n, k * wbits // 8), dtype=torch.uint8, generator=g)
    pw = PackedWeight(data, torch.rand(n, generator=g) * 0.01 + 0.001,
                      torch.full((n,), 2 ** (wbits - 1), dtype=torch.int32), wbits, k, (n, k))
    x, act = torch.randn(1, k), ActQuant(8, per_token=True)
    run(benchmark, group, f"dfqkern W{wbits}A8", lambda: dispatch.linear(x, pw, None, act), "dfqkern", isa,
        weight_bytes=pw.nbytes(), wbits=wbits)


@pytest.mark.parametrize("wbits", [4, 2])
def test_linear_beyond_cache_floor(benchmark, wbits):
    if benchmark.disabled:
        pytest.skip("weights larger than L3 are timed only with --benchmark-enable (GiBs of memory)")
    n = _dram_rows(wbits)
    nbytes = n * 4096 * wbits // 8
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    run(benchmark, f"linear M=1 K=4096 N={n} (W{wbits} weight 2x L3)",
        f"DRAM floor W{wbits} (copy {nbytes >> 20} MiB / 2)", lambda: dst.copy_(src), "floor",
        weight_bytes=nbytes, wbits=wbits)


@pytest.mark.parametrize("wbits", [4, 2])
def test_linear_memory_floor(benchmark, wbits):
    """Copy of a buffer the size of the packed 4096x4096 weight: floor = copy time / 2 (STREAM)."""
    nbytes = rand_pw(4096, 4096, wbits).nbytes()
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    run(benchmark, "linear M=1 K=N=4096", f"memory floor W{wbits} (copy {nbytes >> 20} MiB / 2)",
        lambda: dst.copy_(src), "floor", weight_bytes=nbytes, wbits=wbits)


# ----------------------------------------------------------------------------- Conv2d

CONV = {f"conv3x3 {c}ch {h}x{h} b1": (c, h) for c, h in ((64, 56), (128, 28), (256, 14), (512, 7))}


@PEER_ISAS
@pytest.mark.parametrize("group", list(CONV))
def test_conv_fp32(benchmark, group, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    c, h = CONV[group]
    x, w, b = torch.randn(1, c, h, h), torch.randn(c, c, 3, 3) * 0.05, torch.randn(c)
    run(benchmark, group, "fp32 F.conv2d", lambda: F.conv2d(x, w, b, 1, 1), "baseline", primary=True)


@pytest.mark.parametrize("group", list(CONV))
@pytest.mark.parametrize("isa", IMPL_ISAS)
def test_conv_dfqkern(benchmark, group, isa):
    c, h = CONV[group]
    pw = rand_pw(c, c * 9, 4, shape=(c, c, 3, 3))
    x, b = torch.randn(1, c, h, h), torch.randn(c)
    s, z = R.qparams_from_range(x.min(), x.max(), 8, False)
    act = ActQuant(8, s.reshape(1), z.reshape(1))
    run(benchmark, group, "dfqkern W4A8", lambda: dispatch.conv2d(x, pw, b, act, 1, 1), "dfqkern", isa)


# ----------------------------------------------------------------------------- fused fake-quant / AdaRound

FQ_GROUP = "fake-quant fwd+bwd 512x512x3x3 per-channel 4-bit"
AR_GROUP = "AdaRound fwd+bwd+reg 512x512x3x3 4-bit"


def _weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 512, 3, 3, generator=g) * 0.05
    s = (w.abs().amax((1, 2, 3)) / 7).clamp_min(1e-8)
    return w, s, torch.full((512,), 8, dtype=torch.int32), torch.randn(w.shape, generator=g)


@PEER_ISAS
def test_fake_quant_torch(benchmark, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    w, s, z, g = _weight()
    zf = z.float()

    def step():
        with torch.enable_grad():
            wr, sr, zr = w.requires_grad_(), s.clone().requires_grad_(), zf.clone().requires_grad_()
            y = torch._fake_quantize_learnable_per_channel_affine(wr, sr, zr, 0, 0, 15, 1.0)
            y.backward(g)
            w.grad = None

    run(benchmark, FQ_GROUP, "torch learnable per-channel (autograd)", step, "baseline", primary=True)


def test_fake_quant_dfqkern(benchmark):
    w, s, z, g = _weight()

    def step():
        dispatch.fake_quant_forward(w, s, z, 4, 0)
        dispatch.fake_quant_backward(g, w, s, z, 4, 0)

    run(benchmark, FQ_GROUP, "dfqkern fused fwd + bwd", step, "dfqkern")


@PEER_ISAS
def test_adaround_eager(benchmark, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    w, s, z, g = _weight()
    base, v = R.adaround_base(w, s), R.adaround_init_v(w, s)

    def step():
        with torch.enable_grad():
            vv, ss = v.clone().requires_grad_(), s.clone().requires_grad_()
            wh, reg = R.adaround_forward(base, vv, ss, z, 4, 0, 2.0)
            (wh * g).sum().add(0.01 * reg).backward()

    run(benchmark, AR_GROUP, "eager chain (reference ops + autograd)", step, "baseline", primary=True)


def test_adaround_dfqkern(benchmark):
    w, s, z, g = _weight()
    base, v = R.adaround_base(w, s), R.adaround_init_v(w, s)

    def step():
        dispatch.adaround_forward(base, v, s, z, 4, 0, 2.0)
        dispatch.adaround_backward(g, base, v, s, z, 4, 0, 2.0, 0.01)

    run(benchmark, AR_GROUP, "dfqkern fused fwd + bwd", step, "dfqkern")


# ----------------------------------------------------------------------------- whole models

MODELS = {"model CIFAR ResNet-20 b1": ("cifar10_resnet20", 32), "model ResNet-18 224 b1": ("resnet18", 224)}


def _float_model(name: str):
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=1000).eval()
    from dfqkern.models import create_model

    return create_model(name).eval()


def _calibration_images(size: int) -> torch.Tensor:
    """The random images both quantized models (dfqkern's packed, onnxruntime's static int8) are calibrated on."""
    return torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def packed_models():
    """W4A8 packed models (first / last layer 8-bit, the QuantConfig default), built once."""
    quantize = pytest.importorskip("dfqkern.quantize")
    from dfqkern.config import QuantConfig

    out = {}
    torch.manual_seed(0)
    for group, (name, size) in MODELS.items():
        fm = _float_model(name)
        q = quantize.quantize_model(fm, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                    act_observer="minmax"))
        quantize.calibrate_activations(q, _calibration_images(size), progress=False)
        quantize.pack_model(q)
        out[group] = (fm, q.eval(), torch.randn(1, 3, size, size))
    return out


@PEER_ISAS
@pytest.mark.parametrize("group", list(MODELS))
def test_model_fp32(benchmark, group, peer_isa, request):
    if _in_child(request, peer_isa):
        return
    fm, _, x = request.getfixturevalue("packed_models")[group]
    run(benchmark, group, "fp32 eager", lambda: fm(x), "baseline", primary=True)


@pytest.mark.parametrize("group", list(MODELS))
@pytest.mark.parametrize("impl", ["fp32", "int8 QDQ static"])
def test_model_onnxruntime(benchmark, group, impl, packed_models, tmp_path):
    _ort()
    pytest.importorskip("onnx", reason="exporting the float model needs onnx (pip install dfqkern[export])")
    fm, _, x = packed_models[group]
    model, meta = ort_int8.float_onnx(fm, x), {}
    if impl == "fp32":
        sess = _ort_session(model)
    else:
        sess, int8, convs = ort_int8.quantize_int8(model, _calibration_images(x.shape[-1]), tmp_path,
                                                   torch.get_num_threads())
        if int8 < convs:  # a row named int8 must run int8 kernels (it silently ran fp32 convs before)
            pytest.fail(f"onnxruntime fused only {int8} of {convs} Convs into QLinearConv: not an int8 peer")
        meta["int8_convs"] = int8
    feed = {"x": x.numpy()}
    run(benchmark, group, f"onnxruntime {impl}", lambda: sess.run(None, feed), "baseline", **meta)


@pytest.mark.parametrize("group", list(MODELS))
@pytest.mark.parametrize("isa", IMPL_ISAS)
def test_model_packed(benchmark, group, isa, packed_models):
    _, q, x = packed_models[group]
    run(benchmark, group, "dfqkern W4A8 packed", lambda: q(x), "dfqkern", isa)


@pytest.mark.parametrize("group", list(MODELS))
@pytest.mark.parametrize("isa", IMPL_ISAS)
def test_model_packed_compiled(benchmark, group, isa, packed_models):
    """The packed model as one captured graph (dfqkern.compile default mode: convs as bound C++ calls with the add / ReLU
    after them fused); its logits are the eager packed model's."""
    import dfqkern

    _, q, x = packed_models[group]
    # Captured once, outside the timed calls (a failure fails here), at the row's ISA: the frozen calls bind the
    # weight layouts that ISA reads (amx: one byte per code), as a user compiling on that machine gets.
    with torch.no_grad(), (C.use_isa(isa) if isa else _nothing()):
        compiled = dfqkern.compile(q, fallback=False)
        assert torch.equal(compiled(x), q(x))  # the same kernels in the same order
    run(benchmark, group, "dfqkern W4A8 packed compiled", lambda: compiled(x), "dfqkern", isa)
