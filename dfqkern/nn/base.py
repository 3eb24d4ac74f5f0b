"""What QuantLinear and QuantConv2d share: quantizers, fake-quant vs packed mode, packing."""
from __future__ import annotations

import torch
from torch import nn

from ..config import LayerQuant, QuantConfig
from ..autograd import PackedCall, eager_inference, packed_weight_view
from ..kernels.dispatch import env_backend
from ..formats import ACT_BITS, PackedWeight, packed_width
from .quantizers import ActQuantizer, WeightQuantizer


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values; quantization needs finite weights")


class QuantLayer(nn.Module):
    """Base of the drop-in quantized layers.

    Fake-quant mode (calibration): float ``weight`` passes through ``w_quant``; the input through
    ``a_quant`` (``None`` when the layer is weight-only). Packed mode (deployment, after
    :meth:`pack`): the float weight is gone; ``packed_weight`` (uint8, layout kpack-lsb-v1),
    ``w_scale`` and ``w_zero`` buffers feed the dispatch kernels.
    """

    def _init_quant(self, out_channels: int, k: int, lq: LayerQuant, cfg: QuantConfig, packed: bool,
                    token_acts: bool):
        """``token_acts``: the input is a sequence of tokens, so per-token activation quantization applies
        (Linear); convolutions always quantize activations per tensor."""
        self.lq, self.cfg = lq, cfg
        self.w_quant = WeightQuantizer(lq.weight_bits, out_channels, cfg.weight_symmetric)
        self.a_quant = None if lq.act_bits is None else ActQuantizer(
            lq.act_bits, cfg.act_symmetric, token_acts and cfg.act_granularity == "per_token", cfg.act_observer,
            cfg.observer_spec, seed=cfg.seed)
        self.is_packed = False
        self.backend: str | None = None  # kernel backend of the packed ops (None: dispatch picks); see set_backend
        if packed:
            self._make_packed_buffers(torch.zeros(out_channels, packed_width(k, lq.weight_bits), dtype=torch.uint8),
                                      torch.ones(out_channels), torch.zeros(out_channels, dtype=torch.int32))

    @property
    def reduction_size(self) -> int:
        raise NotImplementedError

    def _make_packed_buffers(self, data, scale, zero):
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.register_buffer("packed_weight", data)
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("w_zero", zero.to(torch.int32))
        self.w_quant = None
        if self.bias is not None:  # packed layers are inference-only
            self.bias.requires_grad_(False)
        self.is_packed = True

    def weight_matrix_codes(self) -> torch.Tensor:
        """Codes of the current weight as ``[N, K]`` in the packed layout's K order."""
        raise NotImplementedError

    @torch.no_grad()
    def init_from_float(self, module: nn.Module) -> "QuantLayer":
        """Copy the float layer's weight and bias, move to its device, and observe the weight range."""
        self.weight.copy_(module.weight)
        if module.bias is not None:
            self.bias.copy_(module.bias)
        self.to(module.weight.device)
        self.observe_weight()
        return self

    @torch.no_grad()
    def observe_weight(self, cfg: QuantConfig | None = None) -> None:
        cfg = cfg or self.cfg
        self.w_quant.observe(self.weight, cfg.weight_observer, cfg.observer_spec)

    def quant_weight(self) -> torch.Tensor:
        return self.w_quant(self.weight)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.a_quant is None else self.a_quant(x)

    def unpackable_reason(self) -> str | None:
        """Why :meth:`pack` would refuse this layer (``None`` when it can be packed)."""
        if self.is_packed:
            return None
        if self.a_quant is not None and self.a_quant.bits not in ACT_BITS:
            return (f"{self.a_quant.bits}-bit activations have no packed kernel (packed activation widths: "
                    f"{ACT_BITS}); evaluate the fake-quant model, or quantize with act_bits in {ACT_BITS}")
        return None

    @torch.no_grad()
    def pack(self) -> "QuantLayer":
        """Freeze the quantized weight into packed integer codes (irreversible: the float weight is dropped)."""
        if self.is_packed:
            return self
        reason = self.unpackable_reason()
        if reason:
            raise ValueError(f"cannot pack: {reason}")
        if self.a_quant is not None and not bool(self.a_quant.calibrated):
            raise RuntimeError("pack() needs calibrated activation quantizers; run observer calibration first")
        wq = self.w_quant
        pw = PackedWeight.from_codes(self.weight_matrix_codes(), wq.scale.detach(), wq.zero_point, wq.bits,
                                     tuple(self.weight.shape))
        self._make_packed_buffers(pw.data, pw.scale, pw.zero_point)
        return self

    def packed(self) -> PackedWeight:
        """The packed weight as a :class:`PackedWeight` view over the buffers."""
        return packed_weight_view(self.packed_weight, self.w_scale, self.w_zero, self.lq.weight_bits,
                                  self.reduction_size, self.weight_shape)

    def packed_act_kwargs(self) -> dict:
        """Activation (and backend) arguments of the packed custom ops (see :mod:`dfqkern.autograd`)."""
        a = self.a_quant
        if a is None:
            return {"backend": self.backend}
        if a.per_token:
            return {"abits": a.bits, "act_symmetric": a.symmetric, "per_token": True, "backend": self.backend}
        # the same tensor object every call (no per-call detach unless it is learnable): the kernels'
        # static checks are cached per tensor (dfqkern.kernels.contract.cached)
        scale = a.scale
        if scale.requires_grad:
            scale = scale.detach()
        return {"abits": a.bits, "act_symmetric": a.symmetric, "a_scale": scale, "a_zero": a.zero_point,
                "backend": self.backend}

    # ------------------------------------------------------------------ the packed forward
    _eager: PackedCall | None = None  # the eager inference call (see packed_forward); never saved or copied

    def _packed_op(self, x: torch.Tensor) -> torch.Tensor:
        """The packed forward as the custom op (torch.compile / export, autograd's explaining error)."""
        raise NotImplementedError

    def _make_eager_call(self, key, tensors) -> PackedCall | None:
        raise NotImplementedError

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Packed mode's forward. Without autograd and outside torch.compile it runs the layer's cached
        :class:`~dfqkern.autograd.PackedCall`, rebuilt when a tensor it uses is written in place, swapped or
        replaced, when ``$DFQKERN_BACKEND`` changes, or when an attribute of the layer is set (``backend``,
        geometry: see ``__setattr__``); else the custom op."""
        bias = self._parameters.get("bias")  # (the module dicts directly: this runs per call, at batch 1)
        if eager_inference(x, bias):
            a = self._modules.get("a_quant")
            b = self._buffers
            if a is None:
                tensors = (b["packed_weight"], b["w_scale"], b["w_zero"], bias, None, None)
                key = (env_backend(), None)
            else:
                tensors = (b["packed_weight"], b["w_scale"], b["w_zero"], bias,
                           None if a.per_token else a._parameters["scale"], a._buffers["zero_point"])
                key = (env_backend(), (a.per_token, a.symmetric))
            call = self._eager
            if call is None or not call.matches(key, tensors):
                call = self._make_eager_call(key, tensors)  # None: inference-mode tensors
                object.__setattr__(self, "_eager", call)
            if call is not None:
                return call.run(x)
        return self._packed_op(x)

    def _frozen_tensors(self) -> tuple:
        """``(packed_weight, w_scale, w_zero, bias, a_scale, a_zero)`` as the layer holds them now, for a frozen
        call (``dfqkern.compile(mode="frozen")``); raises unless the layer is packed."""
        if not self.is_packed:
            raise RuntimeError("frozen_call needs a packed layer (dfqkern.quantize.pack_model)")
        a, b = self.a_quant, self._buffers
        return (b["packed_weight"], b["w_scale"], b["w_zero"], self._parameters.get("bias"),
                None if a is None else a._parameters["scale"], None if a is None else a._buffers["zero_point"])

    def __setattr__(self, name: str, value) -> None:
        # any attribute the eager call was built from (backend, stride, lq, a_quant, ...) may change here
        self.__dict__.pop("_eager", None)
        super().__setattr__(name, value)

    def _packed_act_args(self, tensors):
        """``(a_scale, a_zero, abits, per_token, act_symmetric)`` of the custom ops from ``tensors[4:]``."""
        a = self.a_quant
        if a is None:
            return None, None, 0, False, False
        return tensors[4], tensors[5], a.bits, a.per_token, a.symmetric

    def __getstate__(self):  # the eager call holds closures over this layer's tensors: rebuilt, not copied
        state = super().__getstate__()
        state.pop("_eager", None)
        return state

    def extra_repr(self) -> str:
        return (f"w{self.lq.weight_bits}"
                f"{'' if self.lq.act_bits is None else 'a%d' % self.lq.act_bits}, packed={self.is_packed}")
