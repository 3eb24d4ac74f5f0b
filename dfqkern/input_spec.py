"""The preprocessing contract between a model and its images: :class:`InputSpec`.

A leaf module (torch-free) so that data loading and the model registry can both depend on it
without depending on each other.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["InputSpec", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "CIFAR_SPEC", "DIGITS_SPEC",
           "IMAGENET_SPEC"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for a model: normalization, size (C, H, W) and resizing."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Coerce lists (e.g. from JSON) to tuples so specs compare and hash by value.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if len(self.input_size) != 3 or min(self.input_size) <= 0:
            raise ValueError(f"input_size must be three positive ints (C, H, W), got {self.input_size}")
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}), "
                             f"got mean={self.mean}, std={self.std}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "InputSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


CIFAR_SPEC = InputSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(3, 32, 32))
DIGITS_SPEC = InputSpec(mean=(0.5,), std=(0.5,), input_size=(1, 8, 8))  # the digits_cnn model and digits_dataset
IMAGENET_SPEC = InputSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(3, 224, 224), crop_pct=0.875)
