"""Differentiable quantization ops: torch custom ops whose forward and backward go through dispatch.

``fake_quant`` and ``adaround`` are registered with ``torch.library.custom_op`` (with fake
implementations and autograd formulas), so ``torch.compile`` traces models that use them and
every backend (reference, cpu, triton, cuda) serves both directions. The ``backend`` argument
forces one backend (strict); ``None`` picks automatically by device (see kernels.dispatch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import dispatch


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
                       beta: float, reg_grad: float, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    gv, gs = dispatch.adaround_backward(grad, base, v, scale, zero_point, bits, axis, beta, reg_grad, backend=backend)
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
    reg_grad = 0.0 if grad_reg is None else float(grad_reg)
    gv, gs = _adaround_backward(grad_w.contiguous(), base, v, scale, zero_point, bits, axis, beta, reg_grad, backend)
    return None, gv, gs, None, None, None, None, None, None


_adaround.register_autograd(_ar_backward, setup_context=_ar_setup)


def adaround(base: Tensor, v: Tensor, scale: Tensor, zero_point: Tensor, bits: int, axis: int = 0, beta: float = 2.0,
             hard: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """AdaRound weight and rounding regularizer ``(w_hat, reg)``; differentiable in ``v`` and ``scale``."""
    return _adaround(base.contiguous(), v.contiguous(), scale, zero_point, bits, axis, float(beta), bool(hard),
                     None if backend is None else str(getattr(backend, "value", backend)))
