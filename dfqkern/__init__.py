"""dfqkern: data-free quantization of vision models with packed low-bit kernels.

Public API (``import dfqkern`` never imports triton, diffusers or timm and never touches CUDA)::

    qmodel = dfqkern.quantize_model(model, dfqkern.QuantConfig(weight_bits=4, act_bits=4))
    dfqkern.calibrate_activations(qmodel, images)          # observer ranges
    qmodel = dfqkern.calibrate(qmodel, model, images, dfqkern.CalibConfig(method="qdrop"))
    dfqkern.pack_model(qmodel); dfqkern.save_quantized(qmodel, "out/")
"""
from ._version import __version__  # noqa: F401
from .config import LayerRule, QuantConfig, preset
from .formats import PackedWeight, QuantScheme
from .io import checkpoint_summary, load_quantized, save_quantized
from .kernels import available_backends
from .nn import QuantConv2d, QuantLinear
from .quantize import calibrate_activations, fold_batchnorm, pack_model, quantize_model
from .runtime_compile import compile  # noqa: A001  (dfqkern.compile, not the builtin)

_LAZY = {"calibrate": ("dfqkern.calib", "calibrate"), "CalibConfig": ("dfqkern.calib", "CalibConfig"),
         "create_model": ("dfqkern.models", "create_model")}


def __getattr__(name):  # calibration and the model registry load on first use
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'dfqkern' has no attribute {name!r}")


__all__ = ["CalibConfig", "LayerRule", "PackedWeight", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantScheme",
           "available_backends", "calibrate", "calibrate_activations", "checkpoint_summary", "compile", "create_model",
           "fold_batchnorm", "load_quantized", "pack_model", "preset", "quantize_model", "save_quantized"]
