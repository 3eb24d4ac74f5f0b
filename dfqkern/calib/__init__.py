"""Calibration: observer ranges and AdaRound / BRECQ / QDrop / Genie-M reconstruction.

``calibrate(qmodel, fp_model, data, CalibConfig(method=..., iters=...))`` is the one entry point.
"""
from ..nn.observe import observe_activations
from .config import METHODS, CalibConfig
from .ln_reparam import LNReparamReport, reparameterize_layernorms
from .reconstruct import calibrate, calibration_data
from .report import CalibReport, UnitReport
from .units import Unit, block_types, find_units, register_block
from .vit import QuantAttention, quantize_attention

__all__ = [
    "METHODS", "CalibConfig", "CalibReport", "LNReparamReport", "QuantAttention", "Unit", "UnitReport", "block_types",
    "calibrate", "calibration_data", "find_units", "observe_activations", "quantize_attention", "register_block",
    "reparameterize_layernorms",
]
