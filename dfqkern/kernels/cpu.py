"""CPU backend: the compiled kernels of ``dfqkern._C`` (csrc/cpu) behind the reference op signatures.

Every op has the signature and semantics of the same function in :mod:`dfqkern.kernels.reference`
(integer results identical, float results within rounding); dispatch has checked the arguments
against :mod:`dfqkern.kernels.contract`. Argument combinations the kernels do not cover raise
:class:`~dfqkern.kernels.contract.Unsupported`, so automatic dispatch falls back to the reference:
weight-only packed Linear / Conv2d (``act=None``), non-integer activation zero points in
convolutions, string padding, integer input codes that are not uint8, float64 tensors.

Instruction set, chosen at run time: ``amx`` (as ``avx512vnni``, but the panel GEMM -- every conv, Linear with
several rows, the attention matmuls -- runs on AMX-INT8 tiles) where the CPU and the OS offer AMX (Xeon
Sapphire Rapids and later), ``avx512vnni`` (the packed GEMM uses ``vpdpbusd`` on 256-bit
registers, AdaRound 512-bit registers; everything else as ``avx2``) where the CPU has AVX512-VNNI/VL,
``avx2`` (AVX2 + FMA + F16C) where it has those, ``portable`` C++ otherwise. Force one with
``DFQKERN_CPU_ISA=amx|avx512vnni|avx2|portable|auto`` or :func:`use_isa`; every level gives identical integer
and epilogue results.
On aarch64 the levels are ``dotprod`` (GEMM with ``sdot``, where the CPU reports it), ``neon`` and
``portable`` (``DFQKERN_CPU_ISA=dotprod|neon|portable|auto``); the other kernels are the portable ones.

Weight layouts derived from a :class:`~dfqkern.formats.PackedWeight` (``kpack-lsb-v1``) on first
use and cached in ``pw.cache["cpu"]`` (never saved; delete the entry if ``pw.data`` is modified
in place):

* ``("tile", groups)`` -> ``(tiles, corr)``: layout ``cpu-tile-v1`` (csrc/cpu/gemm.h). Rows in tiles
  of 4 (per conv group), K in 32-byte chunks per row (128 2-bit, 64 3/4-bit or 32 8-bit codes, one
  slot per 32 consecutive k), tile-major so a tile's rows stream together; ``corr`` (int32
  ``[tiles, 3, 4]``) holds per-row code sums and zero points for the exact zero-point correction
  ``sum (a - za)(w - zw) = dot(a - 128, w) + 128 * sum w - zw * sum a - za * sum (w - zw)``.
* ``("panel", groups)`` -> ``(panels, corr)``: layout ``cpu-panel-v1`` (csrc/cpu/gemm.h), used when
  a GEMM has several activation rows (Linear with M > 1, every GEMM-path convolution). Rows in panels
  of 16, K in 64-byte blocks of 16 rows x 4 consecutive k per slot, so the kernels broadcast 4
  activation bytes against 16 weight rows and keep one accumulator lane per output (no horizontal
  sums); ``corr`` is ``[panels, 3, 16]``. A weight used with both M = 1 and M > 1 holds both layouts.
  8-bit weights keep the tile layout below the avx512vnni level (the AVX2 panel kernel is slower for them).
* ``"dw"`` -> int16 ``[O, kh*kw]`` of ``code - zero_point`` for convolutions with one input channel
  per group (depthwise), run by a direct kernel.
* ``"conv2d_args"``: the last conv call's geometry lists and activation scale / zero point as Python
  numbers (:func:`~dfqkern.kernels.contract.cached`: redone when those tensors change).

``matmul_int`` (the attention matmuls, activation x activation) caches nothing: each call packs both
operands (csrc/cpu/matmul.h): B^T as an 8-bit weight for the GEMM micro-kernels above (``cpu-panel-v1``
on avx512vnni, ``cpu-tile-v1`` on portable / neon / dotprod), or on avx2 both as int16 for a vpmaddwd
kernel (vpmaddubsw would saturate on two 8-bit codes); threads split the batch (the leading dims).

``attention_qkv`` (a fused-qkv attention core in one call, csrc/cpu/attention.cpp) runs the elementwise and
matmul kernels above per (batch, head) and torch's softmax in between, so its probabilities are torch's.

Threads: torch's intra-op threads (``torch.set_num_threads``).
"""
from __future__ import annotations

import contextlib

import torch

from ..formats import PackedActivation, PackedWeight
from .contract import KERNEL_FLOATS, Unsupported, cached, pair, require_float
from .reference import ActQuant

DEVICES = ("cpu",)

_OPS = None  # torch.ops.dfqkern once the extension is loaded
_FAST = None  # dfqkern._C: direct (dispatcher-free) bindings of the latency-critical ops
_NO_CORR = torch.empty(0, dtype=torch.int32)  # the depthwise layout needs no correction table


def _load():
    global _OPS, _FAST
    if _OPS is None:
        from .. import _C  # registers torch.ops.dfqkern.cpu_*

        ops = torch.ops.dfqkern
        ops.cpu_linear  # noqa: B018  (raises if this build has no CPU ops)
        _FAST = _C if hasattr(_C, "cpu_linear") and hasattr(_C, "cpu_conv2d") else ops
        _OPS = ops
    return _OPS


def is_available() -> bool:
    """True when ``dfqkern._C`` imports and contains the CPU ops."""
    try:
        _load()
        return True
    except Exception:  # noqa: BLE001 - missing / stale extension: the reference backend serves
        return False


def isa() -> str:
    """The instruction set level the kernels use now: ``"amx"``, ``"avx512vnni"``, ``"avx2"`` or ``"portable"`` on
    x86, ``"dotprod"``, ``"neon"`` or ``"portable"`` on aarch64."""
    return _load().cpu_isa()


@contextlib.contextmanager
def use_isa(name: str):
    """Run the kernels at level ``name`` (one of :func:`isa`'s names, or ``"auto"``) inside the block; a level
    the CPU lacks raises ValueError. A frozen (``dfqkern.compile``) model keeps the layouts of the level it was
    compiled under."""
    ops = _load()
    before = ops.cpu_isa()
    ops.cpu_set_isa(name)
    try:
        yield
    finally:
        ops.cpu_set_isa(before)


@contextlib.contextmanager
def parallel_min_cost(cost: int):
    """Run the CPU kernels with ``cost`` as the least work (in int8 multiply-adds) one thread's share
    must hold; below it a kernel runs on the calling thread. ``1`` splits every kernel across torch's
    threads (tests use it to exercise the split paths on small shapes)."""
    before = _load().cpu_set_parallel_min_cost(int(cost))
    try:
        yield
    finally:
        _load().cpu_set_parallel_min_cost(before)


def _t(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)


# ----------------------------------------------------------------------------- elementwise ops

def quantize(x, scale, zero_point, bits, axis=None):
    require_float("x", x)
    return _load().cpu_quantize(x, _t(scale), _t(zero_point), bits, axis)


def dequantize(codes, scale, zero_point, axis=None):
    return _load().cpu_dequantize(codes, _t(scale), _t(zero_point), axis)


def fake_quant_forward(x, scale, zero_point, bits, axis=None, drop_prob=0.0, seed=0):
    require_float("x", x)
    return _load().cpu_fake_quant_forward(x, _t(scale), _t(zero_point), bits, axis, float(drop_prob), int(seed))


def fake_quant_backward(grad, x, scale, zero_point, bits, axis=None, grad_scale=1.0, drop_prob=0.0, seed=0):
    require_float("x", x)
    require_float("grad", grad)
    return _load().cpu_fake_quant_backward(grad, x, _t(scale), _t(zero_point), bits, axis, float(grad_scale),
                                           float(drop_prob), int(seed))


def adaround_forward(base, v, scale, zero_point, bits, axis=0, beta=2.0, hard=False):
    require_float("v", v)
    return _load().cpu_adaround_forward(base, v, _t(scale), _t(zero_point), bits, axis, float(beta), bool(hard))


def adaround_backward(grad, base, v, scale, zero_point, bits, axis=0, beta=2.0, reg_grad=0.0):
    require_float("v", v)
    require_float("grad", grad)
    return _load().cpu_adaround_backward(grad, base, v, _t(scale), _t(zero_point), bits, axis, float(beta),
                                         float(reg_grad))


# ----------------------------------------------------------------------------- weight layouts

_PREPACK = {"tile": "cpu_prepack_weight", "panel": "cpu_prepack_panels", "byte_panel": "cpu_prepack_panels"}
_BYTE_LAYOUTS = {"byte_panel"}  # packed from the codes as 8-bit weights: one byte per code (the AMX tiles' layout)


def _prepacked(pw: PackedWeight, layout: str, groups: int):
    """``(blocks, corr)`` of ``pw`` in a GEMM layout, derived once and cached in ``pw.cache["cpu"]``."""
    cache = pw.cache.setdefault("cpu", {})
    w = cache.get((layout, groups))
    if w is None:
        # 8-bit kpack-lsb-v1 is one code per byte: the codes themselves
        data, bits = (pw.codes().to(torch.uint8).contiguous(), 8) if layout in _BYTE_LAYOUTS else (pw.data, pw.bits)
        w = cache[(layout, groups)] = getattr(_load(), _PREPACK[layout])(data, pw.zero_point, bits, pw.k, groups)
    return w


def tile_weight(pw: PackedWeight, groups: int = 1):
    """``(tiles, corr)`` in the ``cpu-tile-v1`` layout (cached)."""
    return _prepacked(pw, "tile", groups)


def panel_weight(pw: PackedWeight, groups: int = 1):
    """``(panels, corr)`` in the ``cpu-panel-v1`` layout (cached)."""
    return _prepacked(pw, "panel", groups)


def _isa_now() -> str:
    # read per 8-bit packed Linear call: the direct binding where the build has one (no dispatcher)
    if _FAST is None:
        _load()
    return (getattr(_FAST, "cpu_isa", None) or _OPS.cpu_isa)()


_VNNI_LEVELS = ("avx512vnni", "amx")  # the x86 levels with the VNNI kernels and layouts (amx adds AMX tiles)
_TILE_MIN_K = 65  # 8-bit on AVX2: below this K the tile kernel's per-row, per-tile horizontal sums dominate


def _gemm_layout(pw: PackedWeight) -> str:
    # 8-bit codes on the AVX2 level: the panel kernel must split codes into nibbles (vpmaddubsw would
    # saturate), slower than the tile kernel's int16 widening, so those keep the tiles -- except at small K
    # (a first conv, K = 27: panels 42 us vs tiles 56 us on a Zen 3 core), where the tile epilogue dominates.
    if pw.bits == 8 and _isa_now() not in _VNNI_LEVELS and pw.k >= _TILE_MIN_K:
        return "tile"
    return "panel"


def _rows_layout(pw: PackedWeight) -> tuple[tuple[str, int], int]:
    """(cache key, code width) of the layout a Linear with several rows reads on the active ISA."""
    if pw.bits != 8 and _isa_now() == "amx":
        return ("byte_panel", 1), 8  # tiles take bytes: unpacking per call cost W2 most of the tiles' gain
    if pw.bits == 8 and _gemm_layout(pw) == "tile":
        return ("tile", 1), 8
    return ("panel", 1), pw.bits


def depthwise_weight(pw: PackedWeight) -> torch.Tensor:
    """int16 ``[O, kh*kw]`` of ``code - zero_point`` for one-input-channel-per-group convolutions (cached)."""
    cache = pw.cache.setdefault("cpu", {})
    w = cache.get("dw")
    if w is None:
        w = cache["dw"] = _load().cpu_prepack_depthwise(pw.data, pw.zero_point, pw.bits, pw.k)
    return w


# ----------------------------------------------------------------------------- packed activations / GEMM / conv

def quantize_activation(x2d: torch.Tensor, act: ActQuant) -> PackedActivation:
    require_float("x", x2d)
    data, scale, zp = _load().cpu_quantize_activation(x2d, act.scale, act.zero_point, act.bits, act.per_token,
                                                      act.symmetric)
    return PackedActivation(data, scale, zp, act.bits, x2d.shape[1])


def linear_int(pa: PackedActivation, pw: PackedWeight) -> torch.Tensor:
    one = pa.data.shape[0] == 1 or _gemm_layout(pw) == "tile"
    tiles, corr = tile_weight(pw) if one else panel_weight(pw)
    return _load().cpu_linear_int(pa.data, pa.zero_point, pa.bits, pa.k, tiles, corr, pw.bits, pw.n)


def matmul_int(a: torch.Tensor, a_zero_point: torch.Tensor, b: torch.Tensor,
               b_zero_point: torch.Tensor) -> torch.Tensor:
    # The attention matmuls (csrc/cpu/matmul.h). A layer makes three calls per forward: the direct
    # binding skips the dispatcher.
    if _FAST is None:
        _load()
    fn = getattr(_FAST, "cpu_matmul_int", None) or getattr(_OPS, "cpu_matmul_int", None)
    if fn is None:
        raise Unsupported("this build of dfqkern._C has no cpu_matmul_int (rebuild the extension)")
    return fn(a, a_zero_point, b, b_zero_point)


def attention_qkv(qkv, heads, q_mult, scale, zero_point, bits, fine, coarse, levels):
    # One call per attention module (csrc/cpu/attention.cpp); the direct binding skips the dispatcher.
    if _FAST is None:
        _load()
    fn = getattr(_FAST, "cpu_attention_qkv", None) or getattr(_OPS, "cpu_attention_qkv", None)
    if fn is None:
        raise Unsupported("this build of dfqkern._C has no cpu_attention_qkv (rebuild the extension)")
    return fn(qkv, heads, q_mult, scale, zero_point, bits, fine, coarse, levels)


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    # The M = 1 path is latency-bound: one cache lookup, one op call, no tensor checks in Python
    # (dispatch ran the contract; the C++ wrapper guards shapes, dtypes and sizes).
    if act is None:
        raise Unsupported("weight-only packed linear (act=None) is not implemented by the CPU backend")
    if x.dtype not in KERNEL_FLOATS:
        raise Unsupported(f"x dtype {x.dtype} is not implemented by the CPU backend")
    # M = 1: the tile layout (memory-bound GEMV kernels); M > 1: the panel layout (amx: one byte per code).
    if x.numel() == pw.k:
        key, wbits = ("tile", 1), pw.bits
    else:
        key, wbits = _rows_layout(pw)
    c = pw.cache.get("cpu")
    w = c.get(key) if c is not None else None
    if w is None:
        w = _prepacked(pw, *key)
    if _FAST is None:
        _load()
    y = _FAST.cpu_linear(x, w[0], w[1], pw.scale, wbits, pw.n, pw.k, bias, act.scale, act.zero_point, act.bits,
                        act.per_token, act.symmetric)
    if y.dim() != x.dim():  # a build whose kernel returns [M, N] for every x
        y = y.reshape(*x.shape[:-1], pw.n)
    out_dtype = out_dtype or x.dtype
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _geometry(stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    return list(pair(stride, "stride")), list(pair(padding, "padding")), list(pair(dilation, "dilation"))


def _scalar(v) -> float:
    # one-element tensor -> float; .item() is the cheapest way (a conv at batch 1 is latency-bound)
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else float(torch.as_tensor(v).reshape(()))


def _int_zero_point(zp, what: str) -> int:
    z = float(_scalar(zp))
    if z != int(z) or not 0 <= z <= 255:
        raise Unsupported(f"{what} must be an integer in [0, 255] for the CPU backend, got {z}")
    return int(z)


def byte_panel_weight(pw: PackedWeight, groups: int = 1):
    """``(panels, corr)`` of a 2/3/4-bit weight in the 8-bit ``cpu-panel-v1`` layout, one byte per code (cached).
    The same integers as :func:`panel_weight`'s, in the layout the AMX tiles read in place."""
    return _prepacked(pw, "byte_panel", groups)


def _conv_weight(pw: PackedWeight, groups: int):
    """``(weight, corr, bits)``: a conv weight in the layout the active ISA runs, and the code width it holds."""
    if pw.shape[1] == 1:
        return depthwise_weight(pw), _NO_CORR, pw.bits
    if pw.bits != 8 and _isa_now() == "amx":
        # A conv calls the GEMM once per output row (a few dozen rows): unpacking 2/3/4-bit panels for the tiles
        # in every call cost more than the tiles saved (512ch 7x7 W4: 2.2x slower than VNNI), so AMX convs read
        # a copy with one byte per code (2x / 4x the weight bytes, built once).
        return (*byte_panel_weight(pw, groups), 8)
    return (*_prepacked(pw, "panel" if pw.bits != 8 else _gemm_layout(pw), groups), pw.bits)


def conv2d_int(x_codes: torch.Tensor, x_zero_point: torch.Tensor, pw: PackedWeight, stride=1, padding=0,
               dilation=1, groups: int = 1) -> torch.Tensor:
    if x_codes.dtype != torch.uint8:
        raise Unsupported(f"x_codes must be uint8 for the CPU backend, got {x_codes.dtype}")
    za = _int_zero_point(x_zero_point, "x_zero_point")
    w, corr, wbits = _conv_weight(pw, groups)
    return _load().cpu_conv2d_int(x_codes, za, w, corr, wbits, list(pw.shape),
                                  *_geometry(stride, padding, dilation), groups)


def _conv_args(pw: PackedWeight, act: ActQuant, stride, padding, dilation):
    """The kernel's Python arguments of a conv that depend on the weight, activation parameters and geometry
    (the two one-element reads included), derived once per value (see :func:`conv2d`)."""
    za = _int_zero_point(act.zero_point, "act.zero_point")
    return (list(pw.shape), *_geometry(stride, padding, dilation), _scalar(act.scale), za)


def conv2d(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if act is None:
        raise Unsupported("weight-only packed conv2d (act=None) is not implemented by the CPU backend")
    require_float("x", x)
    # a packed layer passes the same parameters every call: read them once per value, not per call
    shape, s, p, d, scale, za = cached(pw.cache.setdefault("cpu", {}), "conv2d_args", (stride, padding, dilation),
                                       (act.scale, act.zero_point),
                                       lambda: _conv_args(pw, act, stride, padding, dilation))
    w, corr, wbits = _conv_weight(pw, groups)
    if _FAST is None:
        _load()
    y = _FAST.cpu_conv2d(x, w, corr, pw.scale, wbits, shape, s, p, d, groups, bias, scale, za, act.bits)
    out_dtype = out_dtype or x.dtype
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def conv2d_call(pw: PackedWeight, bias: torch.Tensor | None, act: ActQuant, stride=1, padding=0, dilation=1,
                groups: int = 1, relu: bool = False, watch: tuple = ()):
    """:func:`conv2d` with everything but its float32 input bound, as one C++ callable ``f(x, residual=None)``
    returning ``relu(conv2d(x) + residual)`` (``relu`` / ``residual`` optional): the same kernel and the same
    fp32 add and ReLU as the separate ops, with no Python between them (``dfqkern.compile(mode="frozen")``).
    The weight, scales and geometry are read now; the call raises once a tensor of ``watch`` (those they were
    read from) has been written in place since."""
    if act is None or act.per_token:
        raise Unsupported("a frozen packed conv needs a static per-tensor activation quantizer")
    _load()
    if not hasattr(_FAST, "PackedConvCall"):
        raise Unsupported("this build of dfqkern._C has no PackedConvCall (rebuild the extension)")
    shape, s, p, d, scale, za = _conv_args(pw, act, stride, padding, dilation)
    w, corr, wbits = _conv_weight(pw, groups)
    return _FAST.PackedConvCall(w, corr, pw.scale, wbits, shape, s, p, d, groups, bias, scale, za, act.bits, relu,
                                [t for t in watch if t is not None])


def linear_call(pw: PackedWeight, bias: torch.Tensor | None, act: ActQuant, watch: tuple = ()):
    """:func:`linear` with everything but its float32 input bound, as one C++ callable ``f(x)``: the same kernel
    and the same layouts :func:`linear` picks (one row: tiles; several: as :func:`_gemm_layout` says now), with no
    Python around it (``dfqkern.compile(mode="frozen")``). Raises once a tensor of ``watch`` has been written in
    place since."""
    if act is None or act.per_token:
        raise Unsupported("a frozen packed linear needs a static per-tensor activation quantizer")
    _load()
    if not hasattr(_FAST, "PackedLinearCall"):
        raise Unsupported("this build of dfqkern._C has no PackedLinearCall (rebuild the extension)")
    one = tile_weight(pw)
    key, many_bits = _rows_layout(pw)
    many = _prepacked(pw, *key)
    return _FAST.PackedLinearCall(one[0], one[1], many[0], many[1], pw.scale, pw.bits, pw.n, pw.k, bias,
                                  _t(act.scale), _t(act.zero_point), act.bits, act.symmetric,
                                  [t for t in watch if t is not None], many_bits)


def conv2d_chain_call(first, second):
    """Two :func:`conv2d_call` calls where ``first``'s output (after its ReLU) feeds only ``second``, as one C++
    callable ``f(x, residual=None)`` = ``second(first(x), residual)``, bit for bit: the first conv writes its fp32
    output NHWC and the second quantizes it from there (no NCHW round trip, transpose or separate ReLU pass).
    ``None`` where a conv does not take the GEMM path (depthwise-style, one input channel per group) or
    ``first`` has a residual input."""
    if not (first.gemm_path and second.gemm_path):
        return None
    return _FAST.PackedConvChain(first, second)
