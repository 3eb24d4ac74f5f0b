"""``dfqkern.compile``: a packed model's forward with less per-layer Python overhead (batch-1 latency).

At batch 1 a small CNN's layers run for tens of microseconds each, so the Python around them (module
calls, identity modules left by BatchNorm folding, argument handling, separate add / ReLU ops) is a
large share of a forward.

``mode="frozen"`` (default): ``torch.fx`` captures the forward once with every dfqkern layer as a leaf;
folded BatchNorms (``nn.Identity``) vanish, ``nn.ReLU`` becomes ``torch.relu``, and each packed conv the
CPU backend runs becomes one C++ call with its weights, scales and geometry bound
(:meth:`~dfqkern.nn.conv.QuantConv2d.frozen_call`), fused with the residual add and / or ReLU that only
it feeds (``relu(conv(x) + r)``: the same fp32 add and ReLU, run by the conv's work items on the block they just
wrote, so the logits are the packed model's bit for bit); packed Linears with static activations become bound C++
calls too. Two such calls where the first's output (after its ReLU) feeds only the second become one chained call
(:func:`~dfqkern.kernels.cpu.conv2d_chain_call`: the first conv writes NHWC fp32, the second quantizes it there,
no NCHW round trip, transpose or ReLU pass), and a call's output that reaches only other frozen calls (directly
or through slicing / ``F.pad``) is written channels-last, which the next conv reads in place; outputs seen by
any other op stay NCHW, so the float glue computes what the eager model computes. The bound tensors are read once: after an in-place write to a layer's weights or quantizer (e.g.
``load_state_dict``) its call raises until the model is compiled again; a tensor *replaced* rather than written
(``load_state_dict(assign=True)``, ``.to()`` another device) is not seen, so compile again after those too. Other packed layers (Linear,
attention, convs another backend runs) are called as in ``graph`` mode.

``mode="graph"``: the same capture, every packed layer called through its ``packed_forward`` (no
``nn.Module.__call__``), which keeps its cached eager call and the checks that rebuild it, so weight writes
are followed; the graph itself is a snapshot of the model's structure (compile again after replacing a
submodule). Layers with hooks stay module calls in both modes. Exact: the same kernels in the same order.

``mode="inductor"``: ``torch.compile`` (Inductor; needs a C++ compiler on CPU). The packed layers are
the opaque custom ops ``dfqkern::packed_conv2d`` / ``packed_linear``, so Inductor compiles only the
float glue (ReLU, adds, pooling) and cannot fuse across them; on CPU at batch 1 each op's round trip
through the dispatcher and the custom-op wrapper costs more than the fused glue saves.

Measured (CIFAR ResNet-20 W4A8 packed, batch 1, AVX2-only AMD EPYC, quiet, median of 500): 1 thread
eager 1.68 ms, ``graph`` 1.30 ms, ``frozen`` 0.87 ms; 2 threads 1.51 / 1.11 / 0.69 ms (before the chained calls).
Xeon VNNI (AMX machine), quiet, minima of 3000: ``frozen`` without / with chains, channels-last, frozen Linears and
the residual add in the conv epilogue: 1 thread 0.42 / 0.36 ms, 2 threads 0.41 / 0.32 ms. Earlier
(a 2-core machine under load 4, one thread): eager 1.34 ms, ``graph`` 1.11 ms, ``inductor`` 2.02 ms.

ViTs trace too (``dfqkern.vit_nets``, timm): quantized attention modules stay leaf module calls (their packed
forward has its own cached eager call, :mod:`dfqkern.nn.packed_attention`), so ``graph`` only removes the
module calls of the Linears outside attention; on the trained CIFAR ViT at batch 1 that was within the noise
of a loaded machine (W8A8 / W4A8, one thread).
"""
from __future__ import annotations

import operator
import os
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn.attention import QuantAttentionBase
from .nn.base import QuantLayer
from .nn.conv import QuantConv2d
from .nn.linear import QuantLinear

MODES = ("graph", "frozen", "inductor")


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


_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)


def _is_relu(node: fx.Node) -> bool:
    """``node`` is a plain ReLU of one tensor (``F.relu``'s ``inplace`` changes nothing the graph can see)."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _residual_of(node: fx.Node, conv: fx.Node) -> "fx.Node | None":
    """The other operand when ``node`` is ``conv + other`` of two tensors, else ``None``. In-place adds only with
    the conv's own output as the target: ``other += conv`` also changes ``other`` for its other users."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        other = b if a is conv else a
    elif (node.op == "call_function" and node.target is operator.iadd) or (
            node.op == "call_method" and node.target in ("add", "add_")):
        other = b if a is conv else None
    else:
        return None
    return other if isinstance(other, fx.Node) and other is not conv else None


def _freeze_conv(g: fx.Graph, node: fx.Node, m: nn.Module):
    """Replaces a packed conv node and the residual add / ReLU that only it feeds by one call of the layer's
    :meth:`~dfqkern.nn.conv.QuantConv2d.frozen_call`; returns the nodes it replaced, the new node and the call,
    or ``None`` (left as is)."""
    chain, residual, relu = [node], None, False
    if len(node.users) == 1:
        u = next(iter(node.users))
        if _is_relu(u):
            chain.append(u)
            relu = True
        elif (residual := _residual_of(u, node)) is not None:
            chain.append(u)
            if len(u.users) == 1 and _is_relu(nxt := next(iter(u.users))):
                chain.append(nxt)
                relu = True
    call = m.frozen_call(relu=relu)
    if call is None:
        return None
    last = chain[-1]
    with g.inserting_after(last):  # after the residual's definition too: it feeds the add
        new = g.call_function(call.__call__, (node.args[0],) + ((residual,) if residual is not None else ()))
    last.replace_all_uses_with(new)
    for n in reversed(chain):
        g.erase_node(n)
    return chain, new, call


def _chain_convs(g: fx.Graph, frozen: dict) -> None:
    """Merges each frozen conv call whose output (after its ReLU) feeds only the next frozen conv, as that call's
    input, into one :func:`~dfqkern.kernels.cpu.conv2d_chain_call`, in graph order; a conv already merged as the
    second of a pair starts no pair. ``frozen`` (node -> its call) is updated to the merged graph."""
    from .kernels import cpu

    for node in list(frozen):
        if node not in frozen or len(node.args) != 1 or len(node.users) != 1:
            continue  # merged already, or the first conv of a pair would take a residual / feed several nodes
        nxt = next(iter(node.users))
        if nxt not in frozen or nxt.args[0] is not node or node in nxt.args[1:]:
            continue
        pair = cpu.conv2d_chain_call(frozen[node], frozen[nxt])
        if pair is None:
            continue
        with g.inserting_after(nxt):
            new = g.call_function(pair.__call__, (node.args[0],) + tuple(nxt.args[1:]))
        nxt.replace_all_uses_with(new)
        g.erase_node(nxt)
        g.erase_node(node)
        del frozen[node], frozen[nxt]
        frozen[new] = pair


# Glue whose values do not depend on its input's memory layout, so it may carry a channels-last tensor from one
# frozen conv to another: ResNet's option-A shortcut (x[:, :, ::2, ::2] then F.pad) and max pooling (a max is
# the same whichever order it reads, NaN included; average pooling is not: a channels-last kernel may sum in
# another order). All keep channels-last. Max pooling matters for speed too: ATen's NCHW max_pool2d is ~20x
# slower than its channels-last kernel (ResNet-18's stem pool: 7.2 ms vs 0.34 ms, 1 thread, torch 2.14, Zen 4).
_LAYOUT_FREE_GLUE = (operator.getitem, F.pad)
_MAX_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


def _layout_free(node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _LAYOUT_FREE_GLUE:
            return True
        return node.target in _MAX_POOL_FUNCTIONS and not node.kwargs.get("return_indices", False) \
            and len(node.args) < 7  # positional return_indices (7th argument) not followed
    if node.op == "call_module":
        m = node.graph.owning_module.get_submodule(node.target)
        return type(m) is nn.MaxPool2d and not m.return_indices
    return False


def _reaches_only_frozen(node: fx.Node, frozen: dict) -> bool:
    return bool(node.users) and all(
        u in frozen or (_layout_free(u) and _reaches_only_frozen(u, frozen)) for u in node.users)


def _channels_last_between_convs(frozen: dict) -> None:
    """A frozen call whose output reaches only other frozen calls (directly or through layout-free glue) writes it
    channels-last (the same values; the next conv reads its pixels without a transpose, and a residual add meets an
    output of the same layout). Any other user (pooling, the model's output) keeps NCHW, so the float glue computes
    exactly what the eager model computes."""
    for node, call in frozen.items():
        if _reaches_only_frozen(node, frozen):
            call.channels_last_out = True


def _graph(model: nn.Module, frozen: bool = False):
    gm = fx.GraphModule(model, _Tracer().trace(model))
    mods = dict(gm.named_modules())
    g = gm.graph
    for node in list(g.nodes):  # folded BatchNorms vanish, ReLU modules become torch.relu
        if node.op != "call_module" or _hooked(m := mods[node.target]):
            continue
        if isinstance(m, nn.Identity):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
        elif type(m) is nn.ReLU:
            with g.inserting_after(node):
                new = g.call_function(torch.relu, node.args)
            node.replace_all_uses_with(new)
            g.erase_node(node)
    gone: set = set()
    frozen_calls: dict = {}
    for node in list(g.nodes):
        if node in gone or node.op != "call_module":
            continue
        m = mods[node.target]
        if _hooked(m) or not (isinstance(m, QuantLayer) and m.is_packed):
            continue
        if frozen and isinstance(m, QuantConv2d) and len(node.args) == 1 and not node.kwargs:
            replaced = _freeze_conv(g, node, m)
            if replaced is not None:
                gone.update(replaced[0])
                frozen_calls[replaced[1]] = replaced[2]
                continue
        if frozen and isinstance(m, QuantLinear) and len(node.args) == 1 and not node.kwargs:
            call = m.frozen_call()
            if call is not None:
                with g.inserting_after(node):
                    new = g.call_function(call.__call__, node.args)
                node.replace_all_uses_with(new)
                g.erase_node(node)
                continue
        with g.inserting_after(node):
            new = g.call_function(m.packed_forward, node.args, node.kwargs)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    _chain_convs(g, frozen_calls)
    _channels_last_between_convs(frozen_calls)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm.forward  # the generated function, without GraphModule's own module call


def _cxx_compiler() -> str | None:
    return next((p for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and (p := shutil.which(c))), None)


def compile(model: nn.Module, mode: str = "frozen", example_inputs: tuple | None = None,
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
            run = _graph(model, frozen=mode == "frozen")
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
