"""Reconstruction units: registered block types (matched with isinstance) and lone quantized layers.

A block is reconstructed as a whole (BRECQ); a quantized layer outside every block is
reconstructed alone. Library block types are resolved lazily and only from libraries the
process has already imported (a timm block cannot be in a model unless timm is loaded), so
finding units never imports timm or torchvision.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import QuantLayer

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


def find_units(model: nn.Module, blockwise: bool = True) -> list[Unit]:
    """Units in registration order: registered blocks holding a quantized layer, and the quantized
    layers outside them. ``blockwise=False`` makes every quantized layer its own unit (AdaRound)."""
    types = block_types() if blockwise else ()
    units: list[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, QuantLayer):
                units.append(Unit(name, child, "layer"))
            elif types and isinstance(child, types) and any(isinstance(m, QuantLayer) for m in child.modules()):
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
