"""QATConfig: how a fake-quant student is fine-tuned from a float teacher on generated samples.

The one owner of the engine's defaults. Defaults follow GDFQ (Xu et al., ECCV 2020) where they fit a
reduced CPU budget: generator Adam lr 1e-3, betas (0.5, 0.999), BNS weight 0.1; student SGD with
Nesterov momentum 0.9 and weight decay 1e-4; one generator-only warm-up epoch (measured on ResNet-20
W3A3: without it, cross-entropy to the labels of a still-random generator wrecked the student within
20 steps, 69.0 -> 14.0 % top-1; with 10 warm-up steps first it gained, 69.0 -> 71.7 %).
Method-specific settings are ``options`` (validated by the method's own ``Options`` dataclass, see
:mod:`dfqkern.qat.methods`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import check_fields

QAT_CONFIG_VERSION = 1
SCHEDULES = ("cosine", "step", "constant")


def _number(name: str, value, *, kind=float, minimum=0.0, strict=True) -> None:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (value <= minimum if strict else value < minimum):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} {rel} {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class QATConfig:
    """Data-free QAT settings.

    Budget: ``epochs`` x ``iters`` iterations of ``batch_size`` generated images; the first
    ``warmup_epochs`` train the generator only (GDFQ). Each iteration updates the generator once
    (teacher losses) and then the student once on the same, detached images.

    Student: weights and biases by SGD (``student_lr``, ``momentum``, Nesterov, ``weight_decay``);
    LSQ step sizes by Adam: activation scales at ``act_scale_lr``, weight scales at
    ``weight_scale_lr`` times each layer's mean scale (0 freezes them). ``schedule`` scales every
    learning rate per iteration: ``cosine`` to 0 over the whole run, ``step`` by ``step_gamma`` at
    each epoch in ``step_epochs``, ``constant``.

    Losses (read by the methods that use them): generator ``bns_weight`` x GDFQ's BN-statistics loss
    plus the target cross-entropy; student ``ce_weight`` x cross-entropy to the generator's labels
    plus ``kd_weight`` x T^2 KL(teacher || student) at temperature ``temperature``.

    Replay (not in the papers): with ``replay_weight`` > 0 each student step also distils on a batch of
    the start's own calibration images (``finetune(..., replay=...)``), ``replay_weight`` x T^2 KL.
    Meant to anchor a reconstruction (QDrop) start, which generator images alone pulled down
    (ResNet-20 W3A3, acq: 79.36 -> 77.82); measured there at weight 1 it did not (77.80).
    """

    method: str = "gdfq"
    epochs: int = 4
    iters: int = 200
    batch_size: int = 32
    warmup_epochs: int = 1
    student_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    act_scale_lr: float = 1e-4
    weight_scale_lr: float = 1e-3
    generator_lr: float = 1e-3
    schedule: str = "cosine"
    step_epochs: tuple[int, ...] = ()
    step_gamma: float = 0.1
    latent_dim: int = 100
    generator_width: int = 128
    bns_weight: float = 0.1
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    replay_weight: float = 0.0
    options: dict = field(default_factory=dict)
    seed: int = 0
    progress: bool = True
    version: int = QAT_CONFIG_VERSION

    def __post_init__(self):
        from .methods import METHODS, method_class, method_options

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "iters", "batch_size", "latent_dim", "generator_width"):
            _number(name, getattr(self, name), kind=int)
        _number("warmup_epochs", self.warmup_epochs, kind=int, strict=False)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}): the "
                             f"student would never be trained")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the generator has BatchNorm), got {self.batch_size}")
        for name in ("student_lr", "generator_lr", "temperature"):
            _number(name, getattr(self, name))
        for name in ("act_scale_lr", "weight_scale_lr", "weight_decay", "bns_weight", "ce_weight", "kd_weight",
                     "replay_weight"):
            _number(name, getattr(self, name), strict=False)
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1) or isinstance(self.momentum, bool):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        object.__setattr__(self, "step_epochs", tuple(self.step_epochs))
        for e in self.step_epochs:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 < e < self.epochs:
                raise ValueError(f"step_epochs must hold ints in (0, epochs={self.epochs}), got {self.step_epochs!r}")
        if not 0 < self.step_gamma <= 1 or isinstance(self.step_gamma, bool):
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of method options, got {type(self.options).__name__}")
        resolved = method_options(self.method, self.options)  # unknown keys / bad values fail here
        object.__setattr__(self, "options", dataclasses.asdict(resolved))
        method_class(self.method).check_config(self)
        if self.version != QAT_CONFIG_VERSION:
            raise ValueError(f"QATConfig version {self.version} is not supported (this dfqkern reads "
                             f"{QAT_CONFIG_VERSION})")

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters

    def lr_factor(self, step: int) -> float:
        """Multiplier of every base learning rate at global iteration ``step`` (0-based)."""
        if self.schedule == "cosine":
            import math

            return 0.5 * (1 + math.cos(math.pi * min(step, self.total_iters) / self.total_iters))
        if self.schedule == "step":
            epoch = step // self.iters
            return self.step_gamma ** sum(epoch >= e for e in self.step_epochs)
        return 1.0

    def replace(self, **changes) -> "QATConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["step_epochs"] = list(self.step_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QATConfig":
        check_fields(cls, d)
        return cls(**{**d, "step_epochs": tuple(d.get("step_epochs", ()))})

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the trained student (not whether bars show)."""
        d = self.to_dict()
        d.pop("progress")
        return d
