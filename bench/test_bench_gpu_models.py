"""Whole-model GPU latency and memory: packed W4A8 ResNet-18 and ViT-B/16 (random weights) vs fp16.

Run on a CUDA machine (``scripts/gpu_check.sh`` does)::

    DFQKERN_BENCH_DIR=runs/gpu python3 -m pytest bench/test_bench_gpu_models.py -q

Models come from timm (``resnet18``, ``vit_base_patch16_224``) or, without timm, torchvision;
random weights, nothing is downloaded. The packed model is ``quantize_model`` (W4A8, first / last
layer 8-bit, min-max observers) -> ``calibrate_activations`` on 8 random images -> ``pack_model``,
built on the CPU, then moved to the GPU in fp16 (channels-last for the CNN, as its fp16 baseline).
Rows, at batch 1 and 32, all timed by :func:`gpu_timing.time_ms` in this process: fp16 eager and
fp16 ``torch.compile`` (inductor, default mode) baselines; the packed model with the automatic
backend order (CUDA first) and with ``DFQKERN_BACKEND=triton``. Memory: bytes the model holds on
the GPU once it has run (weights plus the backends' cached weight layouts) vs the fp16 model.
The compiled baselines run last: their compile time is what a tight time budget cuts first.
"""
from __future__ import annotations

import copy

import pytest
import torch

import gpu_tables as T
from gpu_timing import Recorder, env_record

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: GPU benchmarks only"),
]

CUDA = "cuda"
RUN = "models"
MODELS = {"ResNet-18": ("resnet18", "resnet18"), "ViT-B/16": ("vit_base_patch16_224", "vit_b_16")}  # timm, torchvision
BATCHES = (1, 32)
PACKED = {"cuda": "packed W4A8 (cuda first)", "triton": "packed W4A8 (triton first)"}
WARMUP, REPS = 5, 20


def float_model(name: str) -> torch.nn.Module:
    timm_name, tv_name = MODELS[name]
    try:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=1000).eval()
    except ImportError:
        pass
    try:
        import torchvision
    except ImportError:
        pytest.skip("needs timm or torchvision for the model definitions")
    return getattr(torchvision.models, tv_name)(weights=None).eval()


def is_cnn(name: str) -> bool:
    return name.startswith("ResNet")


def to_gpu_fp16(model: torch.nn.Module, name: str) -> torch.nn.Module:
    model = model.to(CUDA).half()
    return model.to(memory_format=torch.channels_last) if is_cnn(name) else model


def images(name: str, batch: int) -> torch.Tensor:
    x = torch.randn(batch, 3, 224, 224, device=CUDA, dtype=torch.float16)
    return x.to(memory_format=torch.channels_last) if is_cnn(name) else x


@pytest.fixture(scope="module")
def rec() -> Recorder:
    torch.backends.cudnn.benchmark = True
    r = Recorder(RUN)
    r(**env_record())
    return r


@pytest.fixture(scope="module")
def models():
    """name -> (fp16 float model on the GPU, packed model on the CPU (fp32 parts), fp16 resident bytes)."""
    from dfqkern.config import QuantConfig
    from dfqkern.quantize import calibrate_activations, pack_model, quantize_model

    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        fm = float_model(name)
        q = quantize_model(fm, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax"))
        calibrate_activations(q, torch.randn(8, 3, 224, 224), batch_size=8, progress=False)
        pack_model(q)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        f16 = to_gpu_fp16(fm, name)
        with torch.inference_mode():
            f16(images(name, 1))
        torch.cuda.synchronize()
        out[name] = (f16, q.eval(), torch.cuda.memory_allocated() - before)
    return out


@pytest.fixture(scope="module")
def packed_gpu(models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = to_gpu_fp16(copy.deepcopy(models[name][1]), name)
        return cache[name]

    return get


def _backend_available(backend: str) -> str | None:
    from dfqkern.kernels import available_backends

    return None if backend in available_backends() else f"the {backend} backend is not available here"


@pytest.mark.parametrize("name", list(MODELS))
def test_memory(rec, models, name):
    f16, q_cpu, f16_bytes = models[name]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    q = to_gpu_fp16(copy.deepcopy(q_cpu), name)
    with torch.inference_mode():
        q(images(name, 1))  # builds the backend's cached weight layouts; the output is dropped at once
    torch.cuda.synchronize()
    rec(kind="memory", section="memory", case=name, impl=T.FP16_EAGER, role="baseline", bytes=f16_bytes)
    rec(kind="memory", section="memory", case=name, impl="packed W4A8 (resident after a forward)", role="dfqkern",
        bytes=torch.cuda.memory_allocated() - before, vs=[T.FP16_EAGER])
    tensors = list(q.parameters()) + list(q.buffers())
    rec(kind="memory", section="memory", case=name, impl="packed W4A8 (parameters + buffers)", role="dfqkern",
        bytes=sum(t.numel() * t.element_size() for t in tensors), vs=[T.FP16_EAGER])
    del q


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fp16_eager(rec, models, name, batch):
    f16 = models[name][0]
    x = images(name, batch)
    with torch.inference_mode():
        rec.measure(lambda: f16(x), section="model", case=f"{name}, batch {batch}", impl=T.FP16_EAGER,
                    role="baseline", batch=batch, warmup=WARMUP, reps=REPS)


@pytest.mark.parametrize("backend", list(PACKED))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_packed(rec, packed_gpu, monkeypatch, name, batch, backend):
    why = _backend_available(backend)
    if why:
        pytest.skip(why)
    monkeypatch.setenv("DFQKERN_BACKEND", backend)  # first in the order; dispatch falls back for what it lacks
    q = packed_gpu(name)
    x = images(name, batch)

    def check():
        y = q(x)
        assert y.shape == (batch, 1000) and torch.isfinite(y).all(), "packed model output is not finite"

    with torch.inference_mode():
        rec.measure(lambda: q(x), section="model", case=f"{name}, batch {batch}", impl=PACKED[backend], check=check,
                    vs=[T.FP16_EAGER, T.FP16_COMPILE], batch=batch, backend=backend, warmup=WARMUP, reps=REPS)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fp16_compiled(rec, models, name, batch):
    compiled = torch.compile(models[name][0], dynamic=False)
    x = images(name, batch)
    with torch.inference_mode():
        rec.measure(lambda: compiled(x), section="model", case=f"{name}, batch {batch}", impl=T.FP16_COMPILE,
                    role="baseline", batch=batch, warmup=WARMUP, reps=REPS)
