"""Kernel ops: the pure-torch reference and the backends that must match it.

Use the dispatching wrappers (``dfqkern.kernels.dispatch.linear`` etc.) in library code; tests
compare ``dispatch.call(op, ..., backend=X)`` against :mod:`dfqkern.kernels.reference`. The
argument contract every op is checked against (once, by dispatch) is :mod:`dfqkern.kernels.contract`.
"""
from . import contract, dispatch, reference
from .dispatch import Backend, available_backends
from .reference import ActQuant, Unsupported

__all__ = ["ActQuant", "Backend", "Unsupported", "available_backends", "contract", "dispatch", "reference"]
