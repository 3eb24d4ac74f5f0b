"""The lean runtime: load a packed checkpoint and run it, with nothing of the quantization stack.

Everything a deployment process needs to serve a checkpoint written by :func:`dfqkern.save_quantized`::

    from dfqkern.runtime import compile, load_quantized, model_info
    model = load_quantized("resnet20-w4a8/")   # verified, rebuilt, packed kernels underneath
    model = compile(model)                     # optional: less Python per layer (batch-1 latency)
    spec = model_info(model).input_spec        # input size, mean / std the images need
    logits = model(images)

Importing this module loads the packed formats, the kernels and their dispatch, the quantized layers
and the checkpoint reader (``formats``, ``kernels``, ``nn``, ``io``), and never the calibration
(``dfqkern.calib``) or data generation (``dfqkern.datagen``) code, nor timm, diffusers, transformers
or tqdm (``tests/test_runtime_imports.py`` checks this in a fresh interpreter). A checkpoint of a
``timm:`` or ``torchvision:`` architecture still needs that library to rebuild the architecture.
"""
from __future__ import annotations

from .formats import ACT_BITS, PACK_LAYOUT, WEIGHT_BITS, PackedWeight, QuantScheme
from .input_spec import InputSpec
from .io import CheckpointError, checkpoint_summary, load_quantized, read_metadata
from .kernels import available_backends
from .model_info import ModelInfo, model_info
from .nn import QuantConv2d, QuantLayer, QuantLinear
from .quantize import set_backend
from .runtime_compile import compile  # noqa: A001

__all__ = ["ACT_BITS", "PACK_LAYOUT", "WEIGHT_BITS", "CheckpointError", "InputSpec", "ModelInfo", "PackedWeight",
           "QuantConv2d", "QuantLayer", "QuantLinear", "QuantScheme", "available_backends", "checkpoint_summary",
           "compile", "load_quantized", "model_info", "read_metadata", "set_backend"]
