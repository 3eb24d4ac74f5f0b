"""Triton backend (see :mod:`dfqkern.kernels.dispatch` for the contract).

Importing this module imports ``triton`` (never done by ``import dfqkern``) but queries no
device. Kernels run on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before this module is first
imported) they run in Triton's interpreter on any device, which is how the CPU tests use them.

Not implemented here (raise :class:`Unsupported`, so dispatch falls back to the next backend):
weight-only ``conv2d`` (``act=None``), grouped convolution other than depthwise, non-uint8 codes
for ``conv2d_int``, bfloat16 under the interpreter; ``quantize`` / ``dequantize`` are not provided
(plain elementwise torch is already memory-bound).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:  # optional dependency: the backend reports itself unavailable
    _HAVE_TRITON = False
    INTERPRET = False
else:
    _HAVE_TRITON = True
    from .common import INTERPRET

DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)


def is_available() -> bool:
    """True when triton imports and there is something to run it on (a CUDA device or the interpreter)."""
    if not _HAVE_TRITON:
        return False
    if INTERPRET:
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if _HAVE_TRITON:
    from .act_quant import quantize_activation
    from .gemm import linear, linear_int

    __all__ = ["DEVICES", "INTERPRET", "is_available", "linear", "linear_int", "quantize_activation"]
    from .conv2d import conv2d, conv2d_int

    __all__ += ["conv2d", "conv2d_int"]
    from .fake_quant import fake_quant_backward, fake_quant_forward

    __all__ += ["fake_quant_backward", "fake_quant_forward"]
    from .adaround import adaround_backward, adaround_forward

    __all__ += ["adaround_backward", "adaround_forward"]
    from .matmul import matmul_int

    __all__ += ["matmul_int"]
