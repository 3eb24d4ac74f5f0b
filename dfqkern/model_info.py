"""What dfqkern knows about a model, in one typed record attached to it.

A model built by :func:`dfqkern.models.create_model`, quantized by :func:`dfqkern.quantize_model`,
calibrated or loaded from a checkpoint carries one :class:`ModelInfo` (attribute ``dfqkern_info``)
instead of loose attributes. :func:`model_info` reads it through the wrappers users put around a
model (``torch.compile``, ``DistributedDataParallel`` / ``DataParallel``), so saving or evaluating a
wrapped model still finds its architecture, config and reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # the types only: this module sits below everything that defines them
    from .calib.report import CalibReport
    from .config import QuantConfig, QuantReport
    from .input_spec import InputSpec

INFO_ATTR = "dfqkern_info"


@dataclass
class ModelInfo:
    arch: str | None = None  # registry name, "timm:NAME" or "torchvision:NAME" the model was built from
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # what the loader may rebuild it with (io.ARCH_KWARGS)
    input_spec: InputSpec | None = None  # preprocessing contract (input size, mean, std)
    config: QuantConfig | None = None  # set by quantize_model / load_quantized
    report: QuantReport | None = None  # per-layer bits and what stayed float (quantize_model)
    calib_report: CalibReport | None = None  # what calibrate() did (units, guard decisions)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``torch.compile`` (``_orig_mod``) and data-parallel (``module``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = model.__dict__.get("_modules", {})
        if "_orig_mod" in inner:  # torch._dynamo OptimizedModule
            model = inner["_orig_mod"]
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
    return model


def model_info(model: nn.Module) -> ModelInfo:
    """The model's record (read through wrappers); an empty, unattached one if it has none."""
    info = unwrap(model).__dict__.get(INFO_ATTR)
    return info if info is not None else ModelInfo()


def set_info(model: nn.Module, **fields) -> ModelInfo:
    """Set ``fields`` on the model's record, attaching one first if it has none."""
    target = unwrap(model)
    info = target.__dict__.get(INFO_ATTR)
    if info is None:
        info = ModelInfo()
        object.__setattr__(target, INFO_ATTR, info)
    for name, value in fields.items():
        if name not in ModelInfo.__dataclass_fields__:
            raise AttributeError(f"ModelInfo has no field {name!r}")
        setattr(info, name, value)
    return info
