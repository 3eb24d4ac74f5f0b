"""Activation quantizers on the two attention matmuls of timm ViT / DeiT blocks.

``QuantLinear`` quantizes the inputs of ``qkv``, ``proj``, ``fc1`` and ``fc2``; what it cannot see
are the operands of ``q @ k^T`` and ``attn @ v``. :func:`quantize_attention` swaps every timm
``Attention`` (whose ``qkv`` is already quantized) for :class:`QuantAttention`, which adds:

* ``q_quant`` / ``k_quant``: the operands of ``q @ k^T`` (``q`` after the ``1/sqrt(d)`` scaling, as
  the matmul sees it), per-tensor, at the ``qkv`` layer's activation bits, observed and learned
  like every other activation quantizer;
* ``v_quant``: the right operand of ``attn @ v``, likewise;
* ``attn_quant``: the post-softmax probabilities. They lie in [0, 1] and their useful information
  sits in many small values, so a 4-bit grid would zero most of them. We keep a plain unsigned
  uniform grid with 8 bits and a fixed range [0, 1] (step 1/255, zero point 0), never observed nor
  learned: data cannot widen it (softmax never leaves [0, 1]) and clipping the top would distort
  the rows' sums. (Log2 grids fit 4 bits better but need a shift-based matmul no kernel here has.)

Post-GELU activations (the input of ``fc2``) are handled by ``fc2``'s own quantizer: GELU's
output is bounded below by -0.17, so the asymmetric per-tensor grid (the QuantConfig default,
zero point chosen by the observer) spends almost no codes on the negative side. A symmetric
activation config wastes half the grid there; keep ``act_symmetric=False`` for ViTs.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..kernels import reference as R
from ..nn import ActQuantizer, QuantLayer

SOFTMAX_BITS = 8


class FixedRangeActQuantizer(ActQuantizer):
    """An activation quantizer with a fixed ``[lo, hi]`` grid: observation and learning leave it as it is."""

    def __init__(self, bits: int, lo: float, hi: float):
        super().__init__(bits, symmetric=False, observer="minmax")
        scale, zp = R.qparams_from_range(torch.tensor([lo]), torch.tensor([hi]), bits, symmetric=False)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
            self.calibrated.fill_(True)

    def set_mode(self, mode: str) -> None:
        super().set_mode("quant" if mode == "observe" else mode)

    def finalize(self) -> None:
        self.mode = "quant"


def _act_quantizer(bits: int, cfg, seed: int) -> ActQuantizer:
    return ActQuantizer(bits, cfg.act_symmetric, False, cfg.act_observer, cfg.observer_spec, seed=seed)


class QuantAttention(nn.Module):
    """timm ``Attention`` with quantized matmul operands (see the module docstring). Shares the wrapped
    module's submodules, so its ``qkv`` / ``proj`` stay the same QuantLinear objects."""

    def __init__(self, attn: nn.Module, act_bits: int, cfg):
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.attn_drop = getattr(attn, "attn_drop", nn.Identity())
        self.proj_drop = getattr(attn, "proj_drop", nn.Identity())
        mod = sys.modules[type(attn).__module__]  # timm's mask helpers live next to its Attention
        self._resolve_mask = getattr(mod, "resolve_self_attn_mask", None)
        self._add_mask = getattr(mod, "maybe_add_mask", None)
        self.q_quant = _act_quantizer(act_bits, cfg, cfg.seed)
        self.k_quant = _act_quantizer(act_bits, cfg, cfg.seed)
        self.v_quant = _act_quantizer(act_bits, cfg, cfg.seed)
        self.attn_quant = FixedRangeActQuantizer(SOFTMAX_BITS, 0.0, 1.0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.q_quant(q * self.scale) @ self.k_quant(k).transpose(-2, -1)
        if attn_mask is not None or is_causal:
            if self._resolve_mask is None or self._add_mask is None:
                raise NotImplementedError("attention masks need timm's resolve_self_attn_mask / maybe_add_mask")
            attn = self._add_mask(attn, self._resolve_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.attn_quant(attn) @ self.v_quant(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _timm_attention_type():
    if "timm" not in sys.modules:  # no timm module can be in the model
        return None
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:
        return None
    return Attention


def quantize_attention(model: nn.Module) -> int:
    """Swap each timm ViT ``Attention`` whose ``qkv`` is a quantized layer with activations for a
    :class:`QuantAttention` (in place; idempotent). Returns how many were swapped."""
    attn_type = _timm_attention_type()
    if attn_type is None:
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is attn_type and isinstance(getattr(m, "qkv", None), QuantLayer)
               and m.qkv.lq.act_bits is not None]
    for name, m in targets:
        new = QuantAttention(m, m.qkv.lq.act_bits, m.qkv.cfg).to(m.qkv.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(targets)
