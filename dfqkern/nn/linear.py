"""QuantLinear: drop-in nn.Linear with fake-quant (calibration) and packed (deployment) modes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerQuant, QuantConfig
from ..autograd import frozen_linear_call, packed_linear, packed_linear_call
from .base import QuantLayer, check_finite


class QuantLinear(QuantLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool, lq: LayerQuant, cfg: QuantConfig,
                 packed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_quant(out_features, in_features, lq, cfg, packed, token_acts=True)

    @classmethod
    def from_float(cls, module: nn.Linear, lq: LayerQuant, cfg: QuantConfig, name: str = "linear") -> "QuantLinear":
        check_finite(f"{name}.weight", module.weight)
        q = cls(module.in_features, module.out_features, module.bias is not None, lq, cfg)
        return q.init_from_float(module)

    @property
    def reduction_size(self) -> int:
        return self.in_features

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def weight_matrix_codes(self) -> torch.Tensor:
        return self.w_quant.codes(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_packed:
            return self.packed_forward(x)
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def _packed_op(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.w_scale, self.w_zero, self.lq.weight_bits,
                             self.in_features, self.bias, **self.packed_act_kwargs())

    def _make_eager_call(self, key, tensors):
        return packed_linear_call(key, *tensors[:3], self.lq.weight_bits, self.in_features, tensors[3],
                                  *self._packed_act_args(tensors), self.backend)

    def frozen_call(self):
        """This packed layer as one C++ call ``f(x)`` with its tensors read now, or ``None`` where the CPU backend
        would not run it (another backend first, per-token or no activation quantizer). For
        ``dfqkern.compile(mode="frozen")``."""
        tensors = self._frozen_tensors()
        return frozen_linear_call(*tensors[:3], self.lq.weight_bits, self.in_features, tensors[3],
                                  *self._packed_act_args(tensors), self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
