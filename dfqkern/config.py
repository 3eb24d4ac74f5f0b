"""Versioned, validated configuration dataclasses.

``QuantConfig`` is the bit policy of a quantized model: what every layer gets, which layers are
kept at 8 bits, skipped or overridden. It round-trips through JSON (``to_dict`` / ``from_dict``)
and is stored in every packed checkpoint.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .formats import FAKE_QUANT_ACT_BITS, WEIGHT_BITS, check_bits

CONFIG_VERSION = 1
OBSERVERS = ("minmax", "mse")
ACT_GRANULARITIES = ("per_tensor", "per_token")
ATTN_GRANULARITIES = ("per_tensor", "per_head")  # static scales of attention's q / k / v (dfqkern.nn.attention)


def check_fields(cls, d: dict[str, Any]) -> None:
    """A config dict read back (checkpoint, manifest, resume state) names only fields of ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerRule:
    """Bits for the layers a rule matches: by module name glob (``pattern``) or class name (``module_type``).

    ``weight_bits=None`` keeps the config's value; ``act_bits="float"`` makes the layer weight-only.
    """

    pattern: str | None = None
    module_type: str | None = None
    weight_bits: int | None = None
    act_bits: int | str | None = None

    def __post_init__(self):
        if (self.pattern is None) == (self.module_type is None):
            raise ValueError("LayerRule needs exactly one of pattern (module name glob) or module_type (class name)")
        if self.weight_bits is not None:
            check_bits(self.weight_bits, WEIGHT_BITS, "LayerRule.weight_bits")
        if self.act_bits not in (None, "float"):
            check_bits(self.act_bits, FAKE_QUANT_ACT_BITS, "LayerRule.act_bits")

    def matches(self, name: str, module) -> bool:
        if self.pattern is not None:
            return fnmatch.fnmatchcase(name, self.pattern)
        return type(module).__name__ == self.module_type


@dataclass(frozen=True)
class LayerQuant:
    """The resolved setting of one layer."""

    weight_bits: int
    act_bits: int | None  # None: weight-only (float activations)


@dataclass(frozen=True)
class ObserverSpec:
    """The mse observer's search: Lp norm ``lp`` of the error (p = 2.4 as in BRECQ / QDrop), ``grid``
    clipping ratios from the full range down to ``min_clip`` of it. The one place these defaults live."""

    lp: float = 2.4
    grid: int = 80
    min_clip: float = 0.2

    def __post_init__(self):
        if isinstance(self.lp, bool) or not isinstance(self.lp, (int, float)) or not self.lp > 0:
            raise ValueError(f"lp must be > 0, got {self.lp}")
        if isinstance(self.grid, bool) or not (isinstance(self.grid, int) and self.grid >= 1):
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        if isinstance(self.min_clip, bool) or not isinstance(self.min_clip, (int, float)) \
                or not 0 < self.min_clip <= 1:
            raise ValueError(f"min_clip must be in (0, 1], got {self.min_clip}")


DEFAULT_OBSERVER = ObserverSpec()


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    weight_bits / act_bits: 2/3/4/8 each (``act_bits=None`` is weight-only). Every width calibrates in
    fake-quant; packing (deployment) runs activations at 4 or 8 bits and refuses other widths, naming
    the layer.
    Weights are per-output-channel (symmetric or asymmetric); activations per-tensor
    (asymmetric by default) or per-token dynamic. Attention's q / k / v (the operands of q.k^T and
    attn.v) follow ``act_granularity``: per-token dynamic, or static with one scale per tensor or per
    head (``attn_granularity``). ``first_last_bits`` keeps the first and the last
    quantizable layer at that many bits (weights and activations); ``None`` quantizes every layer
    alike. ``ln_reparam``: calibration folds per-channel ranges of LayerNorm outputs into the LayerNorm
    and the Linear layers reading them, so their per-tensor quantizers act per channel (RepQ-ViT;
    :mod:`dfqkern.calib.ln_reparam`). ``rules`` override bits by name glob or module type (last match
    wins); ``gelu_act_bits`` raises the activation bits of Linear layers that read a GELU output (a
    ViT's fc2: at A4 the largest error source; see ``dfqkern.quantize.post_gelu_linears``), before
    rules apply. ``skip`` lists name globs left in float. Observers: ``minmax`` or ``mse`` (Lp grid
    search over clipping ratios with norm ``lp``, ``grid`` candidates down to ``min_clip`` of the range: see
    :class:`ObserverSpec`, which owns their defaults).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_symmetric: bool = False
    act_symmetric: bool = False
    act_granularity: str = "per_tensor"
    attn_granularity: str = "per_tensor"
    weight_observer: str = "mse"
    act_observer: str = "mse"
    lp: float = DEFAULT_OBSERVER.lp
    grid: int = DEFAULT_OBSERVER.grid
    min_clip: float = DEFAULT_OBSERVER.min_clip
    first_last_bits: int | None = 8
    fold_bn: bool = True
    ln_reparam: bool = False  # RepQ-ViT per-channel -> per-tensor folding of LayerNorm outputs (calib/ln_reparam.py)
    gelu_act_bits: int | None = None  # activation bits of Linear layers reading a GELU output (None: act_bits)
    rules: tuple[LayerRule, ...] = ()
    skip: tuple[str, ...] = ()
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        check_bits(self.weight_bits, WEIGHT_BITS, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, FAKE_QUANT_ACT_BITS, "act_bits")
        _check_choice(self.act_granularity, ACT_GRANULARITIES, "act_granularity")
        _check_choice(self.attn_granularity, ATTN_GRANULARITIES, "attn_granularity")
        _check_choice(self.weight_observer, OBSERVERS, "weight_observer")
        _check_choice(self.act_observer, OBSERVERS, "act_observer")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, (4, 8), "first_last_bits")
        if type(self.ln_reparam) is not bool:
            raise ValueError(f"ln_reparam must be true or false, got {self.ln_reparam!r}")
        if self.gelu_act_bits is not None:
            check_bits(self.gelu_act_bits, FAKE_QUANT_ACT_BITS, "gelu_act_bits")
        self.observer_spec  # validates lp / grid / min_clip
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QuantConfig version {self.version} is not supported (this dfqkern reads {CONFIG_VERSION})")
        object.__setattr__(self, "rules", tuple(r if isinstance(r, LayerRule) else LayerRule(**r) for r in self.rules))
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def observer_spec(self) -> ObserverSpec:
        return ObserverSpec(self.lp, self.grid, self.min_clip)

    @property
    def scheme_name(self) -> str:
        return f"w{self.weight_bits}" + (f"a{self.act_bits}" if self.act_bits is not None else "")

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def is_skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def resolve(self, name: str, module, is_first: bool, is_last: bool, post_gelu: bool = False) -> LayerQuant:
        """Bits for one layer: base, then first/last and post-GELU, then rules (last match wins)."""
        wb, ab = self.weight_bits, self.act_bits
        if self.first_last_bits is not None and (is_first or is_last):
            wb = max(wb, self.first_last_bits)
            ab = None if ab is None else max(ab, self.first_last_bits)
        if post_gelu and self.gelu_act_bits is not None and ab is not None:
            ab = max(ab, self.gelu_act_bits)
        for rule in self.rules:
            if rule.matches(name, module):
                wb = rule.weight_bits if rule.weight_bits is not None else wb
                if rule.act_bits == "float":
                    ab = None
                elif rule.act_bits is not None:
                    ab = rule.act_bits
        return LayerQuant(wb, ab)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rules"] = [dataclasses.asdict(r) for r in self.rules]
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        check_fields(cls, d)
        d = dict(d)
        d["rules"] = tuple(LayerRule(**r) for r in d.get("rules", ()))
        d["skip"] = tuple(d.get("skip", ()))
        return cls(**d)


def preset(name: str, **changes) -> QuantConfig:
    """A QuantConfig from a scheme name such as ``w4a4``, ``w2a4`` or ``w4`` (weight-only)."""
    from .formats import QuantScheme

    s = QuantScheme.parse(name)
    return QuantConfig(weight_bits=s.wbits, act_bits=s.abits).replace(**changes)
