"""Quantized attention: ``q @ k^T`` and ``attn @ v`` on quantized operands, in fake-quant or packed mode.

``QuantLinear`` quantizes the projections; what it cannot see are the two matmuls between
activations. :func:`dfqkern.quantize.quantize_model` therefore replaces each attention module it
knows (:data:`ATTENTION_KINDS`) by an explicit twin that keeps the float module's children under
the same names (so state_dict keys line up and its Linear children become QuantLinear like any
other layer):

* :class:`QuantTimmAttention`: timm ViT / DeiT ``Attention`` (and ``dfqkern.vit_nets.QKVAttention``,
  the same fused-``qkv`` layout);
* :class:`QuantWindowAttention`: timm Swin ``WindowAttention`` (relative position bias, the
  shifted-window mask);
* :class:`QuantMultiheadAttention`: ``nn.MultiheadAttention`` (torchvision ViTs, user models), whose
  packed ``in_proj_weight`` is split into ``q_proj`` / ``k_proj`` / ``v_proj`` Linears because torch
  reads it functionally;
* :class:`QuantTransformerEncoderLayer`: ``nn.TransformerEncoderLayer`` without its fused eval fast
  path (which would bypass every swapped module), computing the same thing step by step.

Operand quantizers (:meth:`QuantAttentionBase.init_quantizers`, at the activation bits of the
module's input projection; none when that projection has float activations, which the quantize
report lists):

* ``q_quant`` / ``k_quant`` / ``v_quant``: static per tensor or per head (``QuantConfig.attn_granularity``;
  observed and LSQ-learnable like every activation quantizer), or dynamic with
  ``act_granularity="per_token"``: ``q`` and ``k`` per token, ``v`` per channel (``v``'s tokens are
  the reduction dimension of ``attn @ v``, where per-token scales could not be factored out of the
  integer sum; its channels are the output columns, where they can). ``q`` is quantized after the
  ``1/sqrt(d)`` scaling, as the matmul sees it.
* ``attn_quant``: :class:`SoftmaxQuantizer`, a two-range uniform grid for the post-softmax
  probabilities (see there for why this one).

Packed mode (:meth:`QuantAttentionBase.pack`): the operands become codes with the same parameters
and both matmuls run on the integer op ``dispatch.matmul_int`` (exact int32), scales applied after
(through the custom ops ``dfqkern::quantize_codes`` / ``dfqkern::matmul_int``, which torch.export records).
Eager inference with static operand quantizers runs the same steps through a cached
:class:`~dfqkern.nn.packed_attention.AttentionCall` (batch-1 latency; exact, see there).
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..autograd import eager_inference, matmul_int, quantize_codes
from ..formats import ACT_BITS
from ..kernels import reference as R
from ..kernels.dispatch import env_backend
from .observers import RangeTracker
from .packed_attention import AttentionCall
from .quantizers import ActQuantizer

MAX_SOFTMAX_SHIFT = 8  # the fine softmax step is the coarse one / 2**shift, shift searched in [0, this]


# ----------------------------------------------------------------------------- quantizers

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


class SoftmaxQuantizer(FixedRangeActQuantizer):
    """Two-range uniform grid for softmax outputs (PTQ4ViT's twin uniform, with a power-of-two ratio).

    Softmax rows hold a few large probabilities and many tiny ones. One uniform ``b``-bit grid over
    [0, 1] rounds the tiny ones to 0 (at 4 bits everything below 1/30); a log2 grid keeps them but
    rounds the large ones, where attention concentrates, to powers of two, and needs a shift-based
    matmul. Here one bit picks the range and ``b - 1`` bits the level: the coarse range covers
    [0, 1] with step ``1 / L`` (``L = 2**(b-1) - 1``), the fine range [0, L * s_fine] with step
    ``s_fine = 1 / (L * 2**shift)``; a value uses the fine range when it fits. Both grids start at
    0, so ``attn @ v`` is two uniform integer matmuls (fine codes, coarse codes) on the kernel every
    other matmul uses. ``shift`` is chosen by observation (Lp error on sampled probabilities); the
    grid is never learned (``scale`` holds ``s_fine``).
    """

    def __init__(self, bits: int, spec=None, seed: int = 0):
        super().__init__(bits, 0.0, 1.0)
        if spec is not None:
            self.spec = spec
        self.seed = seed
        self.levels = (1 << (bits - 1)) - 1  # top code of each range
        if self.levels < 1:
            raise ValueError(f"softmax quantization needs at least 2 bits, got {bits}")
        self.register_buffer("shift", torch.zeros(1, dtype=torch.int32))
        with torch.no_grad():
            self.scale.fill_(1.0 / self.levels)
            self.zero_point.zero_()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, two-range uniform, shift={int(self.shift)}, mode={self.mode}"

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine step, coarse step) as float32 scalars."""
        fine = self.scale.detach().float().reshape(())
        return fine, fine * torch.exp2(self.shift.float().reshape(()))

    def codes(self, p: torch.Tensor, fine: torch.Tensor | None = None, coarse: torch.Tensor | None = None):
        """``(fine codes, coarse codes)``, uint8, one of them 0 at each element (NaN -> both 0)."""
        if fine is None:
            fine, coarse = self.steps()
        x = p.detach().float()
        lo = torch.round(x * (1.0 / fine))
        in_fine = lo <= self.levels
        hi = torch.round(x * (1.0 / coarse))
        zero = torch.zeros_like(lo)
        c_fine = torch.where(in_fine, lo.clamp(0, self.levels), zero)
        c_coarse = torch.where(in_fine | torch.isnan(x), zero, hi.clamp(0, self.levels))
        c_fine = torch.where(torch.isnan(x), zero, c_fine)
        return c_fine.to(torch.uint8), c_coarse.to(torch.uint8)

    def _fake(self, p: torch.Tensor, fine, coarse) -> torch.Tensor:
        c_fine, c_coarse = self.codes(p, fine, coarse)
        out = (c_fine.float() * fine + c_coarse.float() * coarse).to(p.dtype)
        return torch.where(torch.isfinite(p), out, torch.full_like(out, math.nan))

    def set_mode(self, mode: str) -> None:
        ActQuantizer.set_mode(self, mode)

    @torch.no_grad()
    def finalize(self) -> None:
        """Pick ``shift`` minimising the Lp error on the observed probabilities."""
        if self.tracker is None or self.tracker.lo is None:
            raise RuntimeError("no softmax outputs were observed; run calibration data through the model first")
        x = torch.cat(self.tracker.samples)
        coarse = torch.tensor(1.0 / self.levels)
        best, best_err = 0, None
        for shift in range(MAX_SOFTMAX_SHIFT + 1):
            fine = coarse / (1 << shift)
            err = (self._fake(x, fine, coarse) - x).abs().pow(self.spec.lp).sum().item()
            if best_err is None or err < best_err:
                best, best_err = shift, err
        self.shift.fill_(best)
        self.scale.fill_(1.0 / (self.levels * (1 << best)))
        self.tracker = None
        self.mode = "quant"

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return p
        if self.mode == "observe":
            self.tracker.update(p)
            return p
        fine, coarse = self.steps()
        q = self._fake(p, fine.to(p.device), coarse.to(p.device))
        if self.training and self.drop_prob > 0:  # QDrop: kept elements stay float
            seed = (self.seed * 1000003 + self._calls) & 0x7FFFFFFF
            self._calls += 1
            q = torch.where(R.qdrop_mask(p.shape, self.drop_prob, seed, p.device), p, q)
        return p + (q - p).detach()  # straight-through: the grid itself is not learned


class HeadActQuantizer(ActQuantizer):
    """Static activation quantizer with one scale / zero point per attention head (axis 1 of ``[B, H, N, d]``)."""

    def __init__(self, bits: int, heads: int, symmetric: bool = False, observer: str = "mse", spec=None,
                 seed: int = 0):
        kw = {} if spec is None else {"spec": spec}
        super().__init__(bits, symmetric, False, observer, seed=seed, **kw)
        self.heads = heads
        self.scale = nn.Parameter(torch.ones(heads), requires_grad=False)
        self.zero_point = torch.zeros(heads, dtype=torch.int32)
        self.trackers: list[RangeTracker] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_head={self.heads}, symmetric={self.symmetric}, mode={self.mode}"

    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "observe":
            self.trackers = [RangeTracker(seed=self.seed + h) for h in range(self.heads)]
            self.tracker = self.trackers[0]  # observe_activations' error path resets .tracker
        self.mode = mode

    @torch.no_grad()
    def finalize(self) -> None:
        if self.trackers is None:
            raise RuntimeError("finalize() called before any observation; call set_mode('observe') and run data")
        params = [t.qparams(self.bits, self.symmetric, self.observer, self.spec) for t in self.trackers]
        self.scale.copy_(torch.cat([s.reshape(1) for s, _ in params]).to(self.scale))
        self.zero_point.copy_(torch.cat([z.reshape(1) for _, z in params]).to(self.zero_point))
        self.calibrated.fill_(True)
        self.trackers = self.tracker = None
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            for h, tracker in enumerate(self.trackers):
                tracker.update(x[:, h])
            return x
        return self.quantize_static(x, axis=1)


def operand_quantizer(bits: int, heads: int, cfg) -> ActQuantizer:
    """The quantizer of one of q / k / v under ``cfg`` (see the module docstring)."""
    if cfg.act_granularity == "per_token":
        return ActQuantizer(bits, cfg.act_symmetric, True, cfg.act_observer, cfg.observer_spec, seed=cfg.seed)
    if cfg.attn_granularity == "per_head":
        return HeadActQuantizer(bits, heads, cfg.act_symmetric, cfg.act_observer, cfg.observer_spec, seed=cfg.seed)
    return ActQuantizer(bits, cfg.act_symmetric, False, cfg.act_observer, cfg.observer_spec, seed=cfg.seed)


# ----------------------------------------------------------------------------- packed operands

def _operand_codes(quant: ActQuantizer, x: torch.Tensor, backend):
    """Codes of ``x`` ``[B, H, N, d]`` and its (scale, zero point) shaped to broadcast against it."""
    if quant.per_token:  # dynamic, one row per token (per channel for v: the caller passes v^T)
        x2d = x.reshape(-1, x.shape[-1])
        scale, zp = R.token_qparams(x2d, quant.bits, quant.symmetric)
        scale, zp = scale.to(x.device), zp.to(x.device)
        codes = quantize_codes(x2d, scale, zp, quant.bits, 0, backend=backend).reshape(x.shape)
        shape = (*x.shape[:-1], 1)
        return codes, scale.reshape(shape), zp.reshape(shape)
    if isinstance(quant, HeadActQuantizer):
        codes = quantize_codes(x, quant.scale.detach(), quant.zero_point, quant.bits, 1, backend=backend)
        shape = (1, -1, 1, 1)
        return codes, quant.scale.detach().reshape(shape), quant.zero_point.reshape(shape)
    codes = quantize_codes(x, quant.scale.detach(), quant.zero_point, quant.bits, None, backend=backend)
    return codes, quant.scale.detach().reshape(1, 1, 1, 1), quant.zero_point.reshape(1, 1, 1, 1)


def _transposed(codes, scale, zp):
    return codes.transpose(-2, -1), scale.transpose(-2, -1), zp.transpose(-2, -1)


# ----------------------------------------------------------------------------- modules

class SwappedModule(nn.Module):
    """A module :func:`dfqkern.quantize.quantize_model` put in place of a float one; ``kind`` names the
    :data:`ATTENTION_KINDS` entry it came from (recorded in checkpoints)."""

    kind: str = ""


class QuantAttentionBase(SwappedModule):
    """What every quantized attention shares: the operand quantizers and the two matmuls
    (:meth:`attend`), in float (no quantizers), fake-quant or packed mode."""

    def _init_attention(self, num_heads: int, kind: str) -> None:
        self.kind = kind
        self.num_heads = num_heads
        self.bits: int | None = None  # None: the matmuls run in float (input projection not activation-quantized)
        self.q_quant = self.k_quant = self.v_quant = self.attn_quant = None
        self.is_packed = False
        self.backend: str | None = None  # kernel backend of the packed ops (None: dispatch picks); see set_backend

    def input_projection(self) -> nn.Module:
        """The layer whose activation bits the matmul operands get."""
        raise NotImplementedError

    def init_quantizers(self, bits: int, cfg) -> None:
        self.bits = bits
        device = next(self.parameters()).device
        self.q_quant = operand_quantizer(bits, self.num_heads, cfg).to(device)
        self.k_quant = operand_quantizer(bits, self.num_heads, cfg).to(device)
        self.v_quant = operand_quantizer(bits, self.num_heads, cfg).to(device)
        self.attn_quant = SoftmaxQuantizer(bits, cfg.observer_spec, cfg.seed).to(device)

    def unpackable_reason(self) -> str | None:
        if self.bits is not None and self.bits not in ACT_BITS:
            return (f"{self.bits}-bit attention operands have no packed kernel (packed activation widths: "
                    f"{ACT_BITS})")
        return None

    def pack(self) -> "QuantAttentionBase":
        """Run the matmuls on the integer op from now on (inference only)."""
        if self.is_packed or self.bits is None:
            return self
        reason = self.unpackable_reason()
        if reason:
            raise ValueError(f"cannot pack: {reason}")
        if not all(bool(q.calibrated) for q in (self.q_quant, self.k_quant, self.v_quant)):
            raise RuntimeError("pack() needs calibrated attention quantizers; run observer calibration first")
        self.is_packed = True
        return self

    def extra_repr(self) -> str:
        bits = "float" if self.bits is None else f"a{self.bits}"
        return f"kind={self.kind}, heads={self.num_heads}, matmuls={bits}, packed={self.is_packed}"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
               dropout_p: float = 0.0, need_probs: bool = False):
        """``softmax(q k^T + bias) v`` with ``q`` already scaled; q ``[B, H, N, d]``, k / v ``[B, H, S, d]``,
        ``bias`` additive, broadcastable to ``[B, H, N, S]``. Returns ``(out [B, H, N, d], probs or None)``."""
        if self.is_packed:
            return self._attend_packed(q, k, v, bias, need_probs)
        if self.bits is not None:
            q, k = self.q_quant(q), self.k_quant(k)
            v = self.v_quant(v.transpose(-2, -1)).transpose(-2, -1) if self.v_quant.per_token else self.v_quant(v)
        scores = q @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        if dropout_p > 0 and self.training:
            probs = F.dropout(probs, dropout_p)
        if self.bits is not None:
            probs = self.attn_quant(probs)
        return probs @ v, probs if need_probs else None

    _eager: AttentionCall | None = None  # the cached eager inference call (see _eager_call); never saved or copied

    def _eager_call(self, x: torch.Tensor, fused_scale: "float | None" = None) -> AttentionCall | None:
        """The module's :class:`AttentionCall` for an eager inference forward on ``x``, rebuilt when a quantizer
        tensor is written in place or replaced, ``$DFQKERN_BACKEND`` changes or an attribute of the module is
        set (``backend``, ...: see ``__setattr__``); ``None`` where the general path runs (autograd or tracing,
        dynamic per-token operands, quantizer tensors made under ``torch.inference_mode``). ``fused_scale``:
        the q scaling of a fused-qkv caller (:meth:`AttentionCall.attend_qkv`)."""
        if not eager_inference(x, None) or torch.jit.is_tracing():
            return None
        q = self._modules["q_quant"]
        if q.per_token:
            return None
        per_head = isinstance(q, HeadActQuantizer)
        key = (env_backend(), self.bits, per_head, fused_scale)
        tensors = AttentionCall.quantizer_tensors(self)
        call = self._eager
        if call is None or not call.matches(key, tensors):
            call = AttentionCall.build(self, key, tensors, per_head, fused_scale)
            object.__setattr__(self, "_eager", call)
        return call

    def __setattr__(self, name: str, value) -> None:
        # any attribute the eager call was built from (backend, quantizers, bits, ...) may change here
        self.__dict__.pop("_eager", None)
        super().__setattr__(name, value)

    def __getstate__(self):  # the eager call holds this module's tensors: rebuilt, not copied
        state = super().__getstate__()
        state.pop("_eager", None)
        return state

    def _attend_packed(self, q, k, v, bias, need_probs):
        call = self._eager_call(q)
        if call is not None:
            return call.attend(q, k, v, bias, need_probs)
        be = self.backend
        qc, qs, qz = _operand_codes(self.q_quant, q, be)
        kc, ks, kz = _transposed(*_operand_codes(self.k_quant, k, be))
        if self.v_quant.per_token:
            vc, vs, vz = _transposed(*_operand_codes(self.v_quant, v.transpose(-2, -1).contiguous(), be))
        else:
            vc, vs, vz = _operand_codes(self.v_quant, v, be)
        scores = matmul_int(qc, qz, kc, kz, backend=be).float() * (qs * ks)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        fine, coarse = self.attn_quant.steps()
        fine, coarse = fine.to(q.device), coarse.to(q.device)
        c_fine, c_coarse = self.attn_quant.codes(probs, fine, coarse)
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        acc_fine = matmul_int(c_fine, zero, vc, vz, backend=be).float()
        acc_coarse = matmul_int(c_coarse, zero, vc, vz, backend=be).float()
        out = (acc_fine * fine + acc_coarse * coarse) * vs
        bad = torch.isnan(probs).any(dim=-1, keepdim=True)  # a fully masked row stays NaN, as in float
        out = torch.where(bad, torch.full_like(out, math.nan), out).to(q.dtype)
        if not need_probs:
            return out, None
        return out, (c_fine.float() * fine + c_coarse.float() * coarse).to(q.dtype)


class QuantTimmAttention(QuantAttentionBase):
    """timm ``Attention`` (ViT, DeiT) with quantized matmuls; shares the float module's submodules."""

    def __init__(self, attn: nn.Module, kind: str = "timm_attention"):
        super().__init__()
        self._init_attention(attn.num_heads, kind)
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.attn_drop = getattr(attn, "attn_drop", nn.Identity())
        self.proj_drop = getattr(attn, "proj_drop", nn.Identity())

    def input_projection(self) -> nn.Module:
        return self.qkv

    def _fused_call(self, qkv: torch.Tensor) -> AttentionCall | None:
        """The eager call quantizing q, k and v straight from ``qkv`` (the general ``attend`` otherwise: not
        packed, q / k normalized in between, a non-float32 output, whose ``q * scale`` the fused float32
        multiply would round differently, or ``attend`` replaced on the instance, as the ONNX export and the
        tests' spies do)."""
        m = self._modules
        if not self.is_packed or "attend" in self.__dict__ or qkv.dtype != torch.float32 \
                or type(m["q_norm"]) is not nn.Identity or type(m["k_norm"]) is not nn.Identity:
            return None
        return self._eager_call(qkv, float(self.scale))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)
        bias = _sdpa_bias(attn_mask, is_causal, N, N, x)
        call = self._fused_call(qkv)
        if call is not None:  # the three operands quantized in one call on the projection's output
            out, _ = call.attend_qkv(qkv, self.num_heads, bias, False)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            p = getattr(self.attn_drop, "p", 0.0)
            out, _ = self.attend(q * self.scale, k, v, bias, dropout_p=p)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def _sdpa_bias(attn_mask, is_causal: bool, n: int, s: int, like: torch.Tensor):
    """Additive bias of an SDPA-style mask (bool: True takes part) or causal flag (timm's semantics)."""
    if is_causal:
        return torch.full((n, s), -math.inf, dtype=like.dtype, device=like.device).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, -math.inf)
    return attn_mask


class QuantWindowAttention(QuantAttentionBase):
    """timm Swin ``WindowAttention``: relative position bias per head, plus the shifted-window mask."""

    def __init__(self, attn: nn.Module, kind: str = "timm_window_attention"):
        super().__init__()
        self._init_attention(attn.num_heads, kind)
        self.scale = attn.scale
        self.window_area = attn.window_area
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def input_projection(self) -> nn.Module:
        return self.qkv

    def _rel_pos_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, N, N]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._rel_pos_bias().to(x.dtype)
        if mask is not None:  # [nW, N, N] (0 / -inf) for the windows of each image, images in order
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, N, N)).expand(B_ // nw, -1, -1, -1, -1)
            bias = bias.reshape(B_, self.num_heads, N, N)
        out, _ = self.attend(q * self.scale, k, v, bias, dropout_p=getattr(self.attn_drop, "p", 0.0))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, -1)))


def _mha_unsupported(mha: nn.MultiheadAttention) -> str | None:
    if mha.bias_k is not None or mha.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv / add_zero_attn has no quantized handler"
    return None


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class QuantMultiheadAttention(QuantAttentionBase):
    """``nn.MultiheadAttention`` computed with Linear modules (``q_proj`` / ``k_proj`` / ``v_proj`` /
    ``out_proj``) and quantized matmuls. Same call signature and outputs (masks, ``need_weights``,
    ``batch_first``, unbatched inputs); ``add_bias_kv`` / ``add_zero_attn`` are not handled."""

    def __init__(self, mha: nn.MultiheadAttention, kind: str = "multihead_attention"):
        super().__init__()
        reason = _mha_unsupported(mha)
        if reason:
            raise ValueError(reason)
        self._init_attention(mha.num_heads, kind)
        self.embed_dim, self.head_dim = mha.embed_dim, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().split(e)
        else:
            wq, wk, wv = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        bq = bk = bv = None
        if mha.in_proj_bias is not None:
            bq, bk, bv = mha.in_proj_bias.detach().split(e)
        self.q_proj, self.k_proj, self.v_proj = _linear_from(wq, bq), _linear_from(wk, bk), _linear_from(wv, bv)
        self.out_proj = _linear_from(mha.out_proj.weight.detach(), mha.out_proj.bias)

    def input_projection(self) -> nn.Module:
        return self.q_proj

    def _bias(self, attn_mask, key_padding_mask, is_causal, b, n, s, like):
        bias = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=like.device).triu_(1)
        if attn_mask is not None:  # bool: True may NOT attend (torch's MHA convention); float: added
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=like.dtype).masked_fill_(m, -math.inf)
            bias = m.reshape(b, self.num_heads, n, s) if m.dim() == 3 else m
        if key_padding_mask is not None:
            m = key_padding_mask
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=like.dtype).masked_fill_(m, -math.inf)
            m = m.reshape(b, 1, 1, s).to(like.dtype)
            bias = m if bias is None else bias + m
        return bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(b, n, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(b, s, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(b, s, h, d).transpose(1, 2)
        bias = self._bias(attn_mask, key_padding_mask, is_causal, b, n, s, q)
        out, probs = self.attend(q * d ** -0.5, k, v, bias, self.dropout, need_probs=need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, weights if batched else weights.squeeze(0)


class QuantTransformerEncoderLayer(SwappedModule):
    """``nn.TransformerEncoderLayer`` step by step (its eval fast path reads the weights functionally, so
    the quantized modules would never run). Same children, same call signature."""

    kind = "transformer_encoder_layer"

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = layer.self_attn
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.activation = layer.activation

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


# ----------------------------------------------------------------------------- the handled kinds

def _timm_type(module: str, name: str):
    if "timm" not in sys.modules:  # a model holding a timm module has imported timm
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _vit_nets_attention():
    mod = sys.modules.get("dfqkern.vit_nets")  # imported by whoever built a model holding one
    return None if mod is None else mod.QKVAttention


@dataclass(frozen=True)
class AttentionKind:
    """A float module type :func:`dfqkern.quantize.quantize_model` replaces, and how."""

    float_type: Callable[[], type | None]  # resolved lazily: timm is only looked up once imported
    build: Callable[[nn.Module, str], nn.Module]  # (float module, kind) -> swapped module
    unsupported: Callable[[nn.Module], str | None] = lambda m: None


# kind (recorded in checkpoints) -> how. Outer modules (encoder layers) are swapped before the
# attention inside them; a type maps to one kind.
ATTENTION_KINDS: dict[str, AttentionKind] = {
    "transformer_encoder_layer": AttentionKind(lambda: nn.TransformerEncoderLayer,
                                               lambda m, kind: QuantTransformerEncoderLayer(m)),
    "multihead_attention": AttentionKind(lambda: nn.MultiheadAttention, QuantMultiheadAttention, _mha_unsupported),
    "timm_attention": AttentionKind(lambda: _timm_type("timm.layers.attention", "Attention"), QuantTimmAttention),
    "timm_window_attention": AttentionKind(lambda: _timm_type("timm.models.swin_transformer", "WindowAttention"),
                                           QuantWindowAttention),
    "qkv_attention": AttentionKind(_vit_nets_attention, QuantTimmAttention),
}


def kind_of(module: nn.Module) -> str | None:
    """The :data:`ATTENTION_KINDS` entry handling ``module``'s exact type, or None."""
    for kind, spec in ATTENTION_KINDS.items():
        t = spec.float_type()
        if t is not None and type(module) is t:
            return kind
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """An attention-like module no kind handles (its matmuls would run in float): by class name."""
    return "attention" in type(module).__name__.lower() and not isinstance(module, SwappedModule)


def disable_nested_fast_path(model: nn.Module) -> None:
    """``nn.TransformerEncoder`` turns a padded batch into a nested tensor on its fast path, reading
    its first layer's fused weights; swapped layers have none, so the path is switched off."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
