"""Drop-in quantized modules and their quantizers."""
from .base import QuantLayer
from .conv import QuantConv2d
from .linear import QuantLinear
from .quantizers import ActQuantizer, WeightQuantizer

__all__ = ["ActQuantizer", "QuantConv2d", "QuantLayer", "QuantLinear", "WeightQuantizer"]
