"""Ways out of Python for a packed model: ONNX QDQ graphs and torch.export / AOTInductor packages.

* :func:`export_onnx` (:mod:`dfqkern.export.onnx`): standard QuantizeLinear / DequantizeLinear
  graphs for onnxruntime and TensorRT (needs ``pip install dfqkern[export]``).
* :func:`export_pt2` / :func:`load_pt2` (:mod:`dfqkern.export.pt2`): an AOTInductor ``.pt2`` package
  run by torch plus the dfqkern extension.

Importing this package imports neither onnx nor the exporters: each loads on first use.
"""
from __future__ import annotations

_LAZY = {"export_onnx": "onnx", "onnx_export_problems": "onnx", "onnxruntime_session": "onnx",
         "OnnxExportError": "onnx", "export_pt2": "pt2", "load_pt2": "pt2"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
