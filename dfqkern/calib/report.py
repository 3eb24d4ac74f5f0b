"""What calibration did: per-unit losses and what the no-regression guard decided."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class UnitReport:
    name: str
    kind: str
    iters: int
    loss_nearest: float  # held-out output MSE of the unit at its start (nearest rounding, observed ranges)
    loss_hard: float  # the same after learning, with the hardened rounding
    loss_start: float  # training loss averaged over the first 10 % of the steps
    loss_end: float  # ... and over the last 10 %
    seconds: float
    resumed: bool = False
    kept_start: bool = False  # learning ended above loss_nearest, so the unit kept its starting point


@dataclass
class CalibReport:
    method: str
    config: dict
    units: list[UnitReport] = field(default_factory=list)
    observe_seconds: float = 0.0
    seconds: float = 0.0
    heldout_images: int = 0  # calibration images never used as training batches (the guard's yardstick)
    model_loss_observer: float = math.nan  # model output MSE vs float on them, at the observer start
    model_loss_final: float = math.nan  # ... and for the returned model
    reverted_to_observer: bool = False  # reconstruction ended worse than the observer start: undone

    @property
    def units_kept_start(self) -> list[str]:
        return [u.name for u in self.units if u.kept_start]

    def to_dict(self) -> dict:
        return asdict(self)
