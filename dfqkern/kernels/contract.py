"""The argument contract of every kernel op, checked once, by :func:`dispatch.call`, before any backend runs.

A backend therefore receives arguments that satisfy the contract and only declines what its
kernels do not cover, by raising :class:`Unsupported` (dispatch then tries the next backend).
Every check here names the argument and what is allowed. The checks touch Python attributes and
shapes only: no tensor reads, so no device synchronisation on the latency-bound packed ops (the one
value read, a CPU conv's activation zero point, runs once per value: see :func:`cached`).

Also here: the rounding constants every backend's kernels receive as arguments (one definition),
and the small helpers backends share to decline what they do not implement (:func:`pair`,
:func:`require_float`).
"""
from __future__ import annotations

import math

import torch

from ..formats import PackedActivation, PackedWeight, check_bits, code_max

# ----------------------------------------------------------------------------- rounding constants
# AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1), and the
# smallest scale qparams_from_range returns. Kernels take them as arguments (Triton) or from
# csrc/common/rounding.h, which tests/kernels/test_contract.py holds equal to these values.
ZETA = 1.1
GAMMA = -0.1
SCALE_EPS = 1e-8

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 8)
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels read and write


class Unsupported(NotImplementedError):
    """Raised by a backend for an argument combination it does not implement (dispatch falls back)."""


# ----------------------------------------------------------------------------- shared checks

def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t) -> None:
    check_tensor(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(**tensors) -> None:
    devs = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def check_same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_axis(axis, x: torch.Tensor) -> None:
    if axis is None:
        return
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < max(x.dim(), 1):
        raise ValueError(f"axis must be in [{-x.dim()}, {x.dim() - 1}] or None, got {axis!r}")


def _numel(p) -> int:
    return p.numel() if isinstance(p, torch.Tensor) else torch.as_tensor(p).numel()


def check_param(name: str, p, x: torch.Tensor, axis) -> None:
    """A per-tensor (``axis=None``: one element) or per-channel (``x.shape[axis]`` elements) parameter."""
    n = _numel(p)
    if axis is None:
        if n != 1:
            raise ValueError(f"{name}: per-tensor parameter must have one element, got {n}")
    elif n != x.shape[axis]:
        raise ValueError(f"{name}: per-channel parameter has {n} elements but input has {x.shape[axis]} "
                         f"along axis {axis % x.dim()}")


def check_drop_prob(drop_prob) -> None:
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype}")


def check_weight(pw, conv: bool = False) -> None:
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    if conv and len(pw.shape) != 4:
        raise ValueError(f"weight must be a packed Conv2d weight, got shape {pw.shape}")


def check_bias(bias, n: int) -> None:
    if bias is not None:
        check_float("bias", bias)
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got {bias.numel()}")


# ----------------------------------------------------------------------------- conv geometry

def pair(v, name: str) -> tuple[int, int]:
    """``v`` (an int or a pair of ints) as a pair. A string (``padding='same'``) is for the reference
    only: a backend that calls this declines it with :class:`Unsupported`."""
    if isinstance(v, str):
        raise Unsupported(f"{name}={v!r} (string {name}): this backend takes integers")
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) == 1:
        t = t * 2
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def conv_output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw_), (dh, dw) = stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw_ - dw * (kw - 1) - 1) // sw + 1


def conv_geometry(pw: PackedWeight, stride, padding, dilation, groups) -> tuple:
    """Check the weight-and-geometry part of a convolution (no input needed) and return what the input
    check needs: ``(in_channels, min_h, min_w)``, the smallest input height and width that give an output
    (``0`` for string padding, which the reference resolves)."""
    check_weight(pw, conv=True)
    o, cg, kh, kw = pw.shape
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if o % groups:
        raise ValueError(f"groups={groups} must divide the {o} output channels")
    s, d = pair(stride, "stride"), pair(dilation, "dilation")
    if min(s) < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    if min(d) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        return cg * groups, 0, 0
    p = pair(padding, "padding")
    if min(p) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    # output size >= 1  <=>  input + 2 * pad >= dilated kernel (see conv_output_size)
    return cg * groups, d[0] * (kh - 1) + 1 - 2 * p[0], d[1] * (kw - 1) + 1 - 2 * p[1]


def check_conv_input(x_shape, geometry: tuple, pw: PackedWeight, stride, padding, dilation, groups) -> None:
    """The per-call part: ``x_shape`` (NCHW) against what :func:`conv_geometry` returned."""
    cin, min_h, min_w = geometry
    if x_shape[1] != cin:
        raise ValueError(f"x has {x_shape[1]} channels, weight expects {cin} (groups={groups})")
    if x_shape[2] < min_h or x_shape[3] < min_w:
        kh, kw = pw.shape[2:]
        (dh, dw), p = pair(dilation, "dilation"), pair(padding, "padding")
        raise ValueError(f"x of {x_shape[2]}x{x_shape[3]} with padding {p} is smaller than the dilated kernel "
                         f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}")


def check_conv_geometry(x_shape, pw: PackedWeight, stride, padding, dilation, groups) -> None:
    check_conv_input(x_shape, conv_geometry(pw, stride, padding, dilation, groups), pw, stride, padding, dilation,
                     groups)


# ----------------------------------------------------------------------------- the static part, once
# The packed layers call their op with one weight, one set of activation parameters and one geometry
# at every forward; at batch 1 re-checking those costs as much as a small conv's kernel. So each op's
# checks split into a static part (the weight, bias, activation parameters, geometry), run through
# `cached` and stored in pw.cache["contract"], and a per-call part on the input, kept cheap. A
# PackedWeight's own fields are fixed (re-packing a layer makes a new one, with an empty cache).

def cached(cache: dict, slot, key, tensors, compute):
    """``compute()``, reused while ``key`` (compared with ``==``) and ``tensors`` are unchanged.

    A tensor counts as unchanged while it is the same object with the same ``_version`` (in-place
    writes bump it) and ``data_ptr()`` (``.data =`` and ``Module.to`` swap the storage without
    bumping it); the entry holds the tensors, so neither an id nor an address is reused while it is
    stored. Writes through ``t.data`` escape both: clear ``pw.cache`` after those. One entry per
    ``slot`` (a new key replaces it), so the cache stays bounded whatever the caller passes.
    Inference-mode tensors keep no version counter: with one of those, ``compute()`` runs every call.
    """
    try:
        tokens = [None if t is None else (id(t), t._version, t.data_ptr()) for t in tensors]
    except RuntimeError:
        return compute()
    e = cache.get(slot)
    if e is not None and e[1] == tokens and e[0] == key:
        return e[3]
    r = compute()
    cache[slot] = (key, tokens, tensors, r)
    return r


def _meta(t):
    """What the static checks read of a bias: keyed by this, not by the tensor's identity, because
    AOTInductor's proxy executor hands the ops fresh tensor objects over its constants at every call
    (an identity miss per layer and call made a .pt2 ResNet-20 twice as slow as eager)."""
    return None if t is None else (t.dtype, t.shape, t.device)


def _zero_point_key(zp):
    # _check_act_zero_point reads a single CPU zero point's value; the key holds that value
    if not isinstance(zp, torch.Tensor):
        return zp
    if zp.device.type == "cpu" and zp.numel() == 1:
        return zp.dtype, zp.shape, zp.device, float(zp.reshape(()))
    return zp.dtype, zp.shape, zp.device


def _static(pw, op: str, key, tensors, compute):
    c = pw.cache.get("contract")
    if c is None:
        c = pw.cache["contract"] = {}
    return cached(c, op, key, tensors, compute)


# ----------------------------------------------------------------------------- per-op contracts
# Each has the signature of the reference op of the same name.

def _elementwise(x, scale, zero_point, bits, axis, name="x"):
    check_float(name, x)
    check_bits(bits, WEIGHT_BITS, "bits")
    check_axis(axis, x)
    check_param("scale", scale, x, axis)
    check_param("zero_point", zero_point, x, axis)


def quantize(x, scale, zero_point, bits, axis=None):
    _elementwise(x, scale, zero_point, bits, axis)
    check_same_device(x=x, scale=scale, zero_point=zero_point)


def dequantize(codes, scale, zero_point, axis=None):
    check_tensor("codes", codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    check_axis(axis, codes)
    check_param("scale", scale, codes, axis)
    check_param("zero_point", zero_point, codes, axis)
    check_same_device(codes=codes, scale=scale, zero_point=zero_point)


def fake_quant_forward(x, scale, zero_point, bits, axis=None, drop_prob=0.0, seed=0):
    _elementwise(x, scale, zero_point, bits, axis)
    check_drop_prob(drop_prob)
    check_same_device(x=x, scale=scale, zero_point=zero_point)


def fake_quant_backward(grad, x, scale, zero_point, bits, axis=None, grad_scale=1.0, drop_prob=0.0, seed=0):
    _elementwise(x, scale, zero_point, bits, axis)
    check_float("grad", grad)
    check_same_shape("grad", grad, "x", x)
    check_drop_prob(drop_prob)
    check_same_device(grad=grad, x=x, scale=scale, zero_point=zero_point)


def adaround_forward(base, v, scale, zero_point, bits, axis=0, beta=2.0, hard=False):
    _elementwise(v, scale, zero_point, bits, axis, name="v")
    check_tensor("base", base)
    check_same_shape("base", base, "v", v)
    check_same_device(base=base, v=v, scale=scale, zero_point=zero_point)


def adaround_backward(grad, base, v, scale, zero_point, bits, axis=0, beta=2.0, reg_grad=0.0):
    adaround_forward(base, v, scale, zero_point, bits, axis, beta)
    check_float("grad", grad)
    check_same_shape("grad", grad, "v", v)
    check_same_device(grad=grad, v=v)


def quantize_activation(x2d, act):
    check_float("x", x2d)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x2d.shape)}")
    if not act.per_token:
        check_same_device(x=x2d, act_scale=act.scale, act_zero_point=act.zero_point)


def linear_int(pa, pw):
    if not isinstance(pa, PackedActivation):
        raise TypeError(f"pa must be a PackedActivation, got {type(pa).__name__}")
    check_weight(pw)
    if pa.k != pw.k:
        raise ValueError(f"activation K={pa.k} does not match weight K={pw.k}")
    check_bits(pa.bits, ACT_BITS, "activation bits")
    if pa.data.dtype != torch.uint8:
        raise TypeError(f"activation data must be uint8, got {pa.data.dtype}")
    m = pa.data.shape[0]
    if pa.scale.numel() not in (1, m) or pa.zero_point.numel() != pa.scale.numel():
        raise ValueError(f"activation scale / zero_point must have 1 or M={m} elements, "
                         f"got {pa.scale.numel()} and {pa.zero_point.numel()}")
    check_same_device(activation=pa.data, weight=pw.data)


def _linear_static(pw, bias, out_dtype):
    check_bias(bias, pw.n)
    check_out_dtype(out_dtype)
    check_same_device(weight=pw.data, bias=bias)
    return pw.data.device


def linear_static(pw, bias=None, out_dtype=None):
    """The part of :func:`linear` without the input (cached; see :func:`cached`): returns what
    :func:`linear_input` takes as ``static``."""
    check_weight(pw)
    return _static(pw, "linear", (out_dtype, _meta(bias)), (), lambda: _linear_static(pw, bias, out_dtype))


def linear_input(x, pw, bias, static) -> None:
    """The per-call part of :func:`linear`: the input against ``static`` (from :func:`linear_static`)."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != pw.k:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} input features, weight expects K={pw.k}")
    if x.device != static:
        check_same_device(x=x, weight=pw.data, bias=bias)


def linear(x, pw, bias=None, act=None, out_dtype=None):
    linear_input(x, pw, bias, linear_static(pw, bias, out_dtype))


def _check_act_zero_point(act) -> None:
    zp = act.zero_point
    if zp.device.type == "cpu" and zp.numel() == 1:  # (reading a device tensor would cost a sync)
        z = float(zp.reshape(()))
        if not 0 <= z <= code_max(act.bits):
            raise ValueError(f"act.zero_point must lie in [0, {code_max(act.bits)}] for {act.bits}-bit codes, got {z}")


def conv2d_int(x_codes, x_zero_point, pw, stride=1, padding=0, dilation=1, groups=1):
    check_tensor("x_codes", x_codes)
    if x_codes.dim() != 4:
        raise ValueError(f"x_codes must be NCHW, got shape {tuple(x_codes.shape)}")
    if x_codes.dtype.is_floating_point:
        raise TypeError(f"x_codes must be an integer tensor of codes, got {x_codes.dtype}")
    if _numel(x_zero_point) != 1:
        raise ValueError(f"x_zero_point must have one element, got {_numel(x_zero_point)}")
    check_conv_geometry(x_codes.shape, pw, stride, padding, dilation, groups)
    check_same_device(x_codes=x_codes, x_zero_point=x_zero_point, weight=pw.data)


def _conv2d_static(pw, bias, act, stride, padding, dilation, groups, out_dtype):
    geometry = conv_geometry(pw, stride, padding, dilation, groups)
    check_bias(bias, pw.shape[0])
    check_out_dtype(out_dtype)
    if act is not None:
        if act.per_token:
            raise ValueError("act.per_token is not supported for conv2d; use per-tensor activation quantization")
        _check_act_zero_point(act)
    check_same_device(weight=pw.data, bias=bias)
    return geometry, pw.data.device


def conv2d_static(pw, bias=None, act=None, stride=1, padding=0, dilation=1, groups=1, out_dtype=None):
    """The part of :func:`conv2d` without the input (cached; see :func:`cached`): returns what
    :func:`conv2d_input` takes as ``static``."""
    check_weight(pw, conv=True)
    key = (stride, padding, dilation, groups, out_dtype, _meta(bias),
           None if act is None else (act.bits, act.per_token, _zero_point_key(act.zero_point)))
    return _static(pw, "conv2d", key, (), lambda: _conv2d_static(
        pw, bias, act, stride, padding, dilation, groups, out_dtype))


def conv2d_input(x, pw, bias, static, stride, padding, dilation, groups) -> None:
    """The per-call part of :func:`conv2d`: the input against ``static`` (from :func:`conv2d_static`)."""
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW, got shape {tuple(x.shape)}")
    geometry, device = static
    check_conv_input(x.shape, geometry, pw, stride, padding, dilation, groups)
    if x.device != device:
        check_same_device(x=x, weight=pw.data, bias=bias)


def conv2d(x, pw, bias=None, act=None, stride=1, padding=0, dilation=1, groups=1, out_dtype=None):
    conv2d_input(x, pw, bias, conv2d_static(pw, bias, act, stride, padding, dilation, groups, out_dtype), stride,
                 padding, dilation, groups)


# (a - za) @ (b - zb) of codes stays below 2**31 (int32 result) for 8-bit codes up to this K
MATMUL_MAX_K = (2 ** 31 - 1) // (255 * 255)


def _code_tensor(name: str, t) -> None:
    check_tensor(name, t)
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor of codes, got {t.dtype}")


def _broadcast_zero_point(name: str, zp, shape, free_dim: int) -> None:
    """A zero point broadcastable to ``shape`` with size 1 along ``free_dim`` (per tensor / head / row)."""
    check_tensor(name, zp)
    if zp.dtype.is_floating_point or zp.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {zp.dtype}")
    if zp.numel() == 1:
        return
    want = list(shape)
    want[free_dim] = 1
    if zp.dim() != len(want) or any(z not in (1, w) for z, w in zip(zp.shape, want)):
        raise ValueError(f"{name} of shape {tuple(zp.shape)} must have one element or broadcast to {tuple(want)}")


def matmul_int(a, a_zero_point, b, b_zero_point):
    _code_tensor("a", a)
    _code_tensor("b", b)
    if a.dim() < 2 or b.dim() != a.dim():
        raise ValueError(f"a and b must be [..., M, K] and [..., K, N] with one number of dims, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"a and b must have one batch shape, got {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a has K={a.shape[-1]} but b has K={b.shape[-2]}")
    if a.shape[-1] > MATMUL_MAX_K:
        raise ValueError(f"K={a.shape[-1]} exceeds {MATMUL_MAX_K}, the largest K whose int32 result is exact")
    _broadcast_zero_point("a_zero_point", a_zero_point, a.shape, -1)
    _broadcast_zero_point("b_zero_point", b_zero_point, b.shape, -2)
    check_same_device(a=a, a_zero_point=a_zero_point, b=b, b_zero_point=b_zero_point)


def attention_qkv(qkv, heads, q_mult, scale, zero_point, bits, fine, coarse, levels):
    check_float("qkv", qkv)
    if qkv.dtype != torch.float32:
        raise TypeError(f"qkv must be float32, got {qkv.dtype}")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if qkv.dim() != 3 or qkv.shape[2] == 0 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must be [B, N, 3 * heads * head_dim] with heads={heads}, got shape {tuple(qkv.shape)}")
    check_bits(bits, WEIGHT_BITS, "bits")
    check_tensor("scale", scale)
    check_tensor("zero_point", zero_point)
    if not scale.dtype.is_floating_point:
        raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
    if zero_point.dtype.is_floating_point or zero_point.dtype == torch.bool:
        raise TypeError(f"zero_point must be an integer tensor, got {zero_point.dtype}")
    if scale.numel() not in (3, 3 * heads) or zero_point.numel() != scale.numel():
        raise ValueError(f"scale and zero_point must have 3 (per tensor) or 3 * heads = {3 * heads} (per head) "
                         f"elements, got {scale.numel()} and {zero_point.numel()}")
    if max(qkv.shape[1], qkv.shape[2] // (3 * heads)) > MATMUL_MAX_K:  # the two matmuls' K: tokens, head_dim
        raise ValueError(f"tokens and head_dim must be at most {MATMUL_MAX_K} (exact int32 matmuls), got shape "
                         f"{tuple(qkv.shape)} with heads={heads}")
    if not math.isfinite(q_mult):
        raise ValueError(f"q_mult must be finite, got {q_mult}")
    if not (math.isfinite(fine) and math.isfinite(coarse) and fine > 0 and coarse > 0):
        raise ValueError(f"fine and coarse must be finite and > 0, got {fine} and {coarse}")
    if not isinstance(levels, int) or not 1 <= levels <= 255:
        raise ValueError(f"levels must be an int in [1, 255], got {levels!r}")
    check_same_device(qkv=qkv, scale=scale, zero_point=zero_point)


CHECKS = {name: globals()[name] for name in (
    "quantize", "dequantize", "fake_quant_forward", "fake_quant_backward", "adaround_forward",
    "adaround_backward", "quantize_activation", "linear_int", "linear", "conv2d_int", "conv2d", "matmul_int",
    "attention_qkv")}


def check(op: str, *args, **kwargs) -> None:
    """Raise the contract's error for ``op(*args, **kwargs)`` (TypeError / ValueError naming the argument)."""
    CHECKS[op](*args, **kwargs)


# ----------------------------------------------------------------------------- what a backend declines

def require_integer_dtype(name: str, t: torch.Tensor) -> None:
    """Decline a floating-point zero point (kernels that read it as an integer would truncate a 7.5;
    checking the value would cost a device sync)."""
    if t.dtype.is_floating_point:
        raise Unsupported(f"{name} of dtype {t.dtype}: these kernels take integer zero points")


def require_float(name: str, t: torch.Tensor, allowed=KERNEL_FLOATS, why: str = "") -> None:
    """Decline (Unsupported) a float dtype the backend's kernels do not read or write."""
    if t.dtype not in allowed:
        raise Unsupported(f"{name} dtype {t.dtype}: the kernels take {', '.join(map(str, allowed))}{why}")
