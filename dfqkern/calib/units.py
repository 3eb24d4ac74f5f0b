"""Reconstruction units: blocks and lone quantized layers.

A block is reconstructed as a whole (BRECQ); a quantized layer outside every block is
reconstructed alone. Blocks are found two ways:

- by type: registered classes and known library blocks (matched with isinstance). Library block
  types are resolved lazily and only from libraries the process has already imported (a timm block
  cannot be in a model unless timm is loaded), so finding units never imports timm or torchvision;
- by structure (:mod:`dfqkern.calib.structure`): the innermost module holding two or more
  quantized layers whose own forward merges two paths from its input (a residual add, or a
  split / concat as in ShuffleNetV2), and every other instance of such a module's class (a
  MobileNetV2 block without its residual is still that block). So a user's copy of an
  inverted-residual or shuffle block is reconstructed as a block without being registered.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import QuantLayer
from .structure import merges_input_paths

# (module path, class name) of library blocks. Resolved with importlib, then matched by isinstance.
_LIBRARY_BLOCKS = (
    ("dfqkern.models", "CifarBasicBlock"),
    ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"),
    ("torchvision.models.mobilenetv2", "InvertedResidual"),
    ("timm.models.resnet", "BasicBlock"),
    ("timm.models.resnet", "Bottleneck"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"),
    ("timm.models.vision_transformer", "Block"),
)
_USER_BLOCKS: list[type] = []


def register_block(cls: type) -> type:
    """Make every instance of ``cls`` (an nn.Module subclass) one reconstruction unit. Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if cls not in _USER_BLOCKS:
        _USER_BLOCKS.append(cls)
    return cls


def block_types() -> tuple[type, ...]:
    """Block classes currently known: registered ones and those of the already-imported libraries."""
    found = list(_USER_BLOCKS)
    for mod_name, cls_name in _LIBRARY_BLOCKS:
        root = mod_name.split(".")[0]
        if root != "dfqkern" and root not in sys.modules:
            continue
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError):  # another library version without this class
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


@dataclass
class Unit:
    """One reconstruction unit: a block or a lone quantized layer."""

    name: str
    module: nn.Module
    kind: str  # "block" or "layer"

    def quant_layers(self) -> list[QuantLayer]:
        return [m for m in self.module.modules() if isinstance(m, QuantLayer)]


def _count_quant_layers(module: nn.Module) -> int:
    return sum(isinstance(m, QuantLayer) for m in module.modules())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def structural_blocks(model: nn.Module, known: tuple[type, ...] = ()) -> tuple[tuple[type, ...], set[int]]:
    """The innermost modules of ``model`` that merge two paths from their input around two or more
    quantized layers (see the module docstring): their classes, and the ids of the generic containers
    (``nn.Sequential`` ...) among them, which stand for themselves rather than for their class.
    Instances of the ``known`` block types count as blocks already (their parents are not searched)."""
    found: list[type] = []
    containers: set[int] = set()

    def visit(module: nn.Module) -> bool:  # True when ``module`` or a descendant is a merging block
        if module is not model and known and isinstance(module, known):
            return True
        inner = [visit(child) for child in module.children()]
        if any(inner):
            return True
        if module is model or isinstance(module, QuantLayer) or _count_quant_layers(module) < 2:
            return False
        if merges_input_paths(module):
            if isinstance(module, _CONTAINERS):
                containers.add(id(module))
            elif type(module) not in found:
                found.append(type(module))
            return True
        return False

    visit(model)
    return tuple(found), containers


def find_units(model: nn.Module, blockwise: bool = True) -> list[Unit]:
    """Units in registration order: blocks (by type or structure) holding a quantized layer, and the
    quantized layers outside them. ``blockwise=False`` makes every quantized layer its own unit (AdaRound)."""
    types = block_types() if blockwise else ()
    shaped, shaped_containers = structural_blocks(model, types) if blockwise else ((), set())
    units: list[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, QuantLayer):
                units.append(Unit(name, child, "layer"))
            elif types and isinstance(child, types) and _count_quant_layers(child):
                units.append(Unit(name, child, "block"))
            elif (type(child) in shaped or id(child) in shaped_containers) and _count_quant_layers(child) >= 2:
                units.append(Unit(name, child, "block"))
            else:
                visit(name, child)

    if isinstance(model, QuantLayer):
        return [Unit("", model, "layer")]
    visit("", model)
    return units


@torch.no_grad()
def execution_order(model: nn.Module, units: list[Unit], example: torch.Tensor) -> list[Unit]:
    """``units`` sorted by when they first run on ``example``; units the forward never reaches are dropped.

    Reconstruction must follow execution: a unit's quantized input comes from the units before it.
    """
    seen: dict[int, int] = {}
    calls = [0] * len(units)
    handles = []
    for i, u in enumerate(units):
        def hook(mod, args, i=i):
            seen.setdefault(i, len(seen))
            calls[i] += 1
        handles.append(u.module.register_forward_pre_hook(hook))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    shared = [units[i].name for i, c in enumerate(calls) if c > 1]
    if shared:
        raise ValueError(f"modules {shared} run more than once per forward (shared weights); reconstruction "
                         f"needs one input per unit")
    return [units[i] for i in sorted(seen, key=seen.get)]
