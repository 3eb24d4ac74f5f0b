"""Model registry: build a float model and its input preprocessing from one name.

Names:
- ``cifar10_resnet{20,32,44,56}`` / ``cifar100_resnet{20,32,44,56}``: He et al. (2016) CIFAR ResNets
  with parameter-free "option A" shortcuts, module-for-module identical to
  akamaster/pytorch_resnet_cifar10 (the checkpoint in ``shared/data/cifar10``).
- ``cifar10_shufflenetv2_x0_5`` / ``cifar10_mobilenetv2_x0_35``: CIFAR-sized edge networks
  (:mod:`dfqkern.edge_nets`); trained weights for the benchmarks live in ``bench/weights/``.
- ``cifar10_convmixer_256_8``: ConvMixer-256/8 (patch 4, kernel 9) in the layout of the pretrained (``pretrained=True`` reads it)
  checkpoint in ``shared/data/models/convmixer_256_8``.
- ``cifar10_vit_qkv`` / ``cifar10_vit_mha``: small CIFAR ViTs (:mod:`dfqkern.vit_nets`; fused-``qkv``
  attention vs ``nn.TransformerEncoder``); ``pretrained=True`` reads ``bench/weights/`` (written by
  ``bench/train_cifar_vit.py``; a clear error while it has not been trained).
- ``digits_cnn``: a small BatchNorm CNN for scikit-learn's bundled 8x8 digits (the CLI demo model).
- ``timm:NAME`` and ``torchvision:NAME``: delegated to those libraries, imported lazily.

A model built here carries ``model_info(model).arch`` (the name) and ``model_info(model).input_spec``
so a saved checkpoint can record its architecture and be rebuilt with ``create_model(arch)``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .assets import local_pretrained
from .input_spec import CIFAR_SPEC, DIGITS_SPEC, IMAGENET_SPEC, InputSpec  # InputSpec: re-exported
from .model_info import model_info, set_info

__all__ = [
    "InputSpec", "CifarBasicBlock", "CifarResNet", "OptionAShortcut", "DigitsCNN",
    "register_model", "list_models", "create_model", "input_spec", "load_checkpoint",
]

PREFIXES = ("timm:", "torchvision:")


# ----------------------------------------------------------------------------- CIFAR ResNets

class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of He et al. option A: subsample by 2, zero-pad the channels.

    A module (not a lambda) so deepcopy, pickling-free state_dicts and torch.fx tracing work.
    """

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class CifarBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add shortcut, ReLU. The unit block reconstruction keys on."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()  # ReLU modules (not F.relu) so activation quantizers can hook them
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference implementation's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


class DigitsCNN(nn.Module):
    """Small BatchNorm CNN for 1x8x8 digits (about 24k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*cbr(1, 16), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# ----------------------------------------------------------------------------- registry

Factory = Callable[..., "tuple[nn.Module, InputSpec]"]
_REGISTRY: dict[str, Factory] = {}
_STATIC_SPECS: dict[str, InputSpec] = {}


def register_model(name: str, *, spec: InputSpec | None = None):
    """Decorator registering ``factory(num_classes=None) -> (module, InputSpec)`` under ``name``.

    ``spec`` (optional) lets :func:`input_spec` answer without building the model.
    """
    if not isinstance(name, str) or not name or name.startswith(PREFIXES):
        raise ValueError(f"name must be a non-empty string not starting with {PREFIXES}, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"name {name!r} is already registered")

    def decorator(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        if spec is not None:
            _STATIC_SPECS[name] = spec
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered names (the ``timm:NAME`` / ``torchvision:NAME`` families are open-ended)."""
    return sorted(_REGISTRY)


def _register_cifar(dataset: str, classes: int, depth: int) -> None:
    @register_model(f"{dataset}_resnet{depth}", spec=CIFAR_SPEC)
    def factory(num_classes: int | None = None):
        return CifarResNet(depth, num_classes or classes), CIFAR_SPEC


for _dataset, _classes in (("cifar10", 10), ("cifar100", 100)):
    for _depth in (20, 32, 44, 56):
        _register_cifar(_dataset, _classes, _depth)


@register_model("cifar10_shufflenetv2_x0_5", spec=CIFAR_SPEC)
def _cifar10_shufflenetv2(num_classes: int | None = None):
    from .edge_nets import CifarShuffleNetV2

    return CifarShuffleNetV2(num_classes or 10), CIFAR_SPEC


@register_model("cifar10_mobilenetv2_x0_35", spec=CIFAR_SPEC)
def _cifar10_mobilenetv2(num_classes: int | None = None):
    from .edge_nets import CifarMobileNetV2

    return CifarMobileNetV2(num_classes or 10, width_mult=0.35, last_channels=640), CIFAR_SPEC


CONVMIXER_SPEC = InputSpec(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), input_size=(3, 32, 32))


@register_model("cifar10_convmixer_256_8", spec=CONVMIXER_SPEC)
def _cifar10_convmixer(num_classes: int | None = None):
    from .edge_nets import conv_mixer

    return conv_mixer(256, 8, kernel=9, patch=4, num_classes=num_classes or 10), CONVMIXER_SPEC


def _register_cifar_vit(variant: str) -> None:
    @register_model(f"cifar10_vit_{variant}", spec=CIFAR_SPEC)
    def factory(num_classes: int | None = None):
        from .vit_nets import CifarViT

        return CifarViT(variant, num_classes or 10), CIFAR_SPEC


for _variant in ("qkv", "mha"):  # dfqkern.vit_nets.VARIANTS (not imported here: models stays light)
    _register_cifar_vit(_variant)


@register_model("digits_cnn", spec=DIGITS_SPEC)
def _digits_cnn(num_classes: int | None = None):
    return DigitsCNN(num_classes or 10), DIGITS_SPEC


def _unknown(name: str, detail: str = "") -> ValueError:
    return ValueError(f"unknown model name {name!r}{detail}; known names: {', '.join(list_models())}, "
                      f"or 'timm:NAME' / 'torchvision:NAME'")


def _split(name: str) -> tuple[str, str]:
    """('timm' | 'torchvision' | 'registry', bare name), validating the name."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    for prefix in PREFIXES:
        if name.startswith(prefix):
            bare = name[len(prefix):]
            if not bare:
                raise _unknown(name, f" (empty model name after {prefix!r})")
            return prefix[:-1], bare
    if name not in _REGISTRY:
        raise _unknown(name)
    return "registry", name


def _import(lib: str):
    try:
        return __import__(lib)
    except ImportError as e:
        raise ImportError(f"model names '{lib}:NAME' need the {lib} package (pip install {lib})") from e


# ----------------------------------------------------------------------------- timm / torchvision

def _timm_spec(cfg: Mapping) -> InputSpec:
    from timm.data import resolve_data_config

    c = resolve_data_config(pretrained_cfg=dict(cfg))
    return InputSpec(mean=c["mean"], std=c["std"], input_size=c["input_size"],
                     crop_pct=c.get("crop_pct", 1.0), interpolation=c.get("interpolation", "bilinear"))


def _timm_model(bare: str, num_classes: int | None, pretrained: bool):
    timm = _import("timm")
    if not timm.is_model(bare):
        raise _unknown(f"timm:{bare}", " (timm has no such model)")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(bare, pretrained=pretrained, **kwargs)
    return model, _timm_spec(model.pretrained_cfg)


def _timm_input_spec(bare: str) -> InputSpec:
    timm = _import("timm")
    if not timm.is_model(bare):
        raise _unknown(f"timm:{bare}", " (timm has no such model)")
    cfg = timm.models.get_pretrained_cfg(bare)
    if cfg is None:  # a model without a registered default config: build it to ask
        return _timm_model(bare, None, False)[1]
    return _timm_spec(cfg.to_dict())


_TV_INTERP = {"InterpolationMode.NEAREST": "nearest", "InterpolationMode.BILINEAR": "bilinear",
              "InterpolationMode.BICUBIC": "bicubic"}


def _torchvision_input_spec(bare: str) -> InputSpec:
    tvm = _import("torchvision").models
    if bare.lower() not in tvm.list_models():
        raise _unknown(f"torchvision:{bare}", " (torchvision has no such model)")
    try:  # the default weights describe their preprocessing; reading it downloads nothing
        t = tvm.get_model_weights(bare).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return IMAGENET_SPEC
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return InputSpec(mean=tuple(t.mean), std=tuple(t.std), input_size=(3, crop, crop),
                     crop_pct=min(1.0, crop / resize),
                     interpolation=_TV_INTERP.get(str(t.interpolation), "bilinear"))


def _torchvision_model(bare: str, num_classes: int | None, pretrained: bool):
    tvm = _import("torchvision").models
    spec = _torchvision_input_spec(bare)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = tvm.get_model(bare, weights="DEFAULT" if pretrained else None, **kwargs)
    return model, spec


# ----------------------------------------------------------------------------- public API

def input_spec(name: str) -> InputSpec:
    """Preprocessing for model ``name`` (see the module docstring for the names)."""
    family, bare = _split(name)
    if family == "timm":
        return _timm_input_spec(bare)
    if family == "torchvision":
        return _torchvision_input_spec(bare)
    if bare in _STATIC_SPECS:
        return _STATIC_SPECS[bare]
    return _REGISTRY[bare]()[1]


def create_model(name: str, checkpoint: str | os.PathLike | None = None, num_classes: int | None = None,
                 pretrained: bool = False) -> nn.Module:
    """Build model ``name`` in eval mode, optionally loading ``checkpoint`` (a state dict file).

    ``pretrained`` downloads weights for timm/torchvision models (never done by default); for
    ``cifar10_resnet20`` it loads the local checkpoint from :func:`dfqkern.assets.default_cifar10_dir`.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes <= 0):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    family, bare = _split(name)
    if family == "timm":
        model, spec = _timm_model(bare, num_classes, pretrained)
    elif family == "torchvision":
        model, spec = _torchvision_model(bare, num_classes, pretrained)
    else:
        model, spec = _REGISTRY[bare](num_classes=num_classes)
        if pretrained and checkpoint is None:
            checkpoint = local_pretrained(bare)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    # num_classes is recorded so that a saved quantized copy rebuilds the same head on load
    set_info(model, arch=name, input_spec=spec, arch_kwargs={} if num_classes is None else {"num_classes": num_classes})
    return model.eval()


# ----------------------------------------------------------------------------- checkpoints

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _read_checkpoint(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, weights_only=True, map_location="cpu")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _first(keys, k: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:k]) + (f", ... ({len(keys)} in all)" if len(keys) > k else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load float weights from ``path`` into ``model`` (in place; returns ``model``).

    Accepts a raw state dict or one wrapped under "state_dict" / "model_state_dict" / "model"
    (``torch.load(weights_only=True)``; never unpickles arbitrary objects), or a ``.safetensors``
    file. "module." / "_orig_mod." key prefixes are stripped. Missing BatchNorm
    ``num_batches_tracked`` buffers (older checkpoints lack them) are not an error.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a directory; a packed quantized checkpoint "
                         f"is loaded with dfqkern.io.load_quantized")
    try:
        obj = _read_checkpoint(path)
    except Exception as e:  # truncated zip, garbage bytes, disallowed pickle globals, bad header
        raise ValueError(f"checkpoint {str(path)!r} is corrupt, truncated or not a weights-only "
                         f"torch/safetensors file: {type(e).__name__}: {e}") from e
    state = obj
    if not _is_state_dict(state) and isinstance(obj, Mapping):
        state = next((obj[k] for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k))), obj)
    if not _is_state_dict(state):
        found = (f"a dict with keys {_first(map(str, obj.keys()))}" if isinstance(obj, Mapping)
                 else f"a {type(obj).__name__}")
        raise ValueError(f"checkpoint {str(path)!r} is not a state dict (a mapping of names to tensors, "
                         f"possibly under one of {list(_WRAPPER_KEYS)}); found {found}")
    state = {_strip(k): v for k, v in state.items()}

    expected = model.state_dict()
    missing = {k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")}
    unexpected = state.keys() - expected.keys()
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        arch = (model_info(model).arch or type(model).__name__)
        raise ValueError(f"checkpoint {str(path)!r} does not match the model ({arch}): "
                         + "; ".join(parts))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(state.keys() & expected.keys()) if state[k].shape != expected[k].shape]
    if mismatched:
        raise ValueError(f"checkpoint {str(path)!r} has tensors of the wrong shape (another "
                         f"architecture or num_classes?): " + "; ".join(mismatched[:5]))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model

