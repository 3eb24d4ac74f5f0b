"""The options of the two synthetic-data generators, as typed records with one default each.

:class:`BNInversionConfig` (BatchNorm-statistics inversion) and :class:`DiffusionConfig`
(text-to-image prompts and sampling). ``to_dict()`` is what a synthetic set's manifest records
under ``config`` (the set writer adds the set-level facts: source, model or pipeline, number of
images, ...) and ``from_dict()`` reads such a record back, including records written before these
classes existed. The library functions, :mod:`dfqkern.pipeline` and the CLI all take their
defaults from here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

METHODS = ("zeroq", "genie", "hast", "dgh")
LABEL_MODES = ("single", "mixup")
WEIGHT_MODES = ("dirichlet", "uniform")
DEFAULT_LR = {"zeroq": 0.25, "hast": 0.25, "dgh": 0.25, "genie": 0.01}
# Soft (mixup) targets keep pulling against the BN term where one-hot targets saturate, so they get
# half the weight; measurements in bench/results/bn_inversion_notes.md.
DEFAULT_CE_WEIGHT = {"single": 1.0, "mixup": 0.5}
# Sets whose record has no options.ce_weight were made before the per-mode default, with weight 1.
LEGACY_CE_WEIGHT = 1.0
# Recorded under "options" in the manifest; every other field is recorded at the top level.
LOSS_OPTIONS = ("ce_weight", "focal_gamma", "stretch_weight", "tv_weight", "jitter", "latent_dim")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_target_options(label_mode: str, weights: str, dirichlet_alpha: float) -> None:
    """The target-sampling options that do not depend on the model (``mixup_k`` needs its class count)."""
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_choice("weights", weights, WEIGHT_MODES)
    if not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")


class _Options:
    """Shared construction helpers of the config records (frozen dataclasses)."""

    _KIND = "config"  # names the options in errors

    @classmethod
    def build(cls, base=None, **options):
        """``base`` (or the defaults) with ``options`` replaced; an unknown name is a TypeError that
        lists the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown {cls._KIND} option(s) {unknown}; {cls.__name__} has: {sorted(names)}")
        return dataclasses.replace(base if base is not None else cls(), **options)

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclasses.dataclass(frozen=True)
class BNInversionConfig(_Options):
    """How to invert a model's BatchNorm statistics (see :mod:`dfqkern.datagen.bn_inversion`).

    ``lr`` None: the method's default (``DEFAULT_LR``); ``ce_weight`` None: the label mode's
    (``DEFAULT_CE_WEIGHT``). ``focal_gamma`` is used by ``hast``, ``stretch_weight`` by ``dgh``,
    ``latent_dim`` by ``genie``; ``jitter`` > 0 turns on a flip + shift augmentation (max shift in
    pixels), ``tv_weight`` a total-variation prior.
    """
    _KIND = "invert_bn"

    method: str = "dgh"
    label_mode: str = "mixup"
    mixup_k: int = 2
    weights: str = "dirichlet"
    dirichlet_alpha: float = 1.0
    iters: int = 500
    batch_size: int = 32
    lr: "float | None" = None
    seed: int = 0
    ce_weight: "float | None" = None
    focal_gamma: float = 2.0
    stretch_weight: float = 1.0
    tv_weight: float = 0.0
    jitter: int = 0
    latent_dim: int = 256

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_target_options(self.label_mode, self.weights, self.dirichlet_alpha)
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {self.iters!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (batch statistics need 2 images), "
                             f"got {self.batch_size!r}")
        if not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (max shift in pixels), got {self.jitter!r}")
        for name in ("ce_weight", "stretch_weight", "tv_weight"):
            value = self.effective_ce_weight if name == "ce_weight" else getattr(self, name)
            if not float(value) >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be a number >= 0 (a loss weight), got {value!r}")

    @property
    def effective_lr(self) -> float:
        return float(DEFAULT_LR[self.method] if self.lr is None else self.lr)

    @property
    def effective_ce_weight(self) -> float:
        return DEFAULT_CE_WEIGHT[self.label_mode] if self.ce_weight is None else self.ce_weight

    def to_dict(self) -> dict:
        """The manifest record: loss options under ``options`` (``ce_weight`` resolved, so the record
        says what was used), the rest at the top level (``mixup_k`` None for single labels)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LOSS_OPTIONS}
        d["mixup_k"] = self.mixup_k if self.label_mode == "mixup" else None
        d["options"] = {k: getattr(self, k) for k in LOSS_OPTIONS}
        d["options"]["ce_weight"] = self.effective_ce_weight
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BNInversionConfig":
        """Read a record of :meth:`to_dict`, or an older one: those recorded only the loss options their
        caller passed (the others were at today's defaults) and, before the per-mode default, no
        ``ce_weight`` at all (it was ``LEGACY_CE_WEIGHT``). Other keys of the record are ignored."""
        options = dict(d.get("options") or {})
        options.setdefault("ce_weight", LEGACY_CE_WEIGHT)
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in LOSS_OPTIONS and f.name in d}
        if kw.get("mixup_k") is None:
            kw.pop("mixup_k", None)
        return cls(**kw, **options)

    def same_record(self, old: Mapping[str, Any]) -> bool:
        """Whether ``old`` (a set's recorded config, possibly an older form) describes these options."""
        try:
            return type(self).from_dict(old).to_dict() == self.to_dict()  # compares resolved values
        except (TypeError, ValueError):
            return False


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(_Options):
    """What to ask a text-to-image pipeline for: prompts (see :func:`~dfqkern.datagen.prompts.build_prompts`,
    which checks ``prompt_mode``, ``mixup_k``, ``mixup_level``, ``weights`` and ``dirichlet_alpha``)
    and sampling. ``height``/``width`` None: the pipeline's native resolution; ``output_size`` (int or
    (h, w)) the classifier input, reached by resize + center crop; ``guidance_scale <= 1`` disables
    classifier-free guidance."""
    _KIND = "diffusion"

    prompt_mode: str = "mixup"
    mixup_k: int = 2
    mixup_level: str = "text"
    weights: str = "uniform"
    dirichlet_alpha: float = 1.0
    seed: int = 0
    guidance_scale: float = 7.5
    steps: int = 30
    height: "int | None" = None
    width: "int | None" = None
    negative_prompt: "str | None" = None
    output_size: "int | tuple[int, int] | None" = None

    def __post_init__(self):
        if self.steps is None or int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (int(v) < 8 or int(v) % 8):
                raise ValueError(f"{name} must be a multiple of 8 (latent diffusion), got {v!r}")
        size = self.output_size
        if size is not None:  # one form, so configs compare equal whichever way the size was given
            object.__setattr__(self, "output_size", (size, size) if isinstance(size, int) else tuple(size))

    def to_dict(self) -> dict:
        """The manifest record (``mixup_k`` None unless ``prompt_mode`` is mixup)."""
        d = dataclasses.asdict(self)
        d["mixup_k"] = self.mixup_k if self.prompt_mode == "mixup" else None
        d["output_size"] = list(self.output_size) if self.output_size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusionConfig":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if kw.get("mixup_k") is None:
            kw.pop("mixup_k", None)
        return cls(**kw)
