"""Weight and activation quantizers. All state lives in parameters and buffers (state_dict round-trips)."""
from __future__ import annotations

import torch
from torch import nn

from ..autograd import adaround, fake_quant
from ..config import DEFAULT_OBSERVER, ObserverSpec
from ..formats import FAKE_QUANT_ACT_BITS, WEIGHT_BITS, check_bits, code_max
from ..kernels import reference as R
from .observers import RangeTracker, weight_qparams

ROUNDINGS = ("nearest", "soft", "hard")


class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer: round-to-nearest, or AdaRound (soft while learning, then hard).

    ``scale`` is a Parameter (frozen unless a method learns it, e.g. Genie-M); ``zero_point`` is an
    int32 buffer of codes (``2**(bits-1)`` when symmetric). In AdaRound mode ``alpha`` is the
    rounding variable V and ``base`` holds ``floor(w / scale)`` at the time rounding learning began.
    """

    def __init__(self, bits: int, channels: int, symmetric: bool = False):
        super().__init__()
        self._bits = check_bits(bits, WEIGHT_BITS, "weight bits")
        self.symmetric = symmetric
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))
        self.rounding = "nearest"
        self.register_parameter("alpha", None)  # AdaRound V, created by start_adaround
        self.register_buffer("base", None)
        self.beta = 2.0  # AdaRound regularizer exponent, annealed by calibration
        self.last_reg: torch.Tensor | None = None  # regularizer of the last soft forward
        self.enabled = True
        self.backend: str | None = None  # kernel backend forced for this quantizer (None: dispatch picks)

    @property
    def bits(self) -> int:  # fixed at construction from the layer's LayerQuant: one owner of the width
        return self._bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, rounding={self.rounding}"

    @torch.no_grad()
    def observe(self, w: torch.Tensor, observer: str = "mse", spec: ObserverSpec = DEFAULT_OBSERVER):
        scale, zp = weight_qparams(w, self.bits, self.symmetric, observer, spec)
        self.scale.copy_(scale.to(self.scale))
        self.zero_point.copy_(zp.to(self.zero_point))

    def start_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Switch to soft AdaRound initialised at ``w``'s fractional parts; returns V to optimise."""
        with torch.no_grad():
            scale = self.scale.detach()
            self.base = R.adaround_base(w, scale)
            self.alpha = nn.Parameter(R.adaround_init_v(w, scale).to(w.dtype))
        self.rounding = "soft"
        return self.alpha

    def harden(self) -> None:
        if self.rounding == "soft":
            self.rounding = "hard"

    def reset_rounding(self) -> None:
        """Back to round-to-nearest, dropping any AdaRound state."""
        self.rounding = "nearest"
        self.alpha = None
        self.base = None
        self.last_reg = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.rounding == "nearest":
            return fake_quant(w, self.scale, self.zero_point, self.bits, axis=0, backend=self.backend)
        w_hat, reg = adaround(self.base, self.alpha, self.scale, self.zero_point, self.bits, 0, self.beta,
                              hard=self.rounding == "hard", backend=self.backend)
        self.last_reg = None if self.rounding == "hard" else reg
        return w_hat

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The unsigned integer codes this quantizer assigns to ``w`` (same shape, uint8)."""
        if self.rounding == "nearest":
            return R.quantize(w, self.scale, self.zero_point, self.bits, axis=0)
        zp = R.broadcast_param(self.zero_point, w, 0).float()
        up = (self.alpha >= 0).float()
        return torch.clamp(self.base + up + zp, 0, code_max(self.bits)).to(torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # AdaRound state is created on demand: make room for it before loading a checkpoint that has it.
        if prefix + "alpha" in state_dict and self.alpha is None:
            self.alpha = nn.Parameter(torch.empty_like(state_dict[prefix + "alpha"]))
            self.base = torch.empty_like(state_dict[prefix + "base"])
            self.rounding = "hard"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ActQuantizer(nn.Module):
    """Activation quantizer: per-tensor static (observed, optionally learned LSQ step) or per-token dynamic.

    Modes: ``observe`` (record ranges, pass float through), ``quant`` (fake-quantize), ``off``.
    ``drop_prob`` > 0 applies QDrop while the module is in training mode.
    """

    MODES = ("observe", "quant", "off")

    def __init__(self, bits: int, symmetric: bool = False, per_token: bool = False, observer: str = "mse",
                 spec: ObserverSpec = DEFAULT_OBSERVER, seed: int = 0):
        super().__init__()
        self._bits = check_bits(bits, FAKE_QUANT_ACT_BITS, "activation bits")
        self.symmetric, self.per_token = symmetric, per_token
        self.observer, self.spec = observer, spec
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(per_token))
        self.mode = "quant"
        self.drop_prob = 0.0
        self.seed = seed
        self._calls = 0  # advances the QDrop seed so every forward draws a fresh mask, reproducibly
        self.backend: str | None = None  # kernel backend forced for this quantizer (None: dispatch picks)
        self.tracker: RangeTracker | None = None

    @property
    def bits(self) -> int:  # fixed at construction from the layer's LayerQuant: one owner of the width
        return self._bits

    def extra_repr(self) -> str:
        kind = "per_token" if self.per_token else "per_tensor"
        return f"bits={self.bits}, {kind}, symmetric={self.symmetric}, mode={self.mode}"

    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "observe" and not self.per_token:
            self.tracker = RangeTracker(seed=self.seed)
        self.mode = mode

    @torch.no_grad()
    def finalize(self) -> None:
        """Set scale / zero point from what was observed, and leave observe mode."""
        if self.per_token:
            self.mode = "quant"
            return
        if self.tracker is None:
            raise RuntimeError("finalize() called before any observation; call set_mode('observe') and run data")
        scale, zp = self.tracker.qparams(self.bits, self.symmetric, self.observer, self.spec)
        self.scale.copy_(scale.reshape(1).to(self.scale))
        self.zero_point.copy_(zp.reshape(1).to(self.zero_point))
        self.calibrated.fill_(True)
        self.tracker = None
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.per_token:
            x2d = x.reshape(-1, x.shape[-1])
            scale, zp = R.token_qparams(x2d.detach(), self.bits, self.symmetric)
            return fake_quant(x2d, scale.to(x.device), zp.to(x.device), self.bits, axis=0,
                              backend=self.backend).reshape(x.shape)
        if self.mode == "observe":
            self.tracker.update(x)
            return x
        return self.quantize_static(x, axis=None)

    def quantize_static(self, x: torch.Tensor, axis: int | None) -> torch.Tensor:
        """Fake-quant with the calibrated scale(s) along ``axis``, QDrop's random drop while training."""
        if not torch.compiler.is_compiling() and not bool(self.calibrated):  # no data-dependent branch in graphs
            raise RuntimeError("activation quantizer used before calibration: observe data, then call finalize()")
        drop = self.drop_prob if self.training else 0.0
        seed = 0
        if drop > 0:  # a fresh drop mask every call, reproducible from the quantizer's seed
            seed = (self.seed * 1000003 + self._calls) & 0x7FFFFFFF
            self._calls += 1
        return fake_quant(x, self.scale, self.zero_point, self.bits, axis, drop_prob=drop, seed=seed,
                          backend=self.backend)
