"""CalibConfig: how a quantized model is calibrated (method, schedule, learning rates, budgets).

Defaults follow AdaRound / BRECQ / QDrop: rounding loss weight 0.01, beta annealed 20 -> 2 after a
20 % warm-up, batch 32, Adam lr 1e-3 on the rounding variables, 4e-5 on activation step sizes
(cosine-annealed), 20k iterations per unit, QDrop drop probability 0.5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import check_fields

CALIB_CONFIG_VERSION = 1


@dataclass(frozen=True)
class MethodSpec:
    """What a calibration method does; the registry below is the one list of methods."""

    name: str
    blockwise: bool  # units are blocks (else every quantized layer alone)
    learn_act_scale: bool  # LSQ activation step sizes are learned with the rounding
    learn_weight_scale: bool  # weight scales are learned with the rounding (Genie-M)
    drop_prob: float  # QDrop: chance an activation stays float, and of a float unit input element
    summary: str


METHOD_SPECS = {m.name: m for m in (
    MethodSpec("observer", False, False, False, 0.0, "activation ranges only (MSE / min-max observers)"),
    MethodSpec("adaround", False, False, False, 0.0, "layer-wise learned rounding"),
    MethodSpec("brecq", True, True, False, 0.0, "block-wise learned rounding + activation step sizes"),
    MethodSpec("qdrop", True, True, False, 0.5, "brecq with randomly dropped activation quantization"),
    MethodSpec("genie", True, True, True, 0.5, "qdrop with weight scales learned jointly (Genie-M)"),
)}
METHODS = tuple(METHOD_SPECS)
QDROP_MASKS = ("auto", "kernel", "torch")
# The literature's iteration count: the automatic rounding lr keeps lr * iters at least its 1e-3 * 20k.
REFERENCE_ITERS = 20000
REFERENCE_ROUND_LR = 1e-3
MAX_ROUND_LR = 1e-2


def _positive(name: str, value, kind=float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings.

    method: ``observer`` (ranges only), ``adaround`` (layer-wise learned rounding), ``brecq``
    (block-wise rounding + LSQ activation step sizes), ``qdrop`` (brecq with random dropping of
    activation quantization and mixed FP / quantized block inputs), ``genie`` (qdrop with the weight
    scale learned jointly with the rounding).

    iters: optimisation steps per unit (block or lone layer). round_lr ``None`` picks
    ``1e-3 * 20000 / iters`` clipped to [1e-3, 1e-2], so short runs can still drive the rounding
    variables to hard decisions. weight_scale_lr (genie) is relative: each layer's Adam lr is this
    times its mean weight scale. drop_prob ``None`` uses the method's default (0.5 for qdrop/genie).
    qdrop_mask: ``kernel`` draws the QDrop mask inside the fused fake-quant op (counter hash, same on
    every backend), ``torch`` draws it with torch's generator around the op (much faster on the
    reference backend), ``auto`` uses the kernel when a compiled backend serves the device.
    observe_samples: calibration images used to observe activation ranges (``None``: all).
    pd_weight: PD-Quant's prediction-difference term, added to each unit's output MSE with this
    weight: the KL divergence from the float model's class probabilities to those of the float rest
    of the network fed the unit's quantized output (0: off; costs a float forward and backward of the
    whole model per step). The model must return one logits tensor ``[B, classes]``.
    memory_budget_mb: block inputs/outputs beyond this are spilled to safetensors files in
    ``spill_dir`` (a temporary directory when ``None``). checkpoint_dir: a per-unit checkpoint is
    written there and a rerun with the same config and data resumes after the last finished unit.
    backend: the kernel backend calibration runs on ('reference', 'cpu', 'triton', 'cuda'; ``None``:
    dispatch picks by device and ``$DFQKERN_BACKEND``); the model's own choice is restored afterwards.
    """

    method: str = "qdrop"
    iters: int = 20000
    batch_size: int = 32
    round_lr: float | None = None
    act_lr: float = 4e-5
    weight_scale_lr: float = 1e-4
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float | None = None
    pd_weight: float = 0.0
    qdrop_mask: str = "auto"
    observe_samples: int | None = 256
    seed: int = 0
    memory_budget_mb: float = 2048.0
    spill_dir: str | None = None
    checkpoint_dir: str | None = None
    backend: str | None = None
    progress: bool = True
    version: int = CALIB_CONFIG_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.qdrop_mask not in QDROP_MASKS:
            raise ValueError(f"qdrop_mask must be one of {QDROP_MASKS}, got {self.qdrop_mask!r}")
        _positive("iters", self.iters, int)
        _positive("batch_size", self.batch_size, int)
        for name in ("act_lr", "weight_scale_lr", "beta_start", "beta_end", "memory_budget_mb"):
            _positive(name, getattr(self, name))
        if self.round_lr is not None:
            _positive("round_lr", self.round_lr)
        for name in ("round_weight", "pd_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a float >= 0, got {value!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.drop_prob is not None and not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1] or None, got {self.drop_prob!r}")
        if self.observe_samples is not None:
            _positive("observe_samples", self.observe_samples, int)
        if self.backend is not None:
            from ..kernels import Backend

            object.__setattr__(self, "backend", Backend.parse(self.backend).value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.version != CALIB_CONFIG_VERSION:
            raise ValueError(f"CalibConfig version {self.version} is not supported "
                             f"(this dfqkern reads {CALIB_CONFIG_VERSION})")

    # ------------------------------------------------------------------ derived settings

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def blockwise(self) -> bool:
        return self.spec.blockwise

    @property
    def learn_act_scale(self) -> bool:
        return self.spec.learn_act_scale

    @property
    def learn_weight_scale(self) -> bool:
        return self.spec.learn_weight_scale

    @property
    def effective_drop_prob(self) -> float:
        return self.spec.drop_prob if self.drop_prob is None else float(self.drop_prob)

    @property
    def effective_round_lr(self) -> float:
        if self.round_lr is not None:
            return float(self.round_lr)
        return min(MAX_ROUND_LR, max(REFERENCE_ROUND_LR, REFERENCE_ROUND_LR * REFERENCE_ITERS / self.iters))

    # ------------------------------------------------------------------ serialisation

    def replace(self, **changes) -> "CalibConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibConfig":
        check_fields(cls, d)
        return cls(**d)

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the calibrated model (not where files go or whether bars show)."""
        d = self.to_dict()
        for k in ("spill_dir", "checkpoint_dir", "progress", "memory_budget_mb"):
            d.pop(k)
        return d
