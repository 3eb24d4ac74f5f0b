"""Packed checkpoints: a directory with ``model.safetensors`` and ``config.json``. No pickle anywhere.

``config.json`` records the format version, package version, architecture id (a name
:func:`dfqkern.models.create_model` understands, or a user factory at load time), the
QuantConfig, the BatchNorms folded away, and per quantized layer its kind, bits, shapes and
packing layout; plus the sha256 of the tensor file, so corruption is detected on load.
Saving is atomic: everything is written to a temporary directory that is renamed into place.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__
from .config import LayerQuant, QuantConfig
from .formats import PACK_LAYOUT
from .nn import QuantConv2d, QuantLayer, QuantLinear
from .quantize import QuantReport, _set_module, pack_model, quant_layers

FORMAT = "dfqkern-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A packed checkpoint that cannot be loaded (missing, corrupt, other version or architecture)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layer_record(layer: QuantLayer) -> dict:
    rec = {
        "kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear",
        "weight_bits": layer.lq.weight_bits,
        "act_bits": layer.lq.act_bits,
        "weight_shape": list(layer.weight_shape),
        "k": layer.reduction_size,
        "bias": layer.bias is not None,
        "layout": PACK_LAYOUT,
    }
    if isinstance(layer, QuantConv2d):
        rec.update(stride=list(layer.stride), padding=list(layer.padding), dilation=list(layer.dilation),
                   groups=layer.groups)
    return rec


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False, arch: str | None = None,
                   arch_kwargs: dict | None = None) -> Path:
    """Write ``model`` (packed first, on a copy, if needed) as a packed checkpoint directory at ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output path {str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {str(path)!r} is a file, not a checkpoint directory")
    layers = dict(quant_layers(model))
    if not layers:
        raise ValueError("model has no quantized layers; call dfqkern.quantize_model first")
    cfg = getattr(model, "dfqkern_config", None)
    report = getattr(model, "dfqkern_report", None)
    if cfg is None or report is None:
        raise ValueError("model was not produced by dfqkern.quantize_model (no dfqkern_config / dfqkern_report)")
    if not all(layer.is_packed for layer in layers.values()):
        model = pack_model(copy.deepcopy(model))
        layers = dict(quant_layers(model))
    arch = arch or getattr(model, "dfqkern_arch", None)
    spec = getattr(model, "dfqkern_input_spec", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "arch": arch,
        "arch_kwargs": arch_kwargs if arch_kwargs is not None else getattr(model, "dfqkern_arch_kwargs", {}),
        "input_spec": spec.to_dict() if spec is not None else None,
        "quant_config": cfg.to_dict(),
        "folded_bn": report.folded_bn,
        "unhandled": report.unhandled,
        "layers": {name: _layer_record(layer) for name, layer in layers.items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's ``config.json``, validated for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON (truncated or corrupted?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a {FORMAT} checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format_version {meta.get('format_version')!r}; this dfqkern "
                              f"({__version__}) reads version {FORMAT_VERSION}")
    return meta


def _read_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_FILE}")
    if meta.get("weights_sha256") and _sha256(wfile) != meta["weights_sha256"]:
        raise CheckpointError(f"{wfile} does not match the sha256 in {CONFIG_FILE}: the file is truncated or corrupted")
    try:
        return load_file(str(wfile), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise CheckpointError(f"{wfile} cannot be read: {e}") from e


def _packed_layer(rec: dict, cfg: QuantConfig) -> QuantLayer:
    lq = LayerQuant(rec["weight_bits"], rec["act_bits"])
    shape = rec["weight_shape"]
    if rec["kind"] == "linear":
        return QuantLinear(shape[1], shape[0], rec["bias"], lq, cfg, packed=True)
    return QuantConv2d(shape[1] * rec["groups"], shape[0], shape[2:], rec["stride"], rec["padding"], rec["dilation"],
                       rec["groups"], rec["bias"], lq, cfg, packed=True)


def _check_float_module(name: str, module: nn.Module | None, rec: dict, arch) -> None:
    expected = nn.Conv2d if rec["kind"] == "conv2d" else nn.Linear
    if not isinstance(module, expected):
        raise CheckpointError(f"checkpoint is for another architecture: layer {name!r} should be a "
                              f"{expected.__name__} in {arch!r}, found {type(module).__name__ if module else 'nothing'}")
    if list(module.weight.shape) != rec["weight_shape"]:
        raise CheckpointError(f"checkpoint is for another architecture: layer {name!r} has weight shape "
                              f"{rec['weight_shape']} in the checkpoint but {list(module.weight.shape)} in {arch!r}")


def load_quantized(path: str | os.PathLike, factory: Callable[[], nn.Module] | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a packed model from :func:`save_quantized` output.

    The float architecture comes from ``factory()`` if given, else from the registry by the
    recorded ``arch`` id; its weights are irrelevant (every tensor comes from the checkpoint).
    """
    from .models import InputSpec, create_model

    path = Path(path)
    meta = read_metadata(path)
    arch = meta.get("arch")
    if factory is not None:
        model = factory()
    elif arch:
        try:
            model = create_model(arch, **meta.get("arch_kwargs", {}))
        except ValueError as e:
            raise CheckpointError(f"cannot rebuild architecture {arch!r} of {str(path)!r}: {e}; "
                                  f"pass factory= to load_quantized") from e
    else:
        raise CheckpointError(f"{str(path)!r} records no architecture id; pass factory= to load_quantized")
    cfg = QuantConfig.from_dict(meta["quant_config"])
    state = _read_weights(path, meta)
    model.eval()
    for bn_name in meta.get("folded_bn", {}):
        try:
            model.get_submodule(bn_name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint is for another architecture: no module {bn_name!r} in {arch!r}") from e
        _set_module(model, bn_name, nn.Identity())
    for name, rec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        _check_float_module(name, module, rec, arch)
        _set_module(model, name, _packed_layer(rec, cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match architecture {arch!r}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.dfqkern_arch = arch
    model.dfqkern_arch_kwargs = meta.get("arch_kwargs", {})
    model.dfqkern_config = cfg
    model.dfqkern_report = QuantReport(
        layers={n: LayerQuant(r["weight_bits"], r["act_bits"]) for n, r in meta["layers"].items()},
        folded_bn=meta.get("folded_bn", {}), unhandled=meta.get("unhandled", {}))
    if meta.get("input_spec"):
        model.dfqkern_input_spec = InputSpec.from_dict(meta["input_spec"])
    return model.to(device).eval()


def checkpoint_summary(path: str | os.PathLike) -> dict:
    """Layers, bits and sizes of a packed checkpoint, next to the float model's size."""
    path = Path(path)
    meta = read_metadata(path)
    state = _read_weights(path, meta)
    packed_bytes = sum(t.numel() * t.element_size() for t in state.values())
    float_bytes = 0
    quant_prefixes = set()
    for name, rec in meta["layers"].items():
        n = 1
        for d in rec["weight_shape"]:
            n *= d
        float_bytes += 4 * (n + (rec["weight_shape"][0] if rec["bias"] else 0))
        quant_prefixes.add(name + ".")
    for key, t in state.items():  # everything that is not a quantized layer stays float in both
        if not any(key.startswith(p) for p in quant_prefixes):
            float_bytes += t.numel() * t.element_size()
    return {
        "path": str(path), "arch": meta.get("arch"), "package_version": meta.get("package_version"),
        "scheme": QuantConfig.from_dict(meta["quant_config"]).scheme_name,
        "layers": meta["layers"], "unhandled": meta.get("unhandled", {}),
        "checkpoint_bytes": packed_bytes, "float_bytes": float_bytes,
        "compression": float_bytes / max(packed_bytes, 1),
    }
