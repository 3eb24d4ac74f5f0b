"""Differentiable quantization ops: torch custom ops whose forward and backward go through dispatch.

``fake_quant`` and ``adaround`` are registered with ``torch.library.custom_op`` (with fake
implementations and autograd formulas), so ``torch.compile`` traces models that use them and
every backend (reference, cpu, triton, cuda) serves both directions. The ``backend`` argument
forces one backend (strict); ``None`` picks automatically by device (see kernels.dispatch).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .formats import PackedWeight
from .kernels import contract, dispatch
from .kernels.contract import Unsupported
from .kernels.reference import ActQuant


# ----------------------------------------------------------------------------- fake-quant

@torch.library.custom_op("dfqkern::fake_quant", mutates_args=())
def _fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: Optional[int], grad_scale: float,
                drop_prob: float, seed: int, backend: Optional[str]) -> Tensor:
    return dispatch.fake_quant_forward(x, scale, zero_point, bits, axis, drop_prob, seed, backend=backend)


@_fake_quant.register_fake
def _(x, scale, zero_point, bits, axis, grad_scale, drop_prob, seed, backend):
    return torch.empty_like(x)


@torch.library.custom_op("dfqkern::fake_quant_backward", mutates_args=())
def _fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: Optional[int],
                         grad_scale: float, drop_prob: float, seed: int,
                         backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    gx, gs, gz = dispatch.fake_quant_backward(grad, x, scale, zero_point, bits, axis, grad_scale, drop_prob, seed,
                                              backend=backend)
    return gx, gs.reshape(scale.shape).to(scale.dtype), gz.reshape(zero_point.shape).float()


@_fake_quant_backward.register_fake
def _(grad, x, scale, zero_point, bits, axis, grad_scale, drop_prob, seed, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty(zero_point.shape, device=x.device)


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, bits, axis, grad_scale, drop_prob, seed, backend = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (bits, axis, grad_scale, drop_prob, seed, backend)


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    gx, gs, gz = _fake_quant_backward(grad.contiguous(), x, scale, zero_point, *ctx.args)
    gz = gz.to(zero_point.dtype) if zero_point.dtype.is_floating_point else None
    return gx, gs, gz, None, None, None, None, None, None


_fake_quant.register_autograd(_fq_backward, setup_context=_fq_setup)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: int | None = None,
               grad_scale: float = 1.0, drop_prob: float = 0.0, seed: int = 0, backend: str | None = None) -> Tensor:
    """Differentiable fake quantization: STE for ``x``, LSQ gradients for ``scale`` (and a float ``zero_point``).

    ``drop_prob`` > 0 applies QDrop: each element keeps its float value with that probability,
    from a counter-based hash of (``seed``, element index), identical on every backend.
    """
    return _fake_quant(x.contiguous(), scale, zero_point, bits, axis, float(grad_scale), float(drop_prob), int(seed),
                       None if backend is None else str(getattr(backend, "value", backend)))


# ----------------------------------------------------------------------------- AdaRound

@torch.library.custom_op("dfqkern::adaround", mutates_args=())
def _adaround(base: Tensor, v: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: int, beta: float,
              hard: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    w, reg = dispatch.adaround_forward(base, v, scale, zero_point, bits, axis, beta, hard, backend=backend)
    return w, reg.reshape(()).float()


@_adaround.register_fake
def _(base, v, scale, zero_point, bits, axis, beta, hard, backend):
    return torch.empty_like(v), v.new_empty((), dtype=torch.float32)


@torch.library.custom_op("dfqkern::adaround_backward", mutates_args=())
def _adaround_backward(grad: Tensor, base: Tensor, v: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: int,
                       beta: float, reg_grad: Tensor, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    # reg_grad stays a tensor up to here so tracing (torch.compile backward) never needs its value
    gv, gs = dispatch.adaround_backward(grad, base, v, scale, zero_point, bits, axis, beta, float(reg_grad),
                                        backend=backend)
    return gv, gs.reshape(scale.shape).to(scale.dtype)


@_adaround_backward.register_fake
def _(grad, base, v, scale, zero_point, bits, axis, beta, reg_grad, backend):
    return torch.empty_like(v), torch.empty_like(scale)


def _ar_setup(ctx, inputs, output):
    base, v, scale, zero_point, bits, axis, beta, hard, backend = inputs
    if hard:
        ctx.hard = True
        return
    ctx.hard = False
    ctx.save_for_backward(base, v, scale, zero_point)
    ctx.args = (bits, axis, beta, backend)


def _ar_backward(ctx, grad_w, grad_reg):
    if ctx.hard:
        raise RuntimeError("hard AdaRound rounding has no gradient; calibrate with hard=False")
    base, v, scale, zero_point = ctx.saved_tensors
    bits, axis, beta, backend = ctx.args
    if grad_w is None:
        grad_w = torch.zeros_like(v)
    reg_grad = torch.zeros((), device=v.device) if grad_reg is None else grad_reg.reshape(())
    gv, gs = _adaround_backward(grad_w.contiguous(), base, v, scale, zero_point, bits, axis, beta, reg_grad, backend)
    return None, gv, gs, None, None, None, None, None, None


_adaround.register_autograd(_ar_backward, setup_context=_ar_setup)


def adaround(base: Tensor, v: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: int = 0, beta: float = 2.0,
             hard: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """AdaRound weight and rounding regularizer ``(w_hat, reg)``; differentiable in ``v`` and ``scale``."""
    return _adaround(base.contiguous(), v.contiguous(), scale, zero_point, bits, axis, float(beta), bool(hard),
                     None if backend is None else str(getattr(backend, "value", backend)))


# ----------------------------------------------------------------------------- packed inference ops
# Registered as custom ops too, so torch.compile treats a packed layer as one opaque kernel call
# instead of tracing into the Python dispatch. Inference only: their backward raises, saying so.

# id(data) -> (weakref to data, versions, scale, zero, bits, k, the backend-layout cache). Not the
# PackedWeight itself: it holds ``data``, and a global holding that would keep every packed weight alive
# for the whole process. Tensors hash elementwise, hence the id key.
_PACKED_VIEWS: dict[int, tuple] = {}


def _versions(*tensors) -> tuple:
    """In-place write counters and storage addresses (``.data =`` and ``Module.to`` swap the storage without
    a write); ``None`` for inference tensors, which keep no counter."""
    try:
        return tuple((t._version, t.data_ptr()) for t in tensors)
    except RuntimeError:
        return None


def packed_weight_view(data: Tensor, scale: Tensor, zero: Tensor, bits: int, k: int, shape) -> PackedWeight:
    """A PackedWeight over these buffers whose backend layouts (``PackedWeight.cache``) are kept per ``data``
    tensor, so they are derived once, not per call. An in-place write to ``data`` or ``zero``
    (``load_state_dict`` copies into the buffers) or a storage swap makes a new one, so no layout derived
    from the old codes is served."""
    entry = _PACKED_VIEWS.get(id(data))
    versions = _versions(data, zero)
    if entry is None or entry[0]() is not data or entry[1] != versions or entry[2] is not scale \
            or entry[3] is not zero or entry[4] != bits or entry[5] != k:
        key, views = id(data), _PACKED_VIEWS

        def forget(ref):  # drop the entry when its tensor dies (unless the id was reused since)
            if views.get(key, (None,))[0] is ref:
                del views[key]

        entry = views[key] = (weakref.ref(data, forget), versions, scale, zero, bits, k, {})
    return PackedWeight(data, scale, zero, bits, k, tuple(shape), cache=entry[6])


def _act(a_scale, a_zero, abits, per_token, symmetric):
    if abits == 0:
        return None
    if per_token:
        return ActQuant(abits, per_token=True, symmetric=symmetric)
    return ActQuant(abits, a_scale, a_zero, symmetric=symmetric)


def _packed_linear_impl(x: Tensor, data: Tensor, w_scale: Tensor, w_zero: Tensor, wbits: int, k: int,
                        bias: Optional[Tensor], a_scale: Tensor, a_zero: Tensor, abits: int, per_token: bool,
                        act_symmetric: bool, backend: Optional[str]) -> Tensor:
    pw = packed_weight_view(data, w_scale, w_zero, wbits, k, (data.shape[0], k))
    # outputs must be fresh contiguous tensors: the fake impl promises that layout to torch.compile
    return dispatch.linear(x, pw, bias, _act(a_scale, a_zero, abits, per_token, act_symmetric),
                           backend=backend).contiguous()


_packed_linear = torch.library.custom_op("dfqkern::packed_linear", mutates_args=())(_packed_linear_impl)


@_packed_linear.register_fake
def _(x, data, w_scale, w_zero, wbits, k, bias, a_scale, a_zero, abits, per_token, act_symmetric, backend):
    return x.new_empty((*x.shape[:-1], data.shape[0]))


def _packed_conv2d_impl(x: Tensor, data: Tensor, w_scale: Tensor, w_zero: Tensor, wbits: int,
                        weight_shape: list[int], bias: Optional[Tensor], a_scale: Tensor, a_zero: Tensor, abits: int,
                        act_symmetric: bool, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        backend: Optional[str]) -> Tensor:
    k = weight_shape[1] * weight_shape[2] * weight_shape[3]
    pw = packed_weight_view(data, w_scale, w_zero, wbits, k, weight_shape)
    return dispatch.conv2d(x, pw, bias, _act(a_scale, a_zero, abits, False, act_symmetric), tuple(stride),
                           tuple(padding), tuple(dilation), groups, backend=backend).contiguous()


_packed_conv2d = torch.library.custom_op("dfqkern::packed_conv2d", mutates_args=())(_packed_conv2d_impl)


@_packed_conv2d.register_fake
def _(x, data, w_scale, w_zero, wbits, weight_shape, bias, a_scale, a_zero, abits, act_symmetric, stride, padding,
      dilation, groups, backend):
    n, _, h, w = x.shape
    kh, kw = weight_shape[2], weight_shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight_shape[0], ho, wo))


def _packed_backward(ctx, grad):
    raise RuntimeError(
        "dfqkern packed layers are inference-only: no gradient flows through packed integer weights. Run the "
        "packed model under torch.no_grad() / torch.inference_mode(); to train or calibrate, use the fake-quant "
        "model (before pack_model / save_quantized)")


# a backward that explains, instead of torch's generic "no autograd formula was registered"
_packed_linear.register_autograd(_packed_backward)
_packed_conv2d.register_autograd(_packed_backward)


# ----------------------------------------------------------------------------- packed attention
# A packed attention module's integer steps (operand codes, the two matmuls) as custom ops with fake
# implementations, so torch.export / torch.compile record each as one call (the backend kernels read
# raw tensor data, which fake tensors have not). Eager calls skip the custom-op wrapper.

def _quantize_codes_impl(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: Optional[int],
                         backend: Optional[str]) -> Tensor:
    return dispatch.quantize(x, scale, zero_point, bits, axis, backend=backend).contiguous()


_quantize_codes = torch.library.custom_op("dfqkern::quantize_codes", mutates_args=())(_quantize_codes_impl)


@_quantize_codes.register_fake
def _(x, scale, zero_point, bits, axis, backend):
    return torch.empty_like(x, dtype=torch.uint8, memory_format=torch.contiguous_format)


def _matmul_int_impl(a: Tensor, a_zero_point: Tensor, b: Tensor, b_zero_point: Tensor,
                     backend: Optional[str]) -> Tensor:
    return dispatch.matmul_int(a, a_zero_point, b, b_zero_point, backend=backend).contiguous()


_matmul_int = torch.library.custom_op("dfqkern::matmul_int", mutates_args=())(_matmul_int_impl)


@_matmul_int.register_fake
def _(a, a_zero_point, b, b_zero_point, backend):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


def quantize_codes(x, scale, zero_point, bits, axis=None, backend=None) -> Tensor:
    """Integer codes of ``x`` (dispatch.quantize) as one custom op when traced."""
    op = _quantize_codes if torch.compiler.is_compiling() else _quantize_codes_impl
    return op(x, scale, zero_point, bits, axis, backend)


def matmul_int(a, a_zero_point, b, b_zero_point, backend=None) -> Tensor:
    """Exact int32 ``(a - a_zp) @ (b - b_zp)`` of code tensors (dispatch.matmul_int) as one custom op when traced."""
    op = _matmul_int if torch.compiler.is_compiling() else _matmul_int_impl
    return op(a, a_zero_point, b, b_zero_point, backend)


def packed_linear(x, data, w_scale, w_zero, wbits, k, bias=None, a_scale=None, a_zero=None, abits=None,
                  per_token=False, act_symmetric=False, backend=None):
    """Packed Linear through the dispatch, as one custom op (``abits=None``: weight-only)."""
    a_scale, a_zero = _act_tensors(x, a_scale, a_zero)
    op = _packed_linear_impl if eager_inference(x, bias) else _packed_linear
    return op(x, data, w_scale, w_zero, wbits, k, bias, a_scale, a_zero, abits or 0, per_token,
                          act_symmetric, backend)


def packed_conv2d(x, data, w_scale, w_zero, wbits, weight_shape, bias=None, a_scale=None, a_zero=None, abits=None,
                  act_symmetric=False, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, backend=None):
    """Packed Conv2d through the dispatch, as one custom op (``abits=None``: weight-only)."""
    a_scale, a_zero = _act_tensors(x, a_scale, a_zero)
    op = _packed_conv2d_impl if eager_inference(x, bias) else _packed_conv2d
    return op(x, data, w_scale, w_zero, wbits, list(weight_shape), bias, a_scale, a_zero, abits or 0,
                          act_symmetric, list(stride), list(padding), list(dilation), groups, backend)


# ----------------------------------------------------------------------------- eager calls, resolved once
# At batch 1 a small conv's kernel takes tens of microseconds, and re-deriving its arguments per call
# (PackedWeight view, ActQuant, the contract's static part, the backend choice, list <-> tuple round
# trips) cost about as much again. A packed layer keeps a PackedCall for its eager inference forward
# (see nn.base.QuantLayer.packed_forward): per call only the input is checked and the backend function runs.

def tensor_tokens(tensors) -> list:
    # contract.cached's rule: the same object, no in-place write (_version), no storage swap (.data =,
    # Module.to); RuntimeError for inference-mode tensors, which keep no version counter
    return [None if t is None else (id(t), t._version, t.data_ptr()) for t in tensors]


class ResolvedCall:
    """A call built once from some tensors and ``key`` (what its caller read besides tensors, e.g.
    ``$DFQKERN_BACKEND``); valid while :meth:`matches`. Shared by packed layers and packed attention."""

    __slots__ = ("key", "tensors", "tokens")

    def __init__(self, key, tensors, tokens):
        # holding the tensors keeps their ids from being reused while the tokens are compared
        self.key, self.tensors, self.tokens = key, tensors, tokens

    def matches(self, key, tensors) -> bool:
        if key != self.key:
            return False
        try:
            return tensor_tokens(tensors) == self.tokens
        except RuntimeError:
            return False


class PackedCall(ResolvedCall):
    """A packed layer's eager inference call with everything but the input resolved."""

    __slots__ = ("run",)

    def __init__(self, key, tensors, tokens, run):
        super().__init__(key, tensors, tokens)
        self.run = run


def _resolved(op: str, device, backend, direct, generic):
    """``run(x)``: ``direct`` (the input checks, then the first backend's function) with dispatch's
    fallback (``generic``) where that backend declines (``Unsupported``) or none is available."""
    fn, strict = dispatch.first_function(op, device.type, backend)
    if fn is None:
        return generic

    def run(x):
        try:
            return direct(fn, x)
        except Unsupported:
            if strict:
                raise
        return generic(x)

    return run


def _conv_call_args(data, w_scale, w_zero, wbits, weight_shape, a_scale, a_zero, abits, act_symmetric, stride,
                    padding, dilation):
    """``(pw, act, stride, padding, dilation)`` of a packed conv's bound call (eager or frozen); ``act`` is ``None``
    for a weight-only layer, ``a_scale`` detached for the kernels."""
    weight_shape = tuple(weight_shape)
    pw = packed_weight_view(data, w_scale, w_zero, wbits, weight_shape[1] * weight_shape[2] * weight_shape[3],
                            weight_shape)
    act = None if not abits else ActQuant(abits, a_scale.detach(), a_zero, symmetric=act_symmetric)
    return pw, act, tuple(stride), tuple(padding), tuple(dilation)


def packed_conv2d_call(key, data, w_scale, w_zero, wbits, weight_shape, bias, a_scale, a_zero, abits,
                       act_symmetric, stride, padding, dilation, groups, backend) -> "PackedCall | None":
    """The :class:`PackedCall` of :func:`packed_conv2d` with these arguments, or ``None`` where a tensor keeps
    no version counter (inference mode). ``a_scale`` may be the layer's learnable parameter: it is matched as
    given and detached for the kernels. Raises the contract's error for the arguments other than the input."""
    tensors = (data, w_scale, w_zero, bias, a_scale, a_zero)
    try:
        tokens = tensor_tokens(tensors)
    except RuntimeError:
        return None
    pw, act, stride, padding, dilation = _conv_call_args(data, w_scale, w_zero, wbits, weight_shape, a_scale, a_zero,
                                                         abits, act_symmetric, stride, padding, dilation)
    static = contract.conv2d_static(pw, bias, act, stride, padding, dilation, groups)
    check_input = contract.conv2d_input

    def direct(fn, x):
        check_input(x, pw, bias, static, stride, padding, dilation, groups)
        return fn(x, pw, bias, act, stride, padding, dilation, groups)

    def generic(x):
        return dispatch.conv2d(x, pw, bias, act, stride, padding, dilation, groups, backend=backend)

    return PackedCall(key, tensors, tokens, _resolved("conv2d", data.device, backend, direct, generic))


def frozen_conv2d_call(data, w_scale, w_zero, wbits, weight_shape, bias, a_scale, a_zero, abits, act_symmetric,
                       stride, padding, dilation, groups, backend, relu: bool = False):
    """The packed conv with these arguments as one C++ call ``f(x, residual=None)`` =
    ``relu(conv(x) + residual)`` with every tensor read now (``dfqkern.compile(mode="frozen")``; it raises once
    one of them has been written in place since), or ``None``
    where the backend :func:`packed_conv2d_call` would choose first is not the CPU backend, or the CPU backend
    declines these arguments (weight-only, per-token). The contract's checks of the arguments run here."""
    name = dispatch.first_backend("conv2d", data.device.type, backend)
    if name != dispatch.Backend.CPU.value or not abits:
        return None
    pw, act, stride, padding, dilation = _conv_call_args(data, w_scale, w_zero, wbits, weight_shape, a_scale, a_zero,
                                                         abits, act_symmetric, stride, padding, dilation)
    watch = (data, w_scale, w_zero, bias, a_scale, a_zero)
    bias = None if bias is None else bias.detach()
    contract.conv2d_static(pw, bias, act, stride, padding, dilation, groups)
    try:
        return dispatch.backend_module(dispatch.Backend.CPU).conv2d_call(pw, bias, act, stride, padding, dilation,
                                                                         groups, relu=relu, watch=watch)
    except Unsupported:
        return None


def frozen_linear_call(data, w_scale, w_zero, wbits, k, bias, a_scale, a_zero, abits, per_token, act_symmetric,
                       backend):
    """:func:`frozen_conv2d_call` for :func:`packed_linear`: one C++ call ``f(x)``, or ``None`` where the CPU
    backend would not run it first or declines it (weight-only, per-token)."""
    name = dispatch.first_backend("linear", data.device.type, backend)
    if name != dispatch.Backend.CPU.value or not abits or per_token:
        return None
    pw = packed_weight_view(data, w_scale, w_zero, wbits, k, (data.shape[0], k))
    act = ActQuant(abits, a_scale.detach(), a_zero, symmetric=act_symmetric)
    watch = (data, w_scale, w_zero, bias, a_scale, a_zero)
    bias = None if bias is None else bias.detach()
    contract.linear_static(pw, bias)
    try:
        return dispatch.backend_module(dispatch.Backend.CPU).linear_call(pw, bias, act, watch=watch)
    except Unsupported:
        return None


def packed_linear_call(key, data, w_scale, w_zero, wbits, k, bias, a_scale, a_zero, abits, per_token,
                       act_symmetric, backend) -> "PackedCall | None":
    """:func:`packed_conv2d_call` for :func:`packed_linear` (``a_scale`` / ``a_zero`` ``None`` when per token)."""
    tensors = (data, w_scale, w_zero, bias, a_scale, a_zero)
    try:
        tokens = tensor_tokens(tensors)
    except RuntimeError:
        return None
    pw = packed_weight_view(data, w_scale, w_zero, wbits, k, (data.shape[0], k))
    act = (None if not abits else ActQuant(abits, per_token=True, symmetric=act_symmetric) if per_token else
           ActQuant(abits, a_scale.detach(), a_zero, symmetric=act_symmetric))
    static = contract.linear_static(pw, bias)
    check_input = contract.linear_input

    def direct(fn, x):
        check_input(x, pw, bias, static)
        return fn(x, pw, bias, act)

    def generic(x):
        return dispatch.linear(x, pw, bias, act, backend=backend)

    return PackedCall(key, tensors, tokens, _resolved("linear", data.device, backend, direct, generic))


def eager_inference(x, bias) -> bool:
    # Outside torch.compile and without autograd the custom-op wrapper only adds latency (~10-20 us
    # a call, as much as a small conv's kernel at batch 1): call the implementation directly. With
    # grad-requiring inputs the op keeps going through the custom op, as before.
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad))


def _act_tensors(x, a_scale, a_zero):
    # custom ops take tensors, not None: placeholders for weight-only / per-token layers
    if a_scale is None:
        a_scale = x.new_ones(1, dtype=torch.float32)
    if a_zero is None:
        a_zero = torch.zeros(1, dtype=torch.int32, device=x.device)
    return a_scale, a_zero
