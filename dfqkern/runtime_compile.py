"""``dfqkern.compile``: a packed model's forward with less per-layer Python overhead (batch-1 latency).

At batch 1 a small CNN's layers run for tens of microseconds each, so the Python around them (module
calls, identity modules left by BatchNorm folding, argument handling) is a large share of a forward.

``mode="graph"`` (default): ``torch.fx`` captures the forward once with every dfqkern layer as a leaf,
then each packed layer is called through its ``packed_forward`` (no ``nn.Module.__call__``), folded
BatchNorms (``nn.Identity``) vanish and ``nn.ReLU`` becomes ``torch.relu``. The layers keep their cached
eager calls and the checks that rebuild them, so weight writes are followed; the graph itself is a
snapshot of the model's structure (compile again after replacing a submodule). Layers with hooks stay
module calls. Exact: the same kernels in the same order.

``mode="inductor"``: ``torch.compile`` (Inductor; needs a C++ compiler on CPU). The packed layers are
the opaque custom ops ``dfqkern::packed_conv2d`` / ``packed_linear``, so Inductor compiles only the
float glue (ReLU, adds, pooling) and cannot fuse across them; on CPU at batch 1 each op's round trip
through the dispatcher and the custom-op wrapper costs more than the fused glue saves.

Measured (CIFAR ResNet-20 W4A8 packed, batch 1, one thread, a 2-core machine under load 4, so
relative): eager 1.34 ms median, ``graph`` 1.11 ms, ``inductor`` 2.02 ms.

ViTs trace too (``dfqkern.vit_nets``, timm): quantized attention modules stay leaf module calls (their packed
forward has its own cached eager call, :mod:`dfqkern.nn.packed_attention`), so ``graph`` only removes the
module calls of the Linears outside attention; on the trained CIFAR ViT at batch 1 that was within the noise
of a loaded machine (W8A8 / W4A8, one thread).
"""
from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import fx, nn

from .nn.attention import QuantAttentionBase
from .nn.base import QuantLayer

MODES = ("graph", "inductor")


class CompiledModel(nn.Module):
    """What :func:`compile` returns: ``forward`` runs the captured graph. The original model stays
    reachable as ``_orig_mod`` (as in ``torch.compile``'s wrapper), so ``dfqkern.model_info`` reads through."""

    def __init__(self, model: nn.Module, run, mode: str):
        super().__init__()
        self._orig_mod = model
        self.mode = mode
        object.__setattr__(self, "_run", run)  # a function, not a submodule: no second copy in state_dict

    def forward(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def __getstate__(self):  # the captured graph holds bound methods and generated code: capture again
        raise TypeError("a dfqkern.compile model cannot be pickled or copied; save or copy the original model "
                        "(compiled._orig_mod) and compile it again")

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, QuantAttentionBase)) or super().is_leaf_module(m, qualname)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _graph(model: nn.Module):
    gm = fx.GraphModule(model, _Tracer().trace(model))
    mods = dict(gm.named_modules())
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        m = mods[node.target]
        if _hooked(m):
            continue
        if isinstance(m, nn.Identity):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
            continue
        if isinstance(m, QuantLayer) and m.is_packed:
            target = m.packed_forward
        elif type(m) is nn.ReLU:
            target = torch.relu
        else:
            continue
        with g.inserting_after(node):
            new = g.call_function(target, node.args, node.kwargs)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm.forward  # the generated function, without GraphModule's own module call


def _cxx_compiler() -> str | None:
    return next((p for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and (p := shutil.which(c))), None)


def compile(model: nn.Module, mode: str = "graph", example_inputs: tuple | None = None,
            fallback: bool = True) -> nn.Module:
    """A low-overhead callable version of a (packed) dfqkern ``model``; see the module docstring.

    ``example_inputs``: run once before returning (Inductor compiles then), so a failure shows here.
    A capture or compile failure raises, or with ``fallback=True`` warns and returns ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple):
            raise TypeError(f"example_inputs must be a tensor or a tuple, got {type(example_inputs).__name__}")
    try:
        if mode == "inductor":
            if _cxx_compiler() is None:
                raise RuntimeError("mode='inductor' needs a C++ compiler on PATH (set CXX, or install g++ / clang++)")
            run = torch.compile(model)
        else:
            run = _graph(model)
        compiled = CompiledModel(model, run, mode)
        if example_inputs is not None:
            with torch.no_grad():
                compiled(*example_inputs)
    except Exception as e:
        if not fallback:
            raise
        warnings.warn(f"dfqkern.compile(mode={mode!r}) failed ({type(e).__name__}: {e}); the model runs eagerly",
                      RuntimeWarning, stacklevel=2)
        return model
    return compiled
