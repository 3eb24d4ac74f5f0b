"""Shared pieces of the kernel op suites: the backend rows, seeded data makers, comparisons, case lists.

Each op has one suite (``test_<op>.py``) parametrized over :data:`ROWS`: every backend in
``available_backends()`` on the device it runs on, the CPU backend once per instruction-set level
(``portable``, ``avx2``, ``avx512vnni``; rows the CPU lacks skip). Every row is compared with
:mod:`dfqkern.kernels.reference` through ``dispatch.call(..., backend=...)`` (strict: no silent
fallback). A row whose backend declines a combination (:class:`Unsupported`) or lacks the op skips.

Triton: without a CUDA device the kernels run in Triton's interpreter on CPU tensors.
``TRITON_INTERPRET=1`` must be in force when triton is first imported, so this module imports the
backend that way (and restores the variable); if triton was already imported in compiled mode in
this process, the triton rows skip and ``test_triton_backend.test_in_fresh_process`` runs them.

Random inputs are fresh each run (the seed is in failure messages; pin it with ``DFQKERN_TEST_SEED``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

TRITON_PKG = "dfqkern.kernels.triton"
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
SEED = int(os.environ.get("DFQKERN_TEST_SEED", random.randrange(2 ** 31)))


def _import_triton_backend():
    """Import the triton backend, interpreted when there is no GPU (None when triton is absent)."""
    prev = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        mod = sys.modules.get(TRITON_PKG)
        if mod is not None and getattr(mod, "INTERPRET", False) == ON_GPU:
            # imported earlier in the other mode: re-import so the kernels are defined in this one
            for name in [n for n in sys.modules if n == TRITON_PKG or n.startswith(TRITON_PKG + ".")]:
                del sys.modules[name]
        return importlib.import_module(TRITON_PKG)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


def _stdlib_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


TB = _import_triton_backend()
# triton imported in compiled mode earlier in this process: the interpreter cannot run here.
TRITON_NEEDS_FRESH_PROCESS = TB is not None and not ON_GPU and not _stdlib_interpreted()

from dfqkern.formats import PackedWeight, code_max, symmetric_zero_point  # noqa: E402
from dfqkern.kernels import Backend, dispatch, reference as R  # noqa: E402
from dfqkern.kernels.contract import Unsupported  # noqa: E402

ISAS = ("portable", "avx2", "avx512vnni", "amx")


def supported_isas() -> tuple[str, ...]:
    """The ISAS this CPU runs (AVX2-only machines exist: AMD Zen 2/3); the others are reported as skips."""
    from dfqkern.kernels import cpu

    ok = []
    for isa in ISAS:
        try:
            with cpu.use_isa(isa):
                ok.append(isa)
        except ValueError:
            continue
    return tuple(ok)


@dataclass(frozen=True)
class Row:
    """One backend row of an op suite: the backend, the device its tensors live on, the CPU ISA level."""

    backend: str
    device: str
    isa: str | None = None

    @property
    def id(self) -> str:
        return self.backend + (f"-{self.isa}" if self.isa else "")

    def dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def call(self, op: str, *args, **kwargs):
        """``op`` on this row's backend through dispatch (strict); skip when the backend declines."""
        mod = dispatch.backend_module(Backend(self.backend))
        if mod is None:
            pytest.skip(f"backend {self.backend!r} is not available here")
        if not hasattr(mod, op):
            pytest.skip(f"backend {self.backend!r} does not implement {op}")
        try:
            return dispatch.call(op, self.device, *args, backend=self.backend, **kwargs)
        except Unsupported as e:
            pytest.skip(f"{self.backend} declines: {e}")

    @contextlib.contextmanager
    def active(self):
        if self.isa is None:
            yield
            return
        from dfqkern.kernels import cpu

        try:
            ctx = cpu.use_isa(self.isa)
            ctx.__enter__()
        except ValueError:
            pytest.skip(f"this CPU does not support the {self.isa} kernels")
        try:
            yield
        finally:
            ctx.__exit__(None, None, None)


def _rows() -> list[Row]:
    rows = []
    for name in dispatch.available_backends():
        mod = dispatch.backend_module(Backend(name))
        device = "cpu" if "cpu" in mod.DEVICES else "cuda"
        if name == "cpu":
            rows += [Row(name, device, isa) for isa in ISAS]
        elif name == "triton" and TRITON_NEEDS_FRESH_PROCESS:
            continue
        else:
            rows.append(Row(name, device))
    return rows


ROWS = _rows()


def cpu_backend():
    """dfqkern's CPU backend module, skipping (with the reason) where dfqkern._C is not built."""
    cpu = pytest.importorskip("dfqkern.kernels.cpu")
    if not cpu.is_available():
        pytest.skip("dfqkern._C with CPU ops is not built")
    return cpu


def seeded(nodeid: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + zlib.crc32(nodeid.encode()))


def ctx(**kw) -> str:
    return f"[DFQKERN_TEST_SEED={SEED}] " + ", ".join(f"{k}={v}" for k, v in kw.items())


# ----------------------------------------------------------------------------- comparisons

def assert_equal(actual, expected, **why):
    expected = expected.to(actual.device)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, ctx(
        shape=(tuple(actual.shape), tuple(expected.shape)), dtype=(actual.dtype, expected.dtype), **why)
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(ctx(max_abs_diff=diff.max().item(), n_diff=int((diff > 0).sum()), **why))


def assert_close(actual, expected, rtol, atol, **why):
    torch.testing.assert_close(actual, expected.to(actual.device), rtol=rtol, atol=atol,
                               msg=lambda m: ctx(**why) + "\n" + m)


def assert_sum_close(actual, expected, abs_terms, rel: float, **why):
    """fp32 sums in another order: within ``rel`` of the sum of |terms| (per parameter)."""
    tol = rel * abs_terms.double().to(actual.device) + 1e-12
    err = (actual.double() - expected.double().to(actual.device)).abs()
    assert actual.shape == expected.shape, ctx(shape=(tuple(actual.shape), tuple(expected.shape)), **why)
    assert bool((err <= tol).all()), ctx(max_err=err.max().item(), tol=tol.min().item(), **why)


# Float results, per backend (why: see each backend's module docstring).
# * packed Linear / Conv2d outputs: cpu uses the reference's fp32 epilogue order exactly; triton and
#   cuda are allowed 1 ulp of the output dtype (a compiler may reorder the scale product).
# * reductions (LSQ / AdaRound scale gradients, AdaRound regularizer): fp32 sums in another order,
#   ``SUM_REL * sum(|terms|)`` per parameter.
# * soft AdaRound w_hat / grad_V: the kernels' own exp / log / sigmoid differ by a few fp32 ulps.
ULP = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
EXACT_EPILOGUE = {"reference", "cpu"}
SUM_REL = {"reference": 0.0, "cpu": 1e-5, "triton": 1e-6, "cuda": 1e-6}


def assert_float_output(on: Row, actual, expected, **why):
    if on.backend in EXACT_EPILOGUE:
        assert_equal(actual, expected, **why)
    else:
        assert actual.dtype == expected.dtype, ctx(dtype=(actual.dtype, expected.dtype), **why)
        assert_close(actual.float(), expected.float(), rtol=ULP[expected.dtype], atol=1e-30, **why)


# ----------------------------------------------------------------------------- data makers

def rand_weight(row: Row, gen, n: int, k: int, bits: int, shape=None, symmetric=False) -> PackedWeight:
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    zp = (torch.full((n,), symmetric_zero_point(bits)) if symmetric
          else torch.randint(0, 2 ** bits, (n,), generator=gen))
    scale = torch.rand(n, generator=gen) * 0.05 + 0.01
    return PackedWeight.from_codes(row.dev(codes), row.dev(scale), row.dev(zp), bits, shape=shape)


def rand_x(row: Row, gen, *shape, dtype=torch.float32, scale=2.0) -> torch.Tensor:
    return row.dev((torch.randn(*shape, generator=gen) * scale + 0.3).to(dtype))


def static_act(x: torch.Tensor, bits: int, symmetric: bool = False) -> R.ActQuant:
    s, z = R.qparams_from_range(x.float().min().cpu(), x.float().max().cpu(), bits, symmetric)
    return R.ActQuant(bits, s.reshape(1).to(x.device), z.reshape(1).to(x.device), symmetric=symmetric)


def make_act(x, bits, per_token, symmetric) -> R.ActQuant:
    return R.ActQuant(bits, per_token=True, symmetric=symmetric) if per_token else static_act(x, bits, symmetric)


def rand_params(row: Row, gen, shape, axis, bits: int, float_zp: bool = False):
    """Per-tensor (0-d when ``axis`` is None) or per-channel scale and zero point."""
    n = 1 if axis is None else shape[axis]
    scale = torch.rand(n, generator=gen) * 0.2 + 0.02
    if float_zp:  # LSQ+ style learnable, non-integer zero points
        zp = torch.rand(n, generator=gen) * code_max(bits)
    else:
        zp = torch.randint(0, 2 ** bits, (n,), generator=gen, dtype=torch.int32)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return row.dev(scale), row.dev(zp)


@dataclass(frozen=True)
class ConvCase:
    """One convolution geometry: input ``[n, c, h, w]``, weight ``[o, c // groups, kh, kw]``."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    why: str = ""

    def __str__(self) -> str:
        return (f"n{self.n}c{self.c}h{self.h}w{self.w}o{self.o}k{self.kh}{self.kw}s{self.stride}p{self.padding}"
                f"d{self.dilation}g{self.groups}").replace(" ", "")

    @property
    def geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    def weight(self, row: Row, gen, bits: int, symmetric=False) -> PackedWeight:
        cg = self.c // self.groups
        return rand_weight(row, gen, self.o, self.kh * self.kw * cg, bits, (self.o, cg, self.kh, self.kw), symmetric)


# ----------------------------------------------------------------------------- non-finite inputs

NONFINITE = (float("nan"), float("inf"), float("-inf"))


def with_nonfinite(x: torch.Tensor, gen, count: int = 3) -> torch.Tensor:
    """A copy of ``x`` holding NaN, +Inf and -Inf (cycled) at ``count`` seeded random flat positions."""
    y = x.detach().clone().cpu()
    flat = y.reshape(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:count]
    for i, p in enumerate(pos.tolist()):
        flat[p] = NONFINITE[i % 3]
    return y.to(x.device)


def assert_nan_equal(on: Row, actual, expected, exact: bool = False, **why):
    """NaN at exactly the reference's positions, the rest as :func:`assert_float_output` (or
    :func:`assert_equal` when ``exact``)."""
    expected = expected.to(actual.device)
    assert actual.shape == expected.shape, ctx(shape=(tuple(actual.shape), tuple(expected.shape)), **why)
    an, en = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(an, en), ctx(nan_missing=int((en & ~an).sum()), nan_extra=int((an & ~en).sum()), **why)
    a = torch.where(an, torch.zeros_like(actual), actual)
    e = torch.where(en, torch.zeros_like(expected), expected)
    (assert_equal if exact else lambda x, y, **w: assert_float_output(on, x, y, **w))(a, e, **why)
