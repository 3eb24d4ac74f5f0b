"""A packed attention module's eager inference call, with everything but the activations resolved once.

At batch 1 a small ViT's attention operands hold a few thousand elements, so the general packed path
(:meth:`dfqkern.nn.attention.QuantAttentionBase._attend_packed`) spends more on argument handling than on
arithmetic (the trained CIFAR ViT, 65 tokens, one thread: ~0.9 ms of a ~1.4 ms attention module, the integer
matmuls ~0.1 ms of it): each of its five dispatch calls runs the contract and the backend choice again, the
softmax steps and their reciprocals are derived per call, and the two-range softmax codes take about fifteen
elementwise passes. An :class:`AttentionCall` keeps, for one module and its current quantizer tensors:

* the backend functions of ``quantize`` and ``matmul_int`` (``dispatch.first_function``; the dispatching op
  where that backend declines, unless it was forced: as :class:`~dfqkern.autograd.PackedCall` does);
* the operands' parameters as the kernels read them, the ``q.k^T`` rescale ``qs * ks``, the softmax steps and
  their reciprocals;
* for a fused ``qkv`` projection (timm layout), the three operand quantizers as one quantize call over the
  projection's output, one scale per q / k / v (per head when the quantizers are).

Measured on that ViT (AVX2 EPYC, one thread, a loaded machine: minima): the attention module's non-Linear
part ~0.31 ms instead of ~0.9 ms; the whole W8A8 forward 0.6-0.7x of the general path's (medians).

Fused ``qkv`` without a mask (the CIFAR ViT's case) and no probabilities asked for: the whole core is one
kernel call, ``dispatch.attention_qkv`` (csrc/cpu/attention.cpp: codes, both integer matmuls, torch's own
softmax, the softmax codes and the epilogue per head; the reference twin is ``reference.attention_qkv``), the
same values bit for bit. Xeon (AVX-512 VNNI), one thread, a loaded machine (medians): the core ~0.065 ms instead
of ~0.18 ms; the whole W8A8 forward 1.7-2.0 ms instead of 3.1-3.3 ms (fp32 eager 1.9-2.5 ms, alternating runs).
With a mask, or the probabilities, the steps below run.

Exact (bit for bit, tested): the same kernels on the same codes, and every float step computes the general
path's values with the same casts, products and roundings (in fewer torch ops: in place, int32 x float32 in
one op, the softmax codes by float arithmetic on their integer-valued levels). The fine and coarse softmax codes
are stacked along the rows and meet ``v`` in one ``matmul_int`` call (its int32 rows are those of the two
calls); a row holding NaN (fully masked) is found by its sum, NaN exactly when one of its probabilities is.
Static operand quantizers only (per tensor or per head): dynamic per-token operands take the general path.
Valid while :meth:`AttentionCall.matches`.
"""
from __future__ import annotations

import math

import torch

from ..autograd import ResolvedCall, tensor_tokens
from ..kernels import dispatch
from ..kernels.contract import Unsupported


def _resolved(op: str, device: torch.device, backend):
    """``run(*args)``: ``op``'s first backend function, with dispatch's fallback where that backend declines."""
    fn, strict = dispatch.first_function(op, device.type, backend)

    def generic(*args):
        return getattr(dispatch, op)(*args, backend=backend)

    if fn is None:
        return generic

    def run(*args):
        try:
            return fn(*args)
        except Unsupported:
            if strict:
                raise
        return generic(*args)

    return run


def _operand(quant, per_head: bool):
    """``(kernel scale, kernel zero point, axis, scale and zero point shaped against [B, H, N, d])``."""
    scale, zp = quant.scale.detach(), quant.zero_point
    if per_head:
        return scale, zp, 1, scale.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1)
    return scale, zp, None, scale.reshape(1, 1, 1, 1), zp.reshape(1, 1, 1, 1)


class AttentionCall(ResolvedCall):
    """The packed attention of one module with its quantizer tensors resolved (see the module docstring).

    Built by :meth:`build`; ``key``: what the module read besides those tensors (``$DFQKERN_BACKEND``, the
    operand width, per head or not, the fused q scaling); the module drops its call when an attribute of it is
    set (``backend``, a quantizer replaced)."""

    @staticmethod
    def quantizer_tensors(module) -> tuple:
        """The tensors a call is built from (read through the module dicts: this runs per forward)."""
        m = module._modules
        q, k, v, s = m["q_quant"], m["k_quant"], m["v_quant"], m["attn_quant"]
        return (q._parameters["scale"], q._buffers["zero_point"], k._parameters["scale"], k._buffers["zero_point"],
                v._parameters["scale"], v._buffers["zero_point"], s._parameters["scale"], s._buffers["shift"])

    @classmethod
    def build(cls, module, key, tensors, per_head: bool, fused_scale: "float | None") -> "AttentionCall | None":
        """The call of ``module`` (a packed ``QuantAttentionBase``), or ``None`` where the general path runs: a
        quantizer tensor keeps no version counter (made under ``torch.inference_mode``), or the q / k / v
        quantizers are not static ones of one type and width (never so from ``quantize_model``)."""
        operands = (module.q_quant, module.k_quant, module.v_quant)
        if len({(type(q), q.bits, q.per_token) for q in operands}) != 1 or operands[0].per_token:
            return None
        try:
            tokens = tensor_tokens(tensors)
        except RuntimeError:
            return None
        self = cls(key, tensors, tokens)
        device = module.q_quant.scale.device
        self.quantize = _resolved("quantize", device, module.backend)
        self.matmul = _resolved("matmul_int", device, module.backend)
        with torch.no_grad():
            ops = [_operand(q, per_head) for q in operands]
            self.q_op, self.k_op, self.v_op = ops
            self.bits = operands[0].bits
            self.qk_scale = ops[0][3] * ops[1][3].transpose(-2, -1)  # the general path's qs * ks
            sq = module.attn_quant
            self.levels = sq.levels
            fine, coarse = sq.steps()
            self.fine, self.coarse = fine.to(device), coarse.to(device)
            # the reciprocals as SoftmaxQuantizer.codes computes them, one per range: [fine, coarse] x [N, S]
            self.recip = torch.stack([1.0 / self.fine, 1.0 / self.coarse]).reshape(2, 1, 1)
            self.zero = torch.zeros(1, dtype=torch.int32, device=device)
            self.one = torch.ones(1, device=device)
            self.fused = fused_scale is not None
            if self.fused:
                heads = module.num_heads
                # q is scaled by 1/sqrt(d) before quantization; k and v by 1.0, exactly themselves
                self.qkv_mult = torch.tensor([fused_scale, 1.0, 1.0], device=device).reshape(3, 1)
                self.qkv_channels = 3 * heads if per_head else 3
                self.qkv_scale = torch.cat([op[0].reshape(-1) for op in ops]).float()
                self.qkv_zero = torch.cat([op[1].reshape(-1) for op in ops])
                # the one-call core only where the backend serving matmul_int has it (else: that backend's
                # kernels step by step, not another backend's core, e.g. the reference's on CUDA tensors)
                core = dispatch.first_backend("attention_qkv", device.type, module.backend)
                same = core is not None and core == dispatch.first_backend("matmul_int", device.type, module.backend)
                self.core = _resolved("attention_qkv", device, module.backend) if same else None
                self.core_args = (heads, float(fused_scale), self.qkv_scale, self.qkv_zero, self.bits,
                                  float(self.fine), float(self.coarse), self.levels)
        return self

    # ------------------------------------------------------------------ per call

    def attend(self, q, k, v, bias, need_probs: bool):
        """The general path's ``_attend_packed(q, k, v, bias, need_probs)``."""
        qs, qz, qa = self.q_op[:3]
        ks, kz, ka = self.k_op[:3]
        vs, vz, va = self.v_op[:3]
        qc = self.quantize(q, qs, qz, self.bits, qa)
        kc = self.quantize(k, ks, kz, self.bits, ka)
        vc = self.quantize(v, vs, vz, self.bits, va)
        return self._finish(qc, kc.transpose(-2, -1), vc, bias, q.dtype, need_probs)

    def attend_qkv(self, qkv: torch.Tensor, heads: int, bias, need_probs: bool):
        """``attend`` on the fused projection's float32 output ``[B, N, 3 * heads * d]`` (q unscaled)."""
        b, n, c3 = qkv.shape
        if bias is None and not need_probs and self.core is not None:  # one kernel call (dispatch.attention_qkv)
            return self.core(qkv, *self.core_args).view(b, n, heads, -1).transpose(1, 2), None
        x = qkv.reshape(b, n, 3, c3 // 3) * self.qkv_mult
        codes = self.quantize(x.reshape(b, n, self.qkv_channels, -1), self.qkv_scale, self.qkv_zero, self.bits, 2)
        codes = codes.reshape(b, n, 3, heads, -1)
        qc, kc, vc = codes[:, :, 0].transpose(1, 2), codes[:, :, 1].permute(0, 2, 3, 1), codes[:, :, 2].transpose(1, 2)
        return self._finish(qc, kc, vc, bias, x.dtype, need_probs)

    def _softmax_codes(self, probs: torch.Tensor) -> torch.Tensor:
        """``SoftmaxQuantizer.codes(probs)`` stacked: uint8 ``[..., 2, N, S]`` (fine codes, coarse codes), in
        float arithmetic on integer-valued levels (exact; about half the time of its bool masks at 65 tokens)."""
        levels = self.levels
        both = (probs.unsqueeze(-3) * self.recip).round_()  # [..., 2, N, S]: fine level, coarse level
        fine, coarse = both.select(-3, 0), both.select(-3, 1)
        in_fine = (levels + 1 - fine).clamp_(0, 1)  # 1.0 where the fine level fits (<= levels), else 0.0; NaN stays
        coarse.addcmul_(coarse, in_fine, value=-1)  # coarse * (1 - in_fine): 0 where the fine level fits
        fine.mul_(in_fine)
        both.clamp_(0, levels)
        # integer-valued floats -> uint8 as they are (scale 1, zero point 0), NaN -> code 0
        return self.quantize(both, self.one, self.zero, 8, None)

    def _finish(self, qc, kc_t, vc, bias, dtype, need_probs: bool):
        # int32 * float32 scale: the general path's .float() * (qs * ks) in one op (the same cast, the same product)
        scores = self.matmul(qc, self.q_op[4], kc_t, self.k_op[4].transpose(-2, -1)) * self.qk_scale
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        codes = self._softmax_codes(probs)
        acc = self.matmul(codes.flatten(-3, -2), self.zero, vc, self.v_op[4]).unflatten(-2, (2, -1))
        # (fine rows * fine + coarse rows * coarse) * vs, the int32 rows cast to float32 in the products, written
        # [B, N, H, d]-contiguous: the callers' out.transpose(1, 2).reshape(B, N, H * d) is then a view, not a copy
        b, h, _, n, d = acc.shape
        out = torch.empty(b, n, h, d, dtype=torch.float32, device=acc.device).transpose(1, 2)
        torch.mul(acc.select(-3, 0), self.fine, out=out)
        out.add_(acc.select(-3, 1) * self.coarse).mul_(self.v_op[3])
        # a row holding NaN (fully masked) stays NaN, as in float; on CPU one sum tells whether there is any
        if probs.device.type != "cpu" or math.isnan(probs.sum().item()):
            out = out.masked_fill_(torch.isnan(probs.sum(dim=-1, keepdim=True)), math.nan)
        out = out.to(dtype)
        if not need_probs:
            return out, None
        return out, (codes.select(-3, 0).float() * self.fine + codes.select(-3, 1).float() * self.coarse).to(dtype)
