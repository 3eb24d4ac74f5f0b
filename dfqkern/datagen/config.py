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
import math
from typing import Any, Mapping

# genie: Genie's generator path as the paper has it (unconditional generator per batch + learned
# latents, swing convolution on the pretrained model's strided convs); genie-labels: dfqkern's
# earlier conditional variant (label embedding, swing inside the generator), recorded as "genie"
# by sets made before the split.
# psaq / dfq-vit: the ViT methods (no BatchNorm; patch-similarity entropy of the attention outputs,
# dfqkern.datagen.vit_inversion), run by the same set machinery as the BN methods.
METHODS = ("zeroq", "genie", "genie-labels", "hast", "dgh", "psaq", "dfq-vit")
VIT_METHODS = ("psaq", "dfq-vit")
BN_METHODS = tuple(m for m in METHODS if m not in VIT_METHODS)  # the ones that invert BatchNorm statistics
# Which token sequences the ViT methods measure patch similarity on: each self-attention module's output
# (PSAQ-ViT's MHSA output) or the output of the block that holds it.
PATCH_SOURCES = ("attention", "block")
LABEL_MODES = ("single", "mixup", "none")
WEIGHT_MODES = ("dirichlet", "uniform")
# Augmentation of the images before the model during inversion: flip-shift = random flip + circular
# shift by up to ``jitter`` pixels; dgh = DGH's pipeline (3x3 Gaussian smoothing, reflect-padded random
# crop by up to ``jitter`` pixels, random flip), after Sony MCT's smoothing-and-augmentation.
AUGMENTS = ("none", "flip-shift", "dgh")
DEFAULT_LR = {"zeroq": 0.25, "hast": 0.25, "dgh": 0.25, "genie": 0.01, "genie-labels": 0.01, "psaq": 0.25,
              "dfq-vit": 0.25}
# ZeroQ and Genie optimize the BN loss alone (no labels); dgh defaults to mixup labels (measured:
# bench/results/bn_inversion_notes.md); genie-labels does better with single labels than mixup.
# PSAQ-ViT and DFQ-ViT optimize toward one target class per image, as their papers do (mixup works too).
DEFAULT_LABEL_MODE = {"zeroq": "none", "genie": "none", "genie-labels": "single", "hast": "mixup", "dgh": "mixup",
                      "psaq": "single", "dfq-vit": "single"}
# Soft (mixup) targets keep pulling against the BN term where one-hot targets saturate, so they get
# half the weight; measurements in bench/results/bn_inversion_notes.md.
DEFAULT_CE_WEIGHT = {"single": 1.0, "mixup": 0.5, "none": 0.0}
# ZeroQ's input prior (the input treated as one more BN layer with mean 0 / std 1) is part of zeroq.
DEFAULT_INPUT_PRIOR_WEIGHT = {"zeroq": 1.0}
# The ViT methods' images come out far rougher than real ones (vertical total variation 1.4 vs 0.3 in
# normalized space) and the rounding learned on them overfits that: a total-variation prior of weight 2
# gave +0.7 points of W4A4 QDrop top-1 on the trained CIFAR ViT at the library's iterations (seeds 0 and 1;
# +0.3 / +1.6 at 50 iterations; plateau from 1 to 3; bench/results/cifar10_vit.md, `tv_weight=2` rows).
# No gain for dgh on ResNet-20, so the BN methods keep 0.
DEFAULT_TV_WEIGHT = {"psaq": 2.0, "dfq-vit": 2.0}
# Records without "config_version" were written before the method split: their "genie" is genie-labels,
# a missing options.ce_weight was weight 1, a missing input prior weight 0 and jitter > 0 meant flip-shift.
CONFIG_VERSION = 2
LEGACY_CE_WEIGHT = 1.0
# Recorded under "options" in the manifest; every other field is recorded at the top level.
LOSS_OPTIONS = ("ce_weight", "focal_gamma", "stretch_weight", "tv_weight", "jitter", "latent_dim",
                "input_prior_weight", "augment", "patch_weight", "patch_source", "kde_bandwidth", "l2_weight")
# Images per shard of a BN-inversion set (a shard is inverted as one unit); dgh defaults to the whole
# set (set-level statistics) when its pixels and Adam state fit in this fraction of the free memory.
DEFAULT_SHARD_SIZE = 256
DGH_MEMORY_FRACTION = 0.5
# Arithmetic of the model's forward during generation (autocast; see datagen/resources.py). fp32 is
# the default: the measured defaults (bench/results/bn_inversion_notes.md) were made in it.
PRECISIONS = ("fp32", "bf16", "fp16")
# Batch size "auto" (CUDA; on the CPU the generator's default batch size is used): the largest batch
# whose estimated memory fits in this fraction of the free memory, at most AUTO_BATCH_MAX, and from
# AUTO_BATCH_MULTIPLE up a multiple of it.
AUTO_BATCH = "auto"
AUTO_BATCH_MEMORY_FRACTION = 0.8
AUTO_BATCH_MAX = 256
AUTO_BATCH_MULTIPLE = 8
# Post-generation filters (GenQ): energy = -logsumexp(logits), keep the lowest; bn = leave-one-out
# change of the set's BN loss, keep the images whose removal raises it most.
# patchsim (GenQ's ViT filter) = mean patch-similarity entropy of the attention outputs, keep the highest.
FILTER_KINDS = ("energy", "bn", "patchsim")


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

    ``lr`` None: the method's default (``DEFAULT_LR``); ``label_mode`` None: the method's
    (``DEFAULT_LABEL_MODE``); ``ce_weight`` None: the label mode's (``DEFAULT_CE_WEIGHT``);
    ``input_prior_weight`` None: the method's (``DEFAULT_INPUT_PRIOR_WEIGHT``, 0 if absent);
    ``tv_weight`` None: the method's (``DEFAULT_TV_WEIGHT``, 0 if absent);
    ``augment`` None: ``flip-shift`` when ``jitter`` > 0, else ``none`` (``AUGMENTS``). ``focal_gamma``
    is used by ``hast``, ``stretch_weight`` by ``dgh``, ``latent_dim`` by the genie methods;
    ``jitter`` is the augmentation's max shift in pixels, ``tv_weight`` a total-variation prior,
    ``l2_weight`` an L2 prior (mean squared pixel). The ViT methods (``VIT_METHODS``, no BatchNorm
    needed) use ``patch_weight`` (the patch-similarity entropy term), ``patch_source`` (``PATCH_SOURCES``)
    and ``kde_bandwidth`` (of its kernel density estimate); ``dfq-vit`` ramps ``focal_gamma``.
    ``precision`` (``PRECISIONS``) autocasts the model's forward (fp16 on CUDA only).
    The ``effective_*`` properties resolve the None defaults; ``to_dict`` records resolved values.
    """
    _KIND = "invert_bn"

    method: str = "dgh"
    label_mode: "str | None" = None
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
    tv_weight: "float | None" = None
    jitter: int = 0
    latent_dim: int = 256
    input_prior_weight: "float | None" = None
    augment: "str | None" = None
    precision: str = "fp32"
    patch_weight: float = 1.0
    patch_source: str = "attention"
    kde_bandwidth: float = 0.05
    l2_weight: float = 0.0

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("precision", self.precision, PRECISIONS)
        check_target_options(self.effective_label_mode, self.weights, self.dirichlet_alpha)
        check_choice("augment", self.effective_augment, AUGMENTS)
        check_choice("patch_source", self.patch_source, PATCH_SOURCES)
        if not float(self.kde_bandwidth) > 0:
            raise ValueError(f"kde_bandwidth must be > 0 (a kernel width in cosine similarity), "
                             f"got {self.kde_bandwidth!r}")
        if self.effective_label_mode == "none" and self.effective_ce_weight:
            raise ValueError(f"ce_weight {self.ce_weight} needs targets: label_mode 'none' has none")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {self.iters!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (batch statistics need 2 images), "
                             f"got {self.batch_size!r}")
        if not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (max shift in pixels), got {self.jitter!r}")
        for name in ("ce_weight", "stretch_weight", "tv_weight", "input_prior_weight", "patch_weight", "l2_weight"):
            value = getattr(self, f"effective_{name}", getattr(self, name))  # None defaults resolved
            if not float(value) >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be a number >= 0 (a loss weight), got {value!r}")

    @property
    def effective_lr(self) -> float:
        return float(DEFAULT_LR[self.method] if self.lr is None else self.lr)

    @property
    def effective_label_mode(self) -> str:
        return DEFAULT_LABEL_MODE.get(self.method, "mixup") if self.label_mode is None else self.label_mode

    @property
    def effective_ce_weight(self) -> float:
        return DEFAULT_CE_WEIGHT.get(self.effective_label_mode, 0.0) if self.ce_weight is None else self.ce_weight

    @property
    def effective_input_prior_weight(self) -> float:
        w = self.input_prior_weight
        return float(DEFAULT_INPUT_PRIOR_WEIGHT.get(self.method, 0.0) if w is None else w)

    @property
    def effective_tv_weight(self) -> float:
        return float(DEFAULT_TV_WEIGHT.get(self.method, 0.0) if self.tv_weight is None else self.tv_weight)

    @property
    def effective_augment(self) -> str:
        if self.augment is not None:
            return self.augment
        return "flip-shift" if isinstance(self.jitter, int) and self.jitter > 0 else "none"

    def to_dict(self) -> dict:
        """The manifest record: loss options under ``options``, the rest at the top level, every
        default resolved (so the record says what was used; ``mixup_k`` None unless mixup)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LOSS_OPTIONS}
        d["label_mode"] = self.effective_label_mode
        d["mixup_k"] = self.mixup_k if d["label_mode"] == "mixup" else None
        d["options"] = {k: getattr(self, k) for k in LOSS_OPTIONS}
        d["options"].update(ce_weight=self.effective_ce_weight, input_prior_weight=self.effective_input_prior_weight,
                            tv_weight=self.effective_tv_weight, augment=self.effective_augment)
        d["config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BNInversionConfig":
        """Read a record of :meth:`to_dict`, or an older one (no ``config_version``): those recorded
        only the loss options their caller passed (the others were at today's defaults), before the
        per-mode default no ``ce_weight`` (it was ``LEGACY_CE_WEIGHT``), no input prior or TV prior (weight 0),
        and named genie-labels ``genie``. Other keys of the record are ignored."""
        options = dict(d.get("options") or {})
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in LOSS_OPTIONS and f.name in d}
        if "config_version" not in d:
            options.setdefault("ce_weight", LEGACY_CE_WEIGHT)
            options.setdefault("input_prior_weight", 0.0)
            options.setdefault("tv_weight", 0.0)
            if kw.get("method") == "genie":
                kw["method"] = "genie-labels"
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
class FilterStep:
    """One post-generation filter: ``kind`` (``FILTER_KINDS``) keeping ``keep_fraction`` of its input."""
    kind: str
    keep_fraction: float

    def __post_init__(self):
        check_choice("filter", self.kind, FILTER_KINDS)
        if not 0 < float(self.keep_fraction) <= 1:
            raise ValueError(f"filter {self.kind}: keep fraction must be in (0, 1], got {self.keep_fraction!r}")

    @classmethod
    def parse(cls, text: str) -> "FilterStep":
        """``KIND:KEEP_FRACTION`` (``energy:0.5``, ``bn:0.75``)."""
        kind, _, frac = str(text).partition(":")
        try:
            return cls(kind.strip(), float(frac))
        except ValueError as err:
            raise ValueError(f"filter {text!r}: expected KIND:KEEP_FRACTION with KIND in {list(FILTER_KINDS)} and "
                             f"0 < KEEP_FRACTION <= 1 ({err})") from None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "keep_fraction": float(self.keep_fraction)}


def parse_filters(specs) -> list[FilterStep]:
    """Filter steps from CLI-style specs: each ``KIND:FRACTION``, or several joined by commas."""
    return [FilterStep.parse(s) for spec in specs or () for s in str(spec).split(",") if s.strip()]


def pool_size(num_images: int, steps) -> int:
    """Images to generate so that the filter chain ``steps`` keeps ``num_images``: N / prod(keep)."""
    keep = 1.0
    for step in steps:
        keep *= float(step.keep_fraction)
    return math.ceil(num_images / keep - 1e-9)


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
