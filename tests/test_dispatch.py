"""Backend selection: strict per-call choice, DFQKERN_BACKEND preference, automatic fallback.

Fake backend modules are installed in place of ``cpu`` / ``triton`` / ``cuda`` so every path of the
selection logic is exercised on any machine.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from dfqkern.kernels import Backend, Unsupported, available_backends, contract, dispatch
from dfqkern.kernels import reference as R


@pytest.fixture
def fake_backends(monkeypatch):
    """Install fake modules for the cpu / triton / cuda backends; returns a dict name -> module."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    mods = {}
    for b in (Backend.CPU, Backend.TRITON, Backend.CUDA):
        name = f"_dfqkern_test_fake_{b.value}"
        mod = types.ModuleType(name)
        mod.DEVICES = ("cpu",) if b != Backend.CUDA else ("cuda",)
        mod.is_available = lambda: True
        mod.calls = []
        monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setitem(dispatch._MODULES, b, name)
        mods[b.value] = mod
    dispatch.backend_module.cache_clear()
    yield mods
    dispatch.backend_module.cache_clear()


def _recording(mod, op, result="fake"):
    def fn(*args, **kwargs):
        mod.calls.append(op)
        return result

    setattr(mod, op, fn)


def _unsupported(mod, op):
    def fn(*args, **kwargs):
        mod.calls.append(op)
        raise Unsupported(f"{op}: not for these arguments")

    setattr(mod, op, fn)


def _args():
    x = torch.randn(3, 4)
    return x, torch.tensor(0.1), torch.tensor(7), 4


def test_available_backends_real():
    names = available_backends()
    assert "reference" in names
    assert set(names) <= {b.value for b in Backend}
    # every listed backend really imports and reports itself available
    for n in names:
        assert dispatch.backend_module(Backend(n)).is_available()


def test_every_op_has_reference_and_wrapper():
    for op in dispatch.OPS:
        assert callable(getattr(R, op)), op
        wrapper = getattr(dispatch, op)
        assert wrapper.__name__ == op
    x, s, z, b = _args()
    assert torch.equal(dispatch.quantize(x, s, z, b, backend="reference"), R.quantize(x, s, z, b))
    assert torch.equal(dispatch.quantize(x, s, z, b, backend=Backend.REFERENCE), R.quantize(x, s, z, b))
    assert torch.equal(dispatch.quantize(x, s, z, b, backend="REFERENCE"), R.quantize(x, s, z, b))


def test_backend_parse_and_unknown_names():
    assert Backend.parse("Triton") is Backend.TRITON and Backend.parse(Backend.CPU) is Backend.CPU
    with pytest.raises(ValueError, match=r"backend must be one of \['reference', 'cpu', 'triton', 'cuda'\], "
                                         r"got 'tpu'"):
        Backend.parse("tpu")
    x, s, z, b = _args()
    with pytest.raises(ValueError, match=r"backend must be one of .*'tpu'"):
        dispatch.quantize(x, s, z, b, backend="tpu")
    with pytest.raises(ValueError, match=r"op must be one of .*got 'gemm'"):
        dispatch.call("gemm", "cpu", x, backend="reference")


def test_contract_runs_before_any_backend(fake_backends):
    """Bad arguments get the contract's error even when the chosen backend would accept anything."""
    _recording(fake_backends["cpu"], "quantize")
    x, s, z, b = _args()
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        dispatch.quantize(x, s, z, 5, backend="cpu")
    assert fake_backends["cpu"].calls == []


def test_unknown_backend_in_env_is_an_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    x, s, z, b = _args()
    with pytest.raises(ValueError, match=r"backend must be one of .*'fastest'"):
        dispatch.quantize(x, s, z, b)


def test_auto_prefers_cpu_backend_then_falls_back_on_unsupported(fake_backends):
    cpu = fake_backends["cpu"]
    _recording(cpu, "quantize")
    x, s, z, b = _args()
    assert dispatch.quantize(x, s, z, b) == "fake"
    _unsupported(cpu, "quantize")
    out = dispatch.quantize(x, s, z, b)
    assert torch.equal(out, R.quantize(x, s, z, b)) and cpu.calls == ["quantize", "quantize"]
    # triton is not in the automatic CPU order (only when forced)
    _recording(fake_backends["triton"], "quantize", "triton")
    assert torch.equal(dispatch.quantize(x, s, z, b), R.quantize(x, s, z, b))
    assert fake_backends["triton"].calls == []


def test_auto_skips_backends_without_the_op(fake_backends):
    x, s, z, b = _args()  # fake cpu has no 'quantize' attribute at all
    assert torch.equal(dispatch.quantize(x, s, z, b), R.quantize(x, s, z, b))


def test_env_preference_and_fallback(fake_backends, monkeypatch):
    x, s, z, b = _args()
    _recording(fake_backends["cpu"], "quantize", "cpu")
    _recording(fake_backends["triton"], "quantize", "triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.quantize(x, s, z, b) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert torch.equal(dispatch.quantize(x, s, z, b), R.quantize(x, s, z, b))
    # preferred backend cannot serve: the automatic order continues
    _unsupported(fake_backends["triton"], "quantize")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.quantize(x, s, z, b) == "cpu"
    # preferred backend unavailable: same
    fake_backends["triton"].is_available = lambda: False
    dispatch.backend_module.cache_clear()
    assert dispatch.quantize(x, s, z, b) == "cpu"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # does not run on cpu tensors
    assert dispatch.quantize(x, s, z, b) == "cpu"


def test_explicit_backend_is_strict(fake_backends):
    x, s, z, b = _args()
    cpu, triton, cuda = fake_backends["cpu"], fake_backends["triton"], fake_backends["cuda"]
    _unsupported(cpu, "quantize")
    with pytest.raises(Unsupported, match="not for these arguments"):
        dispatch.quantize(x, s, z, b, backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' does not implement quantize"):
        dispatch.quantize(x, s, z, b, backend="triton")
    _recording(cuda, "quantize")
    with pytest.raises(RuntimeError, match="backend 'cuda' does not run on cpu tensors"):
        dispatch.quantize(x, s, z, b, backend="cuda")
    triton.is_available = lambda: False
    dispatch.backend_module.cache_clear()
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available \(see "
                                           r"dfqkern.kernels.available_backends\(\)\)"):
        dispatch.quantize(x, s, z, b, backend="triton")
    assert "triton" not in available_backends() and "cpu" in available_backends()


def test_broken_or_missing_backend_is_unavailable(fake_backends, monkeypatch):
    def boom():
        raise OSError("driver exploded")

    fake_backends["cpu"].is_available = boom
    monkeypatch.setitem(dispatch._MODULES, Backend.CUDA, "_dfqkern_test_no_such_module")
    dispatch.backend_module.cache_clear()
    assert dispatch.backend_module(Backend.CPU) is None
    assert dispatch.backend_module(Backend.CUDA) is None
    assert available_backends() == ["reference", "triton"]
    x, s, z, b = _args()
    assert torch.equal(dispatch.quantize(x, s, z, b), R.quantize(x, s, z, b))
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        dispatch.quantize(x, s, z, b, backend="cuda")


def test_device_routing(fake_backends, monkeypatch):
    """The device comes from the first tensor-like argument (args, then kwargs; PackedWeight counts)."""
    monkeypatch.setitem(contract.CHECKS, "linear", lambda *a, **k: None)  # stand-in arguments below
    seen = []
    cuda = fake_backends["cuda"]

    def linear(x, pw, *a, **k):
        seen.append("cuda")
        return "cuda-result"

    cuda.linear = linear
    # a tensor-like stand-in claiming to live on cuda: nothing is allocated on a GPU
    fake_x = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert dispatch.linear(fake_x, None) == "cuda-result" and seen == ["cuda"]
    assert dispatch.linear(x=fake_x, pw=None) == "cuda-result"
    # no backend runs on meta tensors: a clear error naming the op and device
    with pytest.raises(RuntimeError, match="no backend implements quantize for meta tensors"):
        dispatch.quantize(torch.randn(2, device="meta"), torch.tensor(1.0, device="meta"),
                          torch.tensor(0, device="meta"), 4)


def test_all_candidates_unsupported(fake_backends, monkeypatch):
    monkeypatch.setitem(contract.CHECKS, "linear", lambda *a, **k: None)  # stand-in arguments below
    _unsupported(fake_backends["cpu"], "linear")
    monkeypatch.setattr(R, "linear", lambda *a, **k: (_ for _ in ()).throw(Unsupported("no")))
    with pytest.raises(RuntimeError, match="no backend implements linear for cpu tensors"):
        dispatch.linear(torch.randn(2, 2), None)


def test_first_backend_follows_the_environment(monkeypatch):
    from dfqkern.kernels import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    auto = dispatch.first_backend("fake_quant_forward", "cpu")
    assert auto == ("cpu" if "cpu" in dispatch.available_backends() else "reference")
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.first_backend("fake_quant_forward", "cpu") == "reference"
    assert dispatch.first_backend("fake_quant_forward", "cpu", backend="reference") == "reference"
    assert dispatch.first_backend("no_such_op", "cpu") is None


def test_qdrop_mask_choice_follows_dispatch(monkeypatch):
    from dfqkern.calib.config import CalibConfig
    from dfqkern.calib.unit_training import _use_kernel_mask
    from dfqkern.kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")  # forced: the torch mask (the reference hash is slow)
    assert not _use_kernel_mask(CalibConfig(), torch.device("cpu"))
    assert _use_kernel_mask(CalibConfig(qdrop_mask="kernel"), torch.device("cpu"))
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert _use_kernel_mask(CalibConfig(), torch.device("cpu")) == ("cpu" in dispatch.available_backends())
