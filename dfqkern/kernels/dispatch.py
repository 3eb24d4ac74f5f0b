"""Backend selection for every kernel op.

A backend is a module exposing ``is_available()``, ``DEVICES`` (device types it runs on) and any
subset of the ops in :data:`OPS`, each with the signature of the same function in
:mod:`dfqkern.kernels.reference`. :func:`call` checks the arguments once against
:mod:`dfqkern.kernels.contract` (TypeError / ValueError naming the argument) before any backend
runs; a backend raises only :class:`Unsupported`, for an argument combination it does not
implement, and automatic selection then tries the next backend.

Selection, per call:
1. ``backend=`` given to the op: that backend, strictly (error if unavailable or unsupported).
2. ``DFQKERN_BACKEND`` set: that backend first, then the automatic order.
3. Automatic: ``cuda, triton, reference`` for CUDA tensors; ``cpu, reference`` for CPU tensors
   (``triton`` joins the CPU list only under ``TRITON_INTERPRET=1``, when forced).
"""
from __future__ import annotations

import enum
import functools
import importlib
import os

from . import contract
from .contract import Unsupported

ENV_VAR = "DFQKERN_BACKEND"

OPS = (
    "quantize", "dequantize", "fake_quant_forward", "fake_quant_backward", "adaround_forward",
    "adaround_backward", "quantize_activation", "linear_int", "linear", "conv2d_int", "conv2d", "matmul_int",
    "attention_qkv",
)


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: "str | Backend") -> "Backend":
        try:
            return cls(value.value if isinstance(value, Backend) else str(value).lower())
        except ValueError:
            raise ValueError(f"backend must be one of {[b.value for b in cls]}, got {value!r}") from None


_MODULES = {
    Backend.REFERENCE: "dfqkern.kernels.reference",
    Backend.CPU: "dfqkern.kernels.cpu",
    Backend.TRITON: "dfqkern.kernels.triton",
    Backend.CUDA: "dfqkern.kernels.cuda",
}

_AUTO_ORDER = {
    "cuda": (Backend.CUDA, Backend.TRITON, Backend.REFERENCE),
    "cpu": (Backend.CPU, Backend.REFERENCE),
}


@functools.lru_cache(maxsize=None)
def backend_module(backend: Backend):
    """The backend's module if it imports and reports itself available, else None."""
    try:
        mod = importlib.import_module(_MODULES[backend])
    except ImportError:
        return None
    try:
        return mod if mod.is_available() else None
    except Exception:  # a broken optional toolchain must not break the reference path
        return None


def available_backends() -> list[str]:
    """Names of the backends usable in this process (``reference`` always)."""
    return [b.value for b in Backend if backend_module(b) is not None]


def _runs_on(mod, device_type: str) -> bool:
    return device_type in getattr(mod, "DEVICES", ())


def _candidates(device_type: str, backend) -> tuple[tuple[Backend, ...], bool]:
    if backend is not None:
        return (Backend.parse(backend),), True
    order = _AUTO_ORDER.get(device_type, (Backend.REFERENCE,))
    env = os.environ.get(ENV_VAR)
    if env:
        forced = Backend.parse(env)
        order = (forced, *(b for b in order if b != forced))
    return order, False


def first_backend(op: str, device_type: str, backend: "str | Backend | None" = None) -> "str | None":
    """The backend :func:`call` tries first for ``op`` on ``device_type`` (``$DFQKERN_BACKEND`` and
    availability included), or ``None`` when none serves it. It may still fall back per call when that
    backend declines particular arguments (``Unsupported``)."""
    order, _ = _candidates(device_type, backend)
    for b in order:
        mod = backend_module(b)
        if mod is not None and _runs_on(mod, device_type) and hasattr(mod, op):
            return b.value
    return None


def env_backend() -> "str | None":
    """``$DFQKERN_BACKEND`` as :func:`call` reads it now (part of what a cached selection depends on)."""
    return os.environ.get(ENV_VAR)


def first_function(op: str, device_type: str, backend: "str | Backend | None" = None):
    """``(function, strict)``: the backend function :func:`call` tries first for ``op`` (``None`` when no
    backend serves it) and whether a forced ``backend`` makes its :class:`Unsupported` an error. For callers
    that cache the choice (a packed layer's eager call): they run :mod:`.contract` themselves, fall back to
    :func:`call` on ``Unsupported`` unless strict, and choose again when :func:`env_backend` changes."""
    name = first_backend(op, device_type, backend)
    return (None if name is None else getattr(backend_module(Backend(name)), op)), backend is not None


def call(op: str, device_type: str, *args, backend: "str | Backend | None" = None, **kwargs):
    """Run ``op`` on the chosen backend for tensors on ``device_type``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    contract.CHECKS[op](*args, **kwargs)  # contract.check, one call level less (this runs per kernel call)
    order, strict = _candidates(device_type, backend)
    for b in order:
        mod = backend_module(b)
        if mod is None or not _runs_on(mod, device_type) or not hasattr(mod, op):
            if strict:
                why = ("is not available (see dfqkern.kernels.available_backends())" if mod is None else
                       f"does not run on {device_type} tensors" if not _runs_on(mod, device_type) else
                       f"does not implement {op}")
                raise RuntimeError(f"backend {b.value!r} {why}")
            continue
        try:
            return getattr(mod, op)(*args, **kwargs)
        except Unsupported:
            if strict:
                raise
    raise RuntimeError(f"no backend implements {op} for {device_type} tensors with these arguments")


def _device_type(args, kwargs) -> str:
    """The device type of the first argument that has one (``"cpu"`` when none does)."""
    for a in args:
        if hasattr(a, "device"):
            return a.device.type
    for a in kwargs.values():
        if hasattr(a, "device"):
            return a.device.type
    return "cpu"


def _make_op(op: str):
    def run(*args, backend: "str | Backend | None" = None, **kwargs):
        return call(op, _device_type(args, kwargs), *args, backend=backend, **kwargs)

    run.__name__ = op
    run.__doc__ = f"Dispatching wrapper of :func:`dfqkern.kernels.reference.{op}` (extra ``backend=`` argument)."
    return run


# Module-level dispatching wrappers: dispatch.linear(...), dispatch.fake_quant_forward(...), ...
globals().update({op: _make_op(op) for op in OPS})
