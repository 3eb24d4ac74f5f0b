"""What is particular to the Triton backend: its signatures, interpreter mode, launch counts, weight cache.

The ops against the reference are in the op suites (test_quantize.py, test_fake_quant.py,
test_adaround.py, test_linear.py, test_conv2d.py), whose triton rows run in Triton's interpreter on
CPU tensors where there is no CUDA device (kernel_cases imports the backend that way).
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfqkern.kernels import dispatch, reference as R
from dfqkern.kernels.reference import ActQuant
from kernel_cases import ON_GPU, SEED, TB, TRITON_NEEDS_FRESH_PROCESS, Row, rand_weight, rand_x, static_act

if TB is None:
    pytest.skip("triton is an optional dependency (pip install dfqkern[triton])", allow_module_level=True)

ROW = Row("triton", "cuda" if ON_GPU else "cpu")


def test_in_fresh_process():
    """triton was imported in compiled mode before the suites: run their triton rows in a fresh process."""
    if not TRITON_NEEDS_FRESH_PROCESS:
        pytest.skip("the triton rows run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", DFQKERN_TEST_SEED=str(SEED))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
                           str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    """Keep TRITON_INTERPRET=1 while these tests run (triton reads it during interpretation too)."""
    if TRITON_NEEDS_FRESH_PROCESS:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        if not ON_GPU:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if TRITON_NEEDS_FRESH_PROCESS and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported in compiled mode before this module: see test_in_fresh_process")


def test_backend_contract():
    assert TB.is_available()
    assert ROW.device in TB.DEVICES
    assert "triton" in dispatch.available_backends()
    ops = [op for op in dispatch.OPS if hasattr(TB, op)]
    assert set(ops) >= {"quantize_activation", "linear_int", "linear", "conv2d_int", "conv2d",
                        "fake_quant_forward", "fake_quant_backward", "adaround_forward", "adaround_backward"}
    for op in ops:  # same parameters and defaults as the reference twin (dispatch passes arguments through)
        def params(f):
            return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

        assert params(getattr(TB, op)) == params(getattr(R, op)), op


def test_devices_follow_interpreter_mode():
    if not ON_GPU:
        assert TB.INTERPRET
    assert ("cpu" in TB.DEVICES) == TB.INTERPRET


def _count_launches(monkeypatch) -> list:
    import triton.runtime.jit as jit

    calls = []
    classes = [jit.JITFunction]
    if TB.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    for cls in classes:
        orig = cls.run

        def run(self, *a, _orig=orig, **kw):
            calls.append(getattr(self, "__name__", "?"))
            return _orig(self, *a, **kw)

        monkeypatch.setattr(cls, "run", run)
    return calls


def test_linear_and_conv_are_two_launches(gen, monkeypatch):
    pw = rand_weight(ROW, gen, 9, 20, 4)
    x = rand_x(ROW, gen, 5, 20)
    act = ActQuant(8, per_token=True)
    TB.linear(x, pw, None, act)  # warm-up (autotuning on a GPU benchmarks several configs)
    calls = _count_launches(monkeypatch)
    TB.linear(x, pw, None, act)
    assert len(calls) == 2, calls
    cw = rand_weight(ROW, gen, 4, 27, 4, shape=(4, 3, 3, 3))
    xc = rand_x(ROW, gen, 1, 3, 6, 6)
    sact = static_act(xc, 8)
    TB.conv2d(xc, cw, None, sact, 1, 1)
    calls.clear()
    TB.conv2d(xc, cw, None, sact, 1, 1)
    assert len(calls) == 2, calls


def test_weight_layout_is_cached(gen):
    pw = rand_weight(ROW, gen, 7, 24, 2)
    pa = R.quantize_activation(rand_x(ROW, gen, 3, 24), ActQuant(8, per_token=True))
    TB.linear_int(pa, pw)
    first = pw.cache["triton"]
    TB.linear_int(pa, pw)
    assert pw.cache["triton"] is first
    assert torch.equal(TB.linear_int(pa, pw), R.linear_int(pa, pw))
