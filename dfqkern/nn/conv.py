"""QuantConv2d: drop-in nn.Conv2d (stride, padding, dilation, groups incl. depthwise, bias)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..config import LayerQuant, QuantConfig
from ..formats import conv_weight_to_matrix
from ..autograd import frozen_conv2d_call, packed_conv2d, packed_conv2d_call
from .base import QuantLayer, check_finite


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Integer padding equivalent to the module's, or None where it has none (asymmetric 'same')."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d, s in zip(module.kernel_size, module.dilation, module.stride):
            total = d * (k - 1)
            if s != 1 or total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return _pair(module.padding)


def unsupported_reason(module: nn.Conv2d) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is quantized)"
    if conv_padding(module) is None:
        return "padding='same' that needs asymmetric padding"
    return None


class QuantConv2d(QuantLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 bias: bool, lq: LayerQuant, cfg: QuantConfig, packed: bool = False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._init_quant(out_channels, self.reduction_size, lq, cfg, packed, token_acts=False)

    @classmethod
    def from_float(cls, module: nn.Conv2d, lq: LayerQuant, cfg: QuantConfig, name: str = "conv") -> "QuantConv2d":
        reason = unsupported_reason(module)
        if reason:
            raise ValueError(f"{name}: cannot quantize a Conv2d with {reason}")
        check_finite(f"{name}.weight", module.weight)
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, conv_padding(module),
                module.dilation, module.groups, module.bias is not None, lq, cfg)
        return q.init_from_float(module)

    @property
    def reduction_size(self) -> int:
        return (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def weight_matrix_codes(self) -> torch.Tensor:
        return conv_weight_to_matrix(self.w_quant.codes(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_packed:
            return self.packed_forward(x)
        return F.conv2d(self.quant_input(x), self.quant_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _packed_op(self, x: torch.Tensor) -> torch.Tensor:
        return packed_conv2d(x, self.packed_weight, self.w_scale, self.w_zero, self.lq.weight_bits, self.weight_shape,
                             self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                             groups=self.groups, **self.packed_act_kwargs())

    def _make_eager_call(self, key, tensors):
        a_scale, a_zero, abits, _, act_symmetric = self._packed_act_args(tensors)  # (conv: per tensor)
        return packed_conv2d_call(key, *tensors[:3], self.lq.weight_bits, self.weight_shape, tensors[3], a_scale,
                                  a_zero, abits, act_symmetric, self.stride, self.padding, self.dilation, self.groups,
                                  self.backend)

    def frozen_call(self, relu: bool = False):
        """This packed layer as one C++ call ``f(x, residual=None)`` = ``relu(layer(x) + residual)`` (ReLU when
        ``relu``) with its tensors read now, or ``None`` where the CPU backend would not run it (another
        backend first, no activation quantizer). For ``dfqkern.compile(mode="frozen")``."""
        tensors = self._frozen_tensors()
        if self.a_quant is not None and self.a_quant.per_token:
            return None
        a_scale, a_zero, abits, _, act_symmetric = self._packed_act_args(tensors)  # as _make_eager_call
        return frozen_conv2d_call(*tensors[:3], self.lq.weight_bits, self.weight_shape, tensors[3], a_scale, a_zero,
                                  abits, act_symmetric, self.stride, self.padding, self.dilation, self.groups,
                                  self.backend, relu=relu)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + super().extra_repr())
