"""Does a module's forward merge two paths that both start at its input? (a residual add, a concat)

Read from the module's traced graph (torch.fx), with quantized layers and torch.nn layers kept as
leaves. A merge is an ``add`` or ``cat``/``stack`` whose tensor operands include at least two
distinct values computed from the module's input: ``x + f(x)`` (ResNet / MobileNetV2),
``cat(x1, f(x2))`` after ``x.chunk(2)`` and ``cat(f(x), g(x))`` (ShuffleNetV2). Adding a
parameter or a constant (``x + self.bias``) is not a merge. A module fx cannot trace (data-dependent
control flow, several inputs) is not a block by structure; ``register_block`` covers it.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..nn import QuantLayer

_ADDS = {operator.add, operator.iadd, torch.add}
_CONCATS = {torch.cat, torch.concat, torch.stack}
_ADD_METHODS = {"add", "add_"}


def _leaf_tracer():
    """A torch.fx tracer that keeps quantized layers (and torch.nn's own layers) as single calls."""
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)

    return Tracer()


def _tensor_operands(node) -> list:
    import torch.fx

    if node.op == "call_function" and node.target in _CONCATS:
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in seq if isinstance(a, torch.fx.Node)]
    if (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method"
                                                                  and node.target in _ADD_METHODS):
        return [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    return []


def merges_input_paths(module: nn.Module) -> bool:
    """True when ``module``'s forward merges two distinct values that both depend on its (single) input."""
    try:
        graph = _leaf_tracer().trace(module)
    except Exception:  # noqa: BLE001 - anything fx cannot trace is simply not found by structure
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    from_input = {inputs[0]}
    for node in graph.nodes:  # topological order: a node depends on the input if any argument does
        if node.op != "placeholder" and any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)
    return any(len({a for a in _tensor_operands(n) if a in from_input}) >= 2 for n in graph.nodes)
