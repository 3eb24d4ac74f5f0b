"""CUDA backend: the tensor-core kernels of the compiled extension (``csrc/cuda``).

Every op has the signature and semantics of the same function in :mod:`dfqkern.kernels.reference`;
dispatch has checked the arguments against :mod:`dfqkern.kernels.contract`. Argument combinations
the kernels do not cover raise :class:`~dfqkern.kernels.contract.Unsupported`
(dispatch then falls back): 8-bit weights, weight-only (``act=None``) Linear / Conv2d, grouped
convolutions other than depthwise, float64 tensors, string padding, GPUs older than sm_80.

Weight layouts. The canonical ``kpack-lsb-v1`` weight is permuted once into a *fragment-ordered*
layout and cached in ``pw.cache["cuda"]`` (never saved). The padded weight ``[ceil(N/8)*8, Kp]``
(``Kp`` a multiple of the chunk ``KC = 512 / slot_bits``: 128 for W3/W4, 256 for W2) is stored as
``[N/8 tiles][Kp/KC chunks][32 lanes][16 bytes]``: lane ``(g, q) = (lane // 4, lane % 4)`` owns weight
row ``8 * tile + g`` and its 16 bytes are the codes its mma B fragments need for the chunk, in the
slot order given by :func:`slot_k_offsets` (and explained in ``csrc/cuda/gemm.cuh``). Slots past
``K`` hold the row's zero point. Two orders exist: ``"i8"`` for 8-bit activations
(``mma.m16n8k32``), ``"i4"`` for 4-bit ones (``mma.m16n8k64`` on sm_80-89, or two ``m16n8k32`` after
unpacking on sm_90+). Conv weights ``[O, C, kh, kw]`` use the same layout over ``K = kh*kw*Cp``
with the channels padded to ``Cp`` (16 for A8, 32 for A4) so a 16-byte load never straddles a tap.

``matmul_int`` (attention's activation x activation products) is a plain tiled int32 kernel
(``csrc/cuda/matmul_int.cu``); an extension built before it declines the op (:func:`extension_has_matmul`).

``DFQKERN_CUDA_A4_PATH=int4|int8`` overrides the A4 instruction choice (to benchmark both).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ..formats import PackedActivation, PackedWeight, code_max, pack_codes, packed_width
from . import reference as ref
from .contract import KERNEL_FLOATS, Unsupported, pair, require_float, require_integer_dtype
from .reference import ActQuant

DEVICES = ("cuda",)

A4_PATH_ENV = "DFQKERN_CUDA_A4_PATH"
PATH_A8, PATH_A4_INT4, PATH_A4_INT8 = 0, 1, 2  # csrc/cuda/launch.h GemmPath
OP_NAMES = ("cuda_quantize_rows", "cuda_quantize_image", "cuda_packed_gemm", "cuda_packed_conv",
            "cuda_depthwise_conv", "cuda_fake_quant_forward", "cuda_fake_quant_backward",
            "cuda_adaround_forward", "cuda_adaround_backward")
_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- availability

@functools.lru_cache(maxsize=None)
def extension_has_ops() -> bool:
    """True when ``dfqkern._C`` loads and registers CUDA kernels for every op in :data:`OP_NAMES`."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers torch.ops.dfqkern.cuda_*)
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return all(has(f"dfqkern::{name}", "CUDA") for name in OP_NAMES)
    except Exception:  # no extension, a CPU-only build, or an ABI mismatch
        return False


def is_available() -> bool:
    try:
        return bool(torch.cuda.is_available()) and extension_has_ops()
    except Exception:
        return False


def _ops():
    if not extension_has_ops():
        raise Unsupported("the dfqkern extension was built without CUDA kernels")
    return torch.ops.dfqkern


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _require_cuda(t: torch.Tensor) -> torch.device:
    """``t``'s device (dispatch has checked that the op's tensors share it) if the kernels can run there."""
    dev = t.device
    if dev.type != "cuda":
        raise Unsupported(f"the CUDA backend runs on CUDA tensors, got {dev}")
    if _capability(dev.index if dev.index is not None else torch.cuda.current_device()) < (8, 0):
        raise Unsupported("the CUDA kernels need compute capability 8.0 or newer")
    return dev


def _a4_path(device: torch.device) -> int:
    forced = os.environ.get(A4_PATH_ENV)
    if forced:
        if forced not in ("int4", "int8"):
            raise ValueError(f"{A4_PATH_ENV} must be 'int4' or 'int8', got {forced!r}")
        return PATH_A4_INT4 if forced == "int4" else PATH_A4_INT8
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return PATH_A4_INT4 if major == 8 else PATH_A4_INT8  # sm_90+ emulates int4 mma: unpack to int8


def _gemm_path(abits: int, device: torch.device) -> int:
    return PATH_A8 if abits == 8 else _a4_path(device)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------- weight layouts

def slot_k_offsets(layout: str, slot_bits: int) -> torch.Tensor:
    """``[32 lanes, 128 // slot_bits slots]``: the K offset (within a chunk) of every slot a lane loads.

    Slots are numbered LSB-first through the lane's 16 bytes (four little-endian 32-bit words).
    The orders make each mma operand register one shift and one mask of a word (``gemm.cuh``).
    """
    if layout not in ("i8", "i4") or slot_bits not in (2, 4):
        raise ValueError(f"layout must be 'i8' or 'i4' and slot_bits 2 or 4, got {layout!r}, {slot_bits}")
    q = (torch.arange(32) % 4)[:, None]
    sigma = torch.arange(128 // slot_bits)[None, :]
    per_word = 32 // slot_bits
    w, s = sigma // per_word, sigma % per_word
    if layout == "i8" and slot_bits == 4:  # word = k32 step; nibble 2b + j -> k 16j + 4q + b
        return 32 * w + 16 * (s % 2) + 4 * q + s // 2
    if layout == "i8":  # word = steps 2w, 2w+1; slot 4b + j -> step 2w + j//2, half j%2, byte b
        j, b = s % 4, s // 4
        return 32 * (2 * w + j // 2) + 16 * (j % 2) + 4 * q + b
    if slot_bits == 4:  # word w: k64 step w//2, half w%2; nibble p -> k 8q + p
        return 64 * (w // 2) + 32 * (w % 2) + 8 * q + s
    h, p = s % 2, s // 2  # i4, W2: word = k64 step; slot 2p + h -> half h, k 8q + p
    return 64 * w + 32 * h + 8 * q + p


def slot_bits_of(bits: int) -> int:
    if bits == 8:
        raise Unsupported("8-bit weights (the CUDA GEMM decodes 2/3/4-bit weights)")
    return 2 if bits == 2 else 4


def center_code(slot_bits: int) -> int:
    """The code subtracted before the s4 mma on the int4 path (so ``w - c`` fits 4 signed bits)."""
    return 2 if slot_bits == 2 else 8


@dataclass(frozen=True)
class CudaWeight:
    """A weight in a fragment-ordered layout, plus the per-row constants the GEMM epilogue needs."""

    data: torch.Tensor  # uint8 [ceil(N/8) * k_chunks * 512]
    zero4: torch.Tensor  # int32 [N]: zw * 0x01010101 (byte-wise zero point for __vsub4)
    w_sum: torch.Tensor  # int32 [N]: sum_k (w - zw)
    cdelta: torch.Tensor  # int32 [N]: center - zw (int4 path)
    need_row_sums: bool  # any cdelta != 0
    n: int
    k_chunks: int
    slot_bits: int
    layout: str


def build_gemm_weight(codes: torch.Tensor, zero_point: torch.Tensor, bits: int, layout: str) -> CudaWeight:
    """Permute unsigned codes ``[N, K]`` (zero points ``[N]``) into the ``layout`` order (see module doc)."""
    sb = slot_bits_of(bits)
    n, k = codes.shape
    zp = zero_point.reshape(-1).to(device=codes.device, dtype=torch.int64)
    if zp.numel() != n:
        raise ValueError(f"zero_point must have {n} elements, got {zp.numel()}")
    if n and (int(zp.min()) < 0 or int(zp.max()) > code_max(bits)):
        raise ValueError(f"weight zero points must lie in [0, {code_max(bits)}] for {bits}-bit weights")
    kc = 512 // sb
    n8, kp = _round_up(n, 8), _round_up(max(k, 1), kc)
    full = torch.zeros(n8, kp, dtype=torch.int64, device=codes.device)
    full[:n] = zp[:, None]  # slots past K hold the zero point: they decode to w - zw = 0
    full[:n, :k] = codes.to(torch.int64)
    lane = torch.arange(32, device=codes.device)
    rows = torch.arange(n8 // 8, device=codes.device)[:, None, None, None] * 8 + (lane // 4)[None, None, :, None]
    cols = (torch.arange(kp // kc, device=codes.device)[None, :, None, None] * kc
            + slot_k_offsets(layout, sb).to(codes.device)[None, None])
    data = pack_codes(full[rows, cols], sb).reshape(-1).contiguous()
    cdelta = center_code(sb) - zp
    return CudaWeight(
        data=data,
        zero4=(zp * 0x01010101).to(torch.int32),
        w_sum=(codes.to(torch.int64) - zp[:, None]).sum(dim=1).to(torch.int32),
        cdelta=cdelta.to(torch.int32),
        need_row_sums=bool((cdelta != 0).any()) if layout == "i4" else False,
        n=n, k_chunks=kp // kc, slot_bits=sb, layout=layout)


def _cached(pw: PackedWeight, key, build):
    cache = pw.cache.setdefault("cuda", {})
    hit = cache.get(key)
    if hit is None or hit.data.device != pw.device:
        hit = cache[key] = build()
    return hit


def gemm_weight(pw: PackedWeight, abits: int, c_padded: int | None = None) -> CudaWeight:
    """The cached fragment-ordered layout of ``pw`` for ``abits`` activations (conv: channels padded)."""
    layout = "i8" if abits == 8 else "i4"

    def build():
        codes = pw.codes()
        if c_padded is not None:  # [O, kh*kw*C] -> [O, kh*kw*Cp], channel padding = zero point
            o, cg, kh, kw = pw.shape
            taps = codes.reshape(o, kh * kw, cg)
            padded = pw.zero_point.to(torch.uint8)[:, None, None].expand(o, kh * kw, c_padded).clone()
            padded[:, :, :cg] = taps
            codes = padded.reshape(o, kh * kw * c_padded)
        return build_gemm_weight(codes, pw.zero_point, pw.bits, layout)

    return _cached(pw, ("gemm", layout, c_padded), build)


@dataclass(frozen=True)
class DepthwiseWeight:
    data: torch.Tensor  # int8 [kh*kw, C]: w - zw


def depthwise_weight(pw: PackedWeight) -> DepthwiseWeight:
    slot_bits_of(pw.bits)  # (w - zw) must fit int8

    def build():
        return DepthwiseWeight(pw.int_matrix().t().contiguous().to(torch.int8))

    return _cached(pw, ("depthwise",), build)


def _gemm_weight_args(cw: CudaWeight):
    return (cw.data, cw.zero4, cw.w_sum, cw.cdelta, cw.need_row_sums)


# ----------------------------------------------------------------------------- activations

def _act_params(act: ActQuant, device):
    scale = act.scale.reshape(1).to(device=device, dtype=torch.float32)
    zp = act.zero_point.reshape(1).to(device=device, dtype=torch.int32)
    return scale, zp


def _quantize_rows(x2d: torch.Tensor, act: ActQuant, row_bytes: int, marks: torch.Tensor | None = None):
    """Codes ``[M, row_bytes]`` (packed, zero tail) plus the scale / zero point used. ``marks`` (fp32 ``[M]``),
    when given, receives 0 or NaN per row (NaN: the row holds a NaN / Inf), from the same launch."""
    x = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    if act.per_token:
        return _ops().cuda_quantize_rows(x, None, None, act.bits, True, act.symmetric, row_bytes, marks)
    scale, zp = _act_params(act, x.device)
    data, _, _ = _ops().cuda_quantize_rows(x, ref.inv_scale(scale), zp, act.bits, False, False, row_bytes, marks)
    return data, scale, zp


def quantize_activation(x2d: torch.Tensor, act: ActQuant) -> PackedActivation:
    _require_cuda(x2d)
    require_float("x", x2d)
    kb = packed_width(x2d.shape[1], act.bits)
    data, scale, zp = _quantize_rows(x2d, act, _round_up(max(kb, 1), 16))
    if data.shape[1] != kb:
        data = data[:, :kb].contiguous()
    return PackedActivation(data, scale, zp, act.bits, x2d.shape[1])


def _gemm_rows(data: torch.Tensor) -> torch.Tensor:
    """Packed rows as the GEMM reads them: contiguous, 16-byte aligned, a multiple of 16 bytes long."""
    if data.is_contiguous() and data.shape[1] % 16 == 0 and data.data_ptr() % 16 == 0 and data.shape[1] > 0:
        return data
    out = torch.zeros(data.shape[0], _round_up(max(data.shape[1], 1), 16), dtype=torch.uint8, device=data.device)
    out[:, :data.shape[1]] = data
    return out


# ----------------------------------------------------------------------------- GEMM

def linear_int(pa: PackedActivation, pw: PackedWeight) -> torch.Tensor:
    dev = _require_cuda(pa.data)
    cw = gemm_weight(pw, pa.bits)
    zp = pa.zero_point.reshape(-1).to(device=dev, dtype=torch.int32).contiguous()
    return _ops().cuda_packed_gemm(_gemm_rows(pa.data), zp, None, *_gemm_weight_args(cw), None, None, cw.n,
                                   cw.k_chunks, cw.slot_bits, _gemm_path(pa.bits, dev), None)


def _out_dtype(out_dtype, x):
    out_dtype = out_dtype or x.dtype
    if out_dtype not in KERNEL_FLOATS:
        raise Unsupported(f"out_dtype {out_dtype} (the CUDA epilogue writes float32, float16 or bfloat16)")
    return out_dtype


def _bias(bias):
    return None if bias is None else bias.reshape(-1).float().contiguous()


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if act is None:
        raise Unsupported("weight-only (float activation) Linear")
    dev = _require_cuda(x)
    require_float("x", x)
    out_dtype = _out_dtype(out_dtype, x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, pw.k)
    cw = gemm_weight(pw, act.bits)
    # Non-finite inputs: the quantize launch marks rows holding NaN / Inf (0 / NaN per row) and the GEMM
    # epilogue adds the mark to the activation scale, so those output rows are NaN (reference.linear).
    marks = torch.empty(x2d.shape[0], dtype=torch.float32, device=dev)
    data, scale, zp = _quantize_rows(x2d, act, _round_up(max(packed_width(pw.k, act.bits), 1), 16), marks)
    y = _ops().cuda_packed_gemm(data, zp, scale, *_gemm_weight_args(cw), pw.scale.float().contiguous(), _bias(bias),
                                cw.n, cw.k_chunks, cw.slot_bits, _gemm_path(act.bits, dev), out_dtype, marks)
    return y.reshape(*lead, pw.n)


# ----------------------------------------------------------------------------- conv

def _geometry(pw: PackedWeight, stride, padding, dilation) -> list[int]:
    _, _, kh, kw = pw.shape
    return [kh, kw, *pair(stride, "stride"), *pair(padding, "padding"), *pair(dilation, "dilation")]


def _conv_kind(c: int, pw: PackedWeight, groups: int) -> str:
    o, cg = pw.shape[0], pw.shape[1]
    if groups == 1:
        return "gemm"
    if groups == c and o == c and cg == 1:
        return "depthwise"
    raise Unsupported(f"grouped conv with groups={groups} (only groups=1 and depthwise)")


def _nchw(y_nhwc: torch.Tensor) -> torch.Tensor:
    # NCHW shape with channels-last strides: no copy, and the natural input of the next layer.
    return y_nhwc.permute(0, 3, 1, 2)


def conv2d_int(x_codes: torch.Tensor, x_zero_point: torch.Tensor, pw: PackedWeight, stride=1, padding=0,
               dilation=1, groups: int = 1) -> torch.Tensor:
    kind = _conv_kind(x_codes.shape[1], pw, groups)
    dev = _require_cuda(x_codes)
    if x_codes.dtype != torch.uint8:
        raise Unsupported(f"x_codes dtype {x_codes.dtype} (the CUDA conv reads uint8 codes)")
    geom = _geometry(pw, stride, padding, dilation)
    za = x_zero_point.reshape(1).to(device=dev, dtype=torch.int32)
    n, c, h, w = x_codes.shape
    if kind == "depthwise":
        x = x_codes.permute(0, 2, 3, 1).contiguous()
        return _nchw(_ops().cuda_depthwise_conv(x, za, None, depthwise_weight(pw).data, None, None, geom, None))
    cp = _round_up(c, 16)  # A8: 16 channels = one 16-byte load
    x = torch.empty(n, h, w, cp, dtype=torch.uint8, device=dev)
    x[..., :c] = x_codes.permute(0, 2, 3, 1)
    x[..., c:] = za.to(torch.uint8)  # padded channels: any code works (their weights are w = zw)
    cw = gemm_weight(pw, 8, cp)
    return _nchw(_ops().cuda_packed_conv(x, za, None, *_gemm_weight_args(cw), None, None, cw.n, cw.k_chunks,
                                         cw.slot_bits, PATH_A8, geom, cp, None))


def conv2d(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, act: ActQuant | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    kind = _conv_kind(x.shape[1], pw, groups)
    dev = _require_cuda(x)
    if act is None:
        raise Unsupported("weight-only (float activation) Conv2d")
    require_float("x", x)
    require_integer_dtype("act.zero_point", act.zero_point)
    out_dtype = _out_dtype(out_dtype, x)
    geom = _geometry(pw, stride, padding, dilation)
    scale, za = _act_params(act, dev)
    inv = ref.inv_scale(scale)
    c = x.shape[1]
    # Non-finite inputs: the quantize launch stores NaN into a zero-filled per-pixel mark for pixels holding a
    # NaN / Inf; the conv epilogue adds its window's marks (0 or NaN) to the activation scale (reference.conv2d).
    marks = torch.zeros(x.shape[0] * x.shape[2] * x.shape[3], dtype=torch.float32, device=dev)
    if kind == "depthwise":
        xq = _ops().cuda_quantize_image(x, inv, za, act.bits, False, c, marks)
        y = _ops().cuda_depthwise_conv(xq, za, scale, depthwise_weight(pw).data, pw.scale.float().contiguous(),
                                       _bias(bias), geom, out_dtype, marks)
        return _nchw(y)
    cp = _round_up(c, 16 if act.bits == 8 else 32)
    xq = _ops().cuda_quantize_image(x, inv, za, act.bits, act.bits == 4, cp, marks)
    cw = gemm_weight(pw, act.bits, cp)
    y = _ops().cuda_packed_conv(xq, za, scale, *_gemm_weight_args(cw), pw.scale.float().contiguous(), _bias(bias),
                                cw.n, cw.k_chunks, cw.slot_bits, _gemm_path(act.bits, dev), geom, cp, out_dtype,
                                marks)
    return _nchw(y)


# ----------------------------------------------------------------------------- attention matmul

MATMUL_OP = "cuda_matmul_int"  # looked up on its own: an extension built before it keeps the other ops


@functools.lru_cache(maxsize=None)
def extension_has_matmul() -> bool:
    """True when ``dfqkern._C`` registers a CUDA kernel for :data:`MATMUL_OP`."""
    try:
        return extension_has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(f"dfqkern::{MATMUL_OP}", "CUDA")
    except Exception:  # an extension that never defined the op
        return False


def batched_operands(a: torch.Tensor, a_zero_point: torch.Tensor, b: torch.Tensor, b_zero_point: torch.Tensor):
    """Contract-checked :func:`reference.matmul_int` operands with their leading dims flattened into one batch:
    ``(a [B, M, K], za [B, M], b [B, K, N], zb [B, N])``. Codes are views where their strides allow (copies
    otherwise); zero points are int32 views, stride 0 where they broadcast. Shared with the Triton backend."""
    lead = a.shape[:-2]
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = math.prod(lead)

    def vectors(z: torch.Tensor, size: int, free_dim: int) -> torch.Tensor:
        z = z.to(torch.int32)
        if z.numel() == 1:
            return z.reshape(1, 1).expand(batch, size)
        full = [*lead, size, size]
        full[free_dim] = 1  # a's zero point is [..., M, 1], b's [..., 1, N]
        return z.expand(full).reshape(batch, size)

    return (a.reshape(batch, m, k), vectors(a_zero_point, m, -1), b.reshape(batch, k, n),
            vectors(b_zero_point, n, -2))


def matmul_int(a: torch.Tensor, a_zero_point: torch.Tensor, b: torch.Tensor,
               b_zero_point: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``(a - za) @ (b - zb)`` (``csrc/cuda/matmul_int.cu``: one launch for every batch element)."""
    _require_cuda(a)
    if not extension_has_matmul():
        raise Unsupported(f"this build of dfqkern._C has no {MATMUL_OP} (rebuild the extension)")
    out = _ops().cuda_matmul_int(*batched_operands(a, a_zero_point, b, b_zero_point))
    return out.reshape(*a.shape[:-1], b.shape[-1])


# ----------------------------------------------------------------------------- fake-quant / AdaRound

def _channels(x: torch.Tensor, axis) -> tuple[int, int]:
    """``(channels, inner)`` of the ``[outer, channels, inner]`` view."""
    if axis is None:
        return 1, max(x.numel(), 1)
    axis = axis % x.dim()
    return x.shape[axis], max(math.prod(x.shape[axis + 1:]), 1)


def _flat_params(scale, zero_point):
    s = scale.reshape(-1).float().contiguous()
    return s, ref.inv_scale(s).contiguous(), zero_point.reshape(-1).to(torch.int32).contiguous()


def _common_float(a: torch.Tensor, b: torch.Tensor):
    """Both tensors in one kernel dtype (float32 when they differ: exact, as the reference upcasts)."""
    require_float("input", a)
    require_float("grad", b)
    if a.dtype == b.dtype:
        return a.contiguous(), b.contiguous()
    return a.float().contiguous(), b.float().contiguous()


def fake_quant_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                       axis: int | None = None, drop_prob: float = 0.0, seed: int = 0) -> torch.Tensor:
    _require_cuda(x)
    require_float("x", x)
    channels, inner = _channels(x, axis)
    thr = ref.drop_threshold(drop_prob) if drop_prob > 0 else 0
    s, inv, zp = _flat_params(scale, zero_point)
    return _ops().cuda_fake_quant_forward(x.contiguous(), s, inv, zp, bits, channels, inner, thr, int(seed) & _MASK32)


def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        bits: int, axis: int | None = None, grad_scale: float = 1.0, drop_prob: float = 0.0,
                        seed: int = 0):
    _require_cuda(x)
    channels, inner = _channels(x, axis)
    thr = ref.drop_threshold(drop_prob) if drop_prob > 0 else 0
    s, inv, zp = _flat_params(scale, zero_point)
    xk, gk = _common_float(x, grad)
    gx, ds, dz = _ops().cuda_fake_quant_backward(gk, xk, s, inv, zp, bits, channels, inner, thr, int(seed) & _MASK32)
    return gx.to(x.dtype), ds * grad_scale, dz * grad_scale


def _adaround_inputs(base, v, scale, zero_point, bits, axis):
    _require_cuda(v)
    channels, inner = _channels(v, axis)
    s, _, zp = _flat_params(scale, zero_point)
    return base.float().contiguous(), s, zp, channels, inner


def adaround_forward(base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     bits: int, axis: int = 0, beta: float = 2.0, hard: bool = False):
    b, s, zp, channels, inner = _adaround_inputs(base, v, scale, zero_point, bits, axis)
    require_float("v", v)
    return _ops().cuda_adaround_forward(b, v.contiguous(), s, zp, bits, channels, inner, float(beta), bool(hard))


def adaround_backward(grad: torch.Tensor, base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor, bits: int, axis: int = 0, beta: float = 2.0,
                      reg_grad: float = 0.0):
    b, s, zp, channels, inner = _adaround_inputs(base, v, scale, zero_point, bits, axis)
    vk, gk = _common_float(v, grad)
    gv, gs = _ops().cuda_adaround_backward(gk, b, vk, s, zp, bits, channels, inner, float(beta), float(reg_grad))
    return gv.to(v.dtype), gs
