"""Packed checkpoints: a directory with ``model.safetensors`` and ``config.json``. No pickle anywhere.

``config.json`` records the format version, package version, architecture id (a name
:func:`dfqkern.models.create_model` understands, or a user factory at load time) with at most the
allow-listed :data:`ARCH_KWARGS`, the QuantConfig, the BatchNorms folded away, and per quantized
layer its kind, bits, shapes and packing layout, and per swapped attention module its kind and
matmul bits (``attention``: rebuilt from the float module by the same swap quantize_model made, so
its quantizers exist before the tensors are loaded); plus ``weights_sha256`` (the tensor file) and
``config_sha256`` (the canonical JSON of everything else in config.json), so corruption and edits
are detected on load. Loading never downloads and never opens a file outside the checkpoint:
the architecture comes from the id and the allow-listed keys only, and every field is validated
(and conv geometry checked against the rebuilt architecture) before it is used.
Saving is atomic (a temporary directory renamed into place) and follows the umask.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._version import __version__
from .config import LayerQuant, QuantConfig
from .formats import ACT_BITS, PACK_LAYOUT, WEIGHT_BITS
from .nn import QuantConv2d, QuantLayer, QuantLinear
from .nn.attention import ATTENTION_KINDS, QuantAttentionBase, SwappedModule, disable_nested_fast_path
from .quantize import QuantReport, set_module, pack_model, quant_layers
from .model_info import model_info, set_info, unwrap
from .outputs import replace_dir

FORMAT = "dfqkern-packed"
FORMAT_VERSION = 1  # config_sha256 is an additive field: version-1 readers still load new checkpoints
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_HASH_FIELD = "config_sha256"
TRUST_HINT = "pass trust_unverified=True (CLI: --trust-unverified) only if you trust where it came from"
MAX_NUM_CLASSES = 100_000  # bounds the classifier a checkpoint can make the loader allocate


def _check_num_classes(v) -> str | None:
    if type(v) is not int or not 1 <= v <= MAX_NUM_CLASSES:
        return f"must be an int in [1, {MAX_NUM_CLASSES}], got {v!r}"
    return None


# The only create_model keywords a checkpoint may carry (the one owner of this list). Anything else,
# ``pretrained`` (a download) and ``checkpoint`` (another file) above all, is refused on save and load.
ARCH_KWARGS: dict[str, Callable[[object], str | None]] = {"num_classes": _check_num_classes}


class CheckpointError(ValueError):
    """A packed checkpoint that cannot be loaded (missing, corrupt, unverified, malformed, other
    version or architecture). The message names the file; ``path`` holds it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = None if path is None else Path(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(meta: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, ASCII escapes) of ``meta`` without
    its ``config_sha256`` field; it covers ``weights_sha256`` too, so one check pins both files."""
    body = {k: v for k, v in meta.items() if k != CONFIG_HASH_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _arch_kwargs_problem(kwargs) -> tuple[str, str] | None:
    """(field, problem) of the first arch_kwargs entry outside :data:`ARCH_KWARGS`, else None."""
    if not isinstance(kwargs, dict):
        return "arch_kwargs", f"must be an object, got {type(kwargs).__name__}"
    for key, value in kwargs.items():
        if key not in ARCH_KWARGS:
            return (f"arch_kwargs[{key!r}]", f"is not allowed: a checkpoint rebuilds its architecture from the id "
                    f"plus {sorted(ARCH_KWARGS)} only (loading never downloads weights or reads other files)")
        problem = ARCH_KWARGS[key](value)
        if problem:
            return f"arch_kwargs[{key!r}]", problem
    return None


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    # os.mkdir, not tempfile.mkdtemp: mkdtemp forces 0700, a plain mkdir gets what the umask allows
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary directory {prefix}* in {str(parent)!r}")


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


def _attention_records(model: nn.Module) -> dict:
    return {name: {"kind": m.kind, "bits": m.bits if isinstance(m, QuantAttentionBase) else None}
            for name, m in model.named_modules() if isinstance(m, SwappedModule)}


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False, arch: str | None = None,
                   arch_kwargs: dict | None = None) -> Path:
    """Write ``model`` (packed first, on a copy, if needed) as a packed checkpoint directory at ``path``."""
    from safetensors.torch import save as serialize

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output path {str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {str(path)!r} is a file, not a checkpoint directory")
    model = unwrap(model)  # torch.compile / DDP wrappers: the layer names are the user's module's
    layers = dict(quant_layers(model))
    if not layers:
        raise ValueError("model has no quantized layers; call dfqkern.quantize_model first")
    info = model_info(model)
    cfg, report = info.config, info.report
    if cfg is None or report is None:
        raise ValueError("model was not produced by dfqkern.quantize_model (its ModelInfo has no config / report)")
    if not all(layer.is_packed for layer in layers.values()):
        model = pack_model(copy.deepcopy(model))
        layers = dict(quant_layers(model))
    arch = arch or model_info(model).arch
    if arch_kwargs is None:
        arch_kwargs = model_info(model).arch_kwargs
    problem = _arch_kwargs_problem(arch_kwargs)
    if problem:  # refused now rather than written into a checkpoint that loading would reject
        raise ValueError(f"save_quantized: {problem[0]} {problem[1]}")
    arch_kwargs = dict(arch_kwargs)
    spec = model_info(model).input_spec
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "input_spec": spec.to_dict() if spec is not None else None,
        "quant_config": cfg.to_dict(),
        "folded_bn": report.folded_bn,
        "unhandled": report.unhandled,
        "layers": {name: _layer_record(layer) for name, layer in layers.items()},
        "attention": _attention_records(model),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdir_unique(path.parent, f".{path.name}.")
    try:
        # serialized here and written with open(): safetensors' save_file creates its files 0600
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            f.write(serialize(state, metadata={"format": FORMAT}))
        meta["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        meta[CONFIG_HASH_FIELD] = config_sha256(meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_metadata(path: str | os.PathLike, trust_unverified: bool = False) -> dict:
    """The checkpoint's ``config.json``: format and version checked, ``config_sha256`` verified,
    every field validated. A checkpoint without ``config_sha256`` (older, or stripped) is refused
    unless ``trust_unverified``; a hash that is present and wrong is always refused."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})",
                              path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG_FILE}", path)
    try:
        meta = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON (truncated or corrupted?): {e}", cfg_file) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a {FORMAT} checkpoint", cfg_file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format_version {meta.get('format_version')!r}; this dfqkern "
                              f"({__version__}) reads version {FORMAT_VERSION}", cfg_file)
    if CONFIG_HASH_FIELD not in meta:
        if not trust_unverified:
            raise CheckpointError(f"{cfg_file} has no {CONFIG_HASH_FIELD} (written by an older dfqkern, or "
                                  f"stripped), so its contents cannot be verified; {TRUST_HINT}", cfg_file)
        warnings.warn(f"{cfg_file}: loading an unverified config (no {CONFIG_HASH_FIELD}; trust_unverified=True)",
                      UserWarning, stacklevel=3)
    elif meta[CONFIG_HASH_FIELD] != config_sha256(meta):
        raise CheckpointError(f"{cfg_file} does not match its {CONFIG_HASH_FIELD}: it was edited or corrupted after "
                              f"it was written (if you edited it on purpose, delete {CONFIG_HASH_FIELD} and "
                              f"{TRUST_HINT})", cfg_file)
    _validate_config(meta, cfg_file)
    return meta


# ----------------------------------------------------------------------------- config schema

def _field(cfg_file: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{cfg_file}: field {field} {problem}", cfg_file)


def _is_int(v, lo: int = 0) -> bool:
    return type(v) is int and v >= lo  # JSON true/false and 1.0 are not ints here


def _int_pair(rec: dict, key: str, lo: int, where: str, cfg_file: Path) -> None:
    v = rec.get(key)
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x, lo) for x in v)):
        raise _field(cfg_file, f"{where}.{key}", f"must be two ints >= {lo}, got {v!r}")


def _validate_layer(name: str, rec, cfg_file: Path) -> None:
    where = f"layers[{name!r}]"
    if not isinstance(rec, dict):
        raise _field(cfg_file, where, f"must be an object, got {type(rec).__name__}")
    for key in ("kind", "weight_bits", "act_bits", "weight_shape", "k", "bias", "layout"):
        if key not in rec:
            raise _field(cfg_file, f"{where}.{key}", "is missing")
    kind = rec["kind"]
    if kind not in ("conv2d", "linear"):
        raise _field(cfg_file, f"{where}.kind", f"must be 'conv2d' or 'linear', got {kind!r}")
    wb, ab = rec["weight_bits"], rec["act_bits"]
    if type(wb) is not int or wb not in WEIGHT_BITS:
        raise _field(cfg_file, f"{where}.weight_bits", f"must be one of {WEIGHT_BITS}, got {wb!r}")
    if ab is not None and (type(ab) is not int or ab not in ACT_BITS):
        raise _field(cfg_file, f"{where}.act_bits", f"must be null or one of {ACT_BITS}, got {ab!r}")
    shape, ndim = rec["weight_shape"], 4 if kind == "conv2d" else 2
    if not (isinstance(shape, list) and len(shape) == ndim and all(_is_int(d, 1) for d in shape)):
        raise _field(cfg_file, f"{where}.weight_shape", f"must be {ndim} positive ints for a {kind}, got {shape!r}")
    if type(rec["k"]) is not int or rec["k"] != math.prod(shape[1:]):
        raise _field(cfg_file, f"{where}.k", f"must be {math.prod(shape[1:])} (the reduction size of weight_shape "
                                             f"{shape}), got {rec['k']!r}")
    if type(rec["bias"]) is not bool:
        raise _field(cfg_file, f"{where}.bias", f"must be true or false, got {rec['bias']!r}")
    if rec["layout"] != PACK_LAYOUT:
        raise _field(cfg_file, f"{where}.layout", f"must be {PACK_LAYOUT!r} (the only layout this dfqkern reads), "
                                                  f"got {rec['layout']!r}")
    if kind == "conv2d":
        for key in ("stride", "padding", "dilation", "groups"):
            if key not in rec:
                raise _field(cfg_file, f"{where}.{key}", "is missing")
        _int_pair(rec, "stride", 1, where, cfg_file)
        _int_pair(rec, "padding", 0, where, cfg_file)
        _int_pair(rec, "dilation", 1, where, cfg_file)
        if not _is_int(rec["groups"], 1) or shape[0] % rec["groups"]:
            raise _field(cfg_file, f"{where}.groups", f"must be a positive int dividing the {shape[0]} output "
                                                      f"channels, got {rec['groups']!r}")


def _validate_attention(name: str, rec, cfg_file: Path) -> None:
    where = f"attention[{name!r}]"
    if not (isinstance(rec, dict) and set(rec) == {"kind", "bits"}):
        raise _field(cfg_file, where, f"must be an object with exactly kind and bits, got {rec!r}")
    if rec["kind"] not in ATTENTION_KINDS:
        raise _field(cfg_file, f"{where}.kind", f"must be one of {sorted(ATTENTION_KINDS)}, got {rec['kind']!r}")
    bits = rec["bits"]
    if bits is not None and (type(bits) is not int or bits not in ACT_BITS):
        raise _field(cfg_file, f"{where}.bits", f"must be null (float matmuls) or one of {ACT_BITS}, got {bits!r}")
    if rec["kind"] == "transformer_encoder_layer" and bits is not None:
        raise _field(cfg_file, f"{where}.bits", f"must be null for a transformer_encoder_layer, got {bits!r}")


def _validate_config(meta: dict, cfg_file: Path) -> None:
    """Types and ranges of every field loading uses, so nothing below meets a malformed value."""
    from .models import InputSpec

    arch = meta.get("arch")
    if arch is not None and not (isinstance(arch, str) and arch):
        raise _field(cfg_file, "arch", f"must be a model id string or null, got {arch!r}")
    problem = _arch_kwargs_problem(meta.get("arch_kwargs", {}))
    if problem:
        raise _field(cfg_file, *problem)
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise _field(cfg_file, "weights_sha256", f"must be 64 lowercase hex digits, got {digest!r}")
    for key in ("quant_config", "layers"):
        if key not in meta:
            raise _field(cfg_file, key, "is missing")
    try:
        qc = QuantConfig.from_dict(meta["quant_config"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise _field(cfg_file, "quant_config", f"is not a valid QuantConfig: {e}") from e
    for key in ("weight_symmetric", "act_symmetric", "fold_bn"):  # QuantConfig takes truthy values; JSON must not
        if type(getattr(qc, key)) is not bool:
            raise _field(cfg_file, f"quant_config.{key}", f"must be true or false, got {getattr(qc, key)!r}")
    if type(qc.seed) is not int:
        raise _field(cfg_file, "quant_config.seed", f"must be an int, got {qc.seed!r}")
    if meta.get("input_spec") is not None:
        try:
            if not isinstance(meta["input_spec"], dict):
                raise TypeError(f"must be an object, got {type(meta['input_spec']).__name__}")
            InputSpec.from_dict(meta["input_spec"])
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise _field(cfg_file, "input_spec", f"is not a valid InputSpec: {e}") from e
    for key in ("folded_bn", "unhandled"):
        value = meta.get(key, {})
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise _field(cfg_file, key, f"must be an object of module name -> string, got {value!r}")
    layers = meta["layers"]
    if not (isinstance(layers, dict) and layers):
        raise _field(cfg_file, "layers", f"must be a non-empty object of layer name -> record, "
                                         f"got {type(layers).__name__}")
    for name, rec in layers.items():
        _validate_layer(name, rec, cfg_file)
    attention = meta.get("attention", {})  # absent in checkpoints written before attention was swapped
    if not isinstance(attention, dict):
        raise _field(cfg_file, "attention", f"must be an object of module name -> record, got {attention!r}")
    for name, rec in attention.items():
        _validate_attention(name, rec, cfg_file)


# ----------------------------------------------------------------------------- tensors

# safetensors dtype -> bytes per element
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100 << 20


def _check_safetensors_header(wfile: Path) -> None:
    """Validate the header before the native reader sees it: a bad one fails here, with a message."""
    def bad(detail: str) -> CheckpointError:
        return CheckpointError(f"{wfile} is not a valid safetensors file (truncated or corrupted?): {detail}", wfile)

    size = wfile.stat().st_size
    with open(wfile, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"only {size} bytes")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, _ST_MAX_HEADER):
            raise bad(f"it declares a {n}-byte header in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"its header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad("its header is not an object")
    data_len, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise bad("header __metadata__ must map strings to strings")
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ST_ITEMSIZE):
            raise bad(f"tensor {name!r} has no valid dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) for d in shape)):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_len
                and offsets[1] - offsets[0] == math.prod(shape) * _ST_ITEMSIZE[info["dtype"]]):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} that do not fit its shape {shape} / dtype "
                      f"{info['dtype']} in the {data_len}-byte data section")
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            break
        end = stop
    if end != data_len:
        raise bad("the tensors' data_offsets do not tile the data section (overlaps, gaps or trailing bytes)")


def _read_weights(path: Path, meta: dict, trust_unverified: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_FILE}", path)
    recorded = meta.get("weights_sha256")
    if recorded is None:
        if not trust_unverified:
            raise CheckpointError(f"{path / CONFIG_FILE} records no weights_sha256, so {wfile} cannot be verified; "
                                  f"{TRUST_HINT}", path)
        warnings.warn(f"{wfile}: loading unverified weights (no weights_sha256; trust_unverified=True)", UserWarning,
                      stacklevel=3)
    elif _sha256(wfile) != recorded:
        raise CheckpointError(f"{wfile} does not match the sha256 in {CONFIG_FILE}: the file is truncated or corrupted",
                              wfile)
    _check_safetensors_header(wfile)
    try:
        return load_file(str(wfile), device="cpu")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - safetensors raises several types (a Rust panic is a BaseException)
        raise CheckpointError(f"{wfile} cannot be read: {type(e).__name__}: {e}", wfile) from e


# ----------------------------------------------------------------------------- rebuilding

def _packed_layer(rec: dict, cfg: QuantConfig) -> QuantLayer:
    lq = LayerQuant(rec["weight_bits"], rec["act_bits"])
    shape = rec["weight_shape"]
    if rec["kind"] == "linear":
        return QuantLinear(shape[1], shape[0], rec["bias"], lq, cfg, packed=True)
    return QuantConv2d(shape[1] * rec["groups"], shape[0], shape[2:], rec["stride"], rec["padding"], rec["dilation"],
                       rec["groups"], rec["bias"], lq, cfg, packed=True)


def _check_float_module(name: str, module: nn.Module | None, rec: dict, arch, cfg_file: Path) -> None:
    """The record must describe the architecture's own layer: kind, weight shape and conv geometry."""
    from .nn.conv import conv_padding

    expected = nn.Conv2d if rec["kind"] == "conv2d" else nn.Linear
    if not isinstance(module, expected):
        found = type(module).__name__ if module is not None else "nothing"
        raise CheckpointError(f"checkpoint is for another architecture: layer {name!r} should be a "
                              f"{expected.__name__} in {arch!r}, found {found}", cfg_file)
    if list(module.weight.shape) != rec["weight_shape"]:
        raise CheckpointError(f"checkpoint is for another architecture: layer {name!r} has weight shape "
                              f"{rec['weight_shape']} in the checkpoint but {list(module.weight.shape)} in {arch!r}",
                              cfg_file)
    if expected is nn.Conv2d:
        padding = conv_padding(module) if module.padding_mode == "zeros" else None
        actual = {"stride": list(module.stride), "padding": None if padding is None else list(padding),
                  "dilation": list(module.dilation), "groups": module.groups}
        for key, value in actual.items():
            if rec[key] != value:
                raise _field(cfg_file, f"layers[{name!r}].{key}", f"is {rec[key]} in the checkpoint but {value} "
                                                                  f"in {arch!r} (another architecture, or an edited "
                                                                  f"checkpoint)")


def _swap_attention(model: nn.Module, records: dict, cfg: QuantConfig, arch, cfg_file: Path) -> None:
    """Redo quantize_model's attention swaps (outermost first), with packed matmul quantizers."""
    for name in sorted(records, key=lambda n: n.count(".")):
        rec = records[name]
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint is for another architecture: no module {name!r} in {arch!r} "
                                  f"(field attention[{name!r}])", cfg_file) from e
        expected = ATTENTION_KINDS[rec["kind"]].float_type()
        if expected is None or type(module) is not expected:
            want = expected.__name__ if expected is not None else f"a {rec['kind']} module (is its library imported?)"
            raise CheckpointError(f"checkpoint is for another architecture: attention[{name!r}] should be {want} "
                                  f"in {arch!r}, found {type(module).__name__}", cfg_file)
        try:
            new = ATTENTION_KINDS[rec["kind"]].build(module, rec["kind"])
        except ValueError as e:
            raise _field(cfg_file, f"attention[{name!r}]", f"cannot be rebuilt from {arch!r}: {e}") from e
        if rec["bits"] is not None:
            if not isinstance(new, QuantAttentionBase):
                raise _field(cfg_file, f"attention[{name!r}].bits", f"must be null for kind {rec['kind']!r}")
            new.init_quantizers(rec["bits"], cfg)
            new.is_packed = True  # its quantizer tensors come from the checkpoint below
        set_module(model, name, new)
    if records:
        disable_nested_fast_path(model)


def _build_architecture(meta: dict, path: Path) -> nn.Module:
    from .models import create_model

    arch, cfg_file = meta.get("arch"), path / CONFIG_FILE
    if not arch:
        raise CheckpointError(f"{str(path)!r} records no architecture id; pass factory= to load_quantized", path)
    kwargs = meta.get("arch_kwargs", {})  # validated against ARCH_KWARGS by read_metadata
    try:
        # spelled out so no checkpoint field can reach these two: no download, no other file
        return create_model(arch, num_classes=kwargs.get("num_classes"), pretrained=False, checkpoint=None)
    except (ValueError, TypeError, ImportError) as e:
        raise CheckpointError(f"cannot rebuild architecture {arch!r} of {str(path)!r}: {e}; "
                              f"pass factory= to load_quantized", cfg_file) from e


def _check_tensors(model: nn.Module, state: dict[str, torch.Tensor], arch, wfile: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")]
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match architecture {arch!r}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}", wfile)
    for key, t in state.items():  # load_state_dict would cast dtypes silently and raise a bare RuntimeError on shapes
        want = expected[key]
        if t.dtype != want.dtype or t.shape != want.shape:
            raise CheckpointError(f"{wfile}: tensor {key!r} is {t.dtype} {list(t.shape)} but the architecture "
                                  f"({arch!r} with the recorded layers) expects {want.dtype} {list(want.shape)}",
                                  wfile)


def _check_finite(state: dict[str, torch.Tensor], layers, wfile: Path) -> None:
    """Refuse NaN / Inf in a quantized layer's float tensors (scales, zero points, bias): a packed kernel
    would turn them into NaN or, worse, finite garbage, for every input. Only the quantized layers: other
    modules may hold legitimate infinities (attention masks)."""
    prefixes = tuple(f"{name}." for name in layers)  # (attention records pass their names too)
    for key, t in state.items():
        if key.startswith(prefixes) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{wfile}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} non-finite "
                                  f"value(s) (NaN / Inf); quantization scales, zero points and biases must be "
                                  f"finite", wfile)


def load_quantized(path: str | os.PathLike, factory: Callable[[], nn.Module] | None = None,
                   device: str | torch.device = "cpu", *, trust_unverified: bool = False) -> nn.Module:
    """Rebuild a packed model from :func:`save_quantized` output.

    The float architecture comes from ``factory()`` if given, else from the registry by the
    recorded ``arch`` id and the allow-listed :data:`ARCH_KWARGS` only (never pretrained weights,
    never another file); its weights are irrelevant (every tensor comes from the checkpoint).
    ``config_sha256`` and ``weights_sha256`` must be present and match; ``trust_unverified=True``
    accepts a checkpoint that lacks them (with a warning), never one whose hash is wrong.
    """
    from .models import InputSpec

    path = Path(path)
    meta = read_metadata(path, trust_unverified)
    cfg_file, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    arch = meta.get("arch")
    state = _read_weights(path, meta, trust_unverified)
    model = factory() if factory is not None else _build_architecture(meta, path)
    cfg = QuantConfig.from_dict(meta["quant_config"])
    model.eval()
    for bn_name in meta.get("folded_bn", {}):
        try:
            bn = model.get_submodule(bn_name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint is for another architecture: no module {bn_name!r} in {arch!r} "
                                  f"(field folded_bn[{bn_name!r}])", cfg_file) from e
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise _field(cfg_file, f"folded_bn[{bn_name!r}]", f"names a {type(bn).__name__} in {arch!r}, "
                                                              f"not a BatchNorm")
        set_module(model, bn_name, nn.Identity())
    attention = meta.get("attention", {})
    _swap_attention(model, attention, cfg, arch, cfg_file)
    for name, rec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        _check_float_module(name, module, rec, arch, cfg_file)
        set_module(model, name, _packed_layer(rec, cfg))
    _check_tensors(model, state, arch, wfile)
    _check_finite(state, [*meta["layers"], *(n for n, r in attention.items() if r["bits"] is not None)], wfile)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # not expected after _check_tensors; still named, not a bare traceback
        raise CheckpointError(f"{wfile}: tensors do not fit architecture {arch!r}: {e}", wfile) from e
    set_info(model, arch=arch, arch_kwargs=dict(meta.get("arch_kwargs", {})), config=cfg, report=QuantReport(
        layers={n: LayerQuant(r["weight_bits"], r["act_bits"]) for n, r in meta["layers"].items()},
        folded_bn=meta.get("folded_bn", {}), unhandled=meta.get("unhandled", {}),
        attention={n: r["kind"] for n, r in attention.items()}))
    if meta.get("input_spec"):
        set_info(model, input_spec=InputSpec.from_dict(meta["input_spec"]))
    return model.to(device).eval()


def checkpoint_summary(path: str | os.PathLike, *, trust_unverified: bool = False) -> dict:
    """Layers, bits and sizes of a packed checkpoint, next to the float model's size (verified like
    :func:`load_quantized`)."""
    path = Path(path)
    meta = read_metadata(path, trust_unverified)
    state = _read_weights(path, meta, trust_unverified)
    packed_bytes = sum(t.numel() * t.element_size() for t in state.values())
    float_bytes = 0
    quant_prefixes = set()
    for name, rec in meta["layers"].items():
        n = math.prod(rec["weight_shape"])
        float_bytes += 4 * (n + (rec["weight_shape"][0] if rec["bias"] else 0))
        quant_prefixes.add(name + ".")
    for key, t in state.items():  # everything that is not a quantized layer stays float in both
        if not any(key.startswith(p) for p in quant_prefixes):
            float_bytes += t.numel() * t.element_size()
    return {
        "path": str(path), "arch": meta.get("arch"), "package_version": meta.get("package_version"),
        "scheme": QuantConfig.from_dict(meta["quant_config"]).scheme_name,
        "layers": meta["layers"], "unhandled": meta.get("unhandled", {}), "attention": meta.get("attention", {}),
        "checkpoint_bytes": packed_bytes, "float_bytes": float_bytes,
        "compression": float_bytes / max(packed_bytes, 1),
    }
