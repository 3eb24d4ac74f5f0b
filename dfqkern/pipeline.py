"""End-to-end jobs behind the CLI: quantize a registry model on calibration data, evaluate, save."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import QuantConfig
from .formats import ACT_BITS
from .calib.config import METHODS
from .quantize import calibrate_activations, quantize_model
from .model_info import model_info

log = logging.getLogger(__name__)


@dataclass
class QuantizeJob:
    """Everything ``dfqkern quantize`` needs (the CLI fills it from its flags)."""

    model: str
    calib_data: str
    out: str
    config: QuantConfig = field(default_factory=QuantConfig)
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    num_calib: int = 256
    method: str = "observer"
    iters: int | None = None
    batch_size: int = 32
    eval_data: str | None = None
    eval_limit: int | None = None
    overwrite: bool = False
    device: str = "cpu"
    resume: bool = True  # reconstruction: continue a killed run from <out>.partial/
    backend: str | None = None  # kernel backend for calibration and evaluation (None: dispatch picks)
    equalize: bool = False  # cross-layer equalization of the float model first (dfqkern.equalize)
    absorb_bias: bool = False  # high-bias absorption of the float model first (dfqkern.equalize)
    equalize_relu6: str | None = None  # ReLU6 policy of equalization (None: EqualizeConfig's default)
    bias_correction: str = "none"  # after observer calibration: none / analytic / empirical
    act_correction: str = "none"  # after calibration: DFQ-ViT's per-channel correction, none / shift / affine
    pd_weight: float | None = None  # reconstruction: PD-Quant's term (None: CalibConfig's default, off)

    def __post_init__(self):
        """Every argument and the output location, before any work (a long calibration must not
        end in an error these could have given)."""
        from .calib import CalibConfig
        from .io import CONFIG_FILE
        from .outputs import check_output_dir

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        from .calib.bias_correction import BIAS_CORRECTION_MODES

        from .calib.act_correction import MODES as ACT_CORRECTION_MODES

        if self.act_correction not in ACT_CORRECTION_MODES:
            raise ValueError(f"act_correction must be one of {ACT_CORRECTION_MODES}, got {self.act_correction!r}")
        if self.bias_correction not in BIAS_CORRECTION_MODES:
            raise ValueError(f"bias_correction must be one of {BIAS_CORRECTION_MODES}, got {self.bias_correction!r}")
        if self.bias_correction != "none" and self.method != "observer":
            raise ValueError(f"bias_correction {self.bias_correction!r} applies to method 'observer' only (reconstruction "
                             f"method {self.method!r} learns the rounding afresh and would undo it)")
        self.equalize_config = self._equalize_config()  # checks the ReLU6 policy
        if self.num_calib <= 0:
            raise ValueError(f"num_calib must be positive, got {self.num_calib}")
        kw = {"method": self.method, "batch_size": self.batch_size, "seed": self.config.seed, "backend": self.backend}
        for name in ("iters", "pd_weight"):  # None: CalibConfig's default
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        self.calib_config = CalibConfig(**kw)  # checks iters, batch_size, seed, backend, pd_weight
        if self.pd_weight and self.method == "observer":
            raise ValueError(f"pd_weight {self.pd_weight} applies to reconstruction methods, not 'observer'")
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int)
                                            or self.eval_limit <= 0):
            raise ValueError(f"eval_limit must be a positive int or None, got {self.eval_limit!r}")
        for name, spec in (("calib_data", self.calib_data), ("eval_data", self.eval_data)):
            spec = str(spec or "")
            path = spec[len(SYNTHETIC_PREFIX):] if spec.startswith(SYNTHETIC_PREFIX) else spec
            if spec and not spec.startswith(BN_INVERSION_PREFIX) and not os.path.exists(path):
                raise ValueError(f"{name} {spec!r} does not exist")
        act_widths = {self.config.act_bits, self.config.gelu_act_bits} | {r.act_bits for r in self.config.rules
                                                                           if isinstance(r.act_bits, int)}
        unpackable = sorted(b for b in act_widths if b is not None and b not in ACT_BITS)
        if unpackable:  # the job ends by packing: refuse before any work
            raise ValueError(f"act_bits {unpackable[0]} has no packed kernel (packed activation widths: {ACT_BITS}); "
                             f"the quantize job packs the model")
        check_output_dir(self.out, "out", self.overwrite,
                         replaceable=lambda p: (p / CONFIG_FILE).is_file() or not any(p.iterdir()))


    def _equalize_config(self):
        from .equalize import EqualizeConfig

        if not (self.equalize or self.absorb_bias):
            if self.equalize_relu6 is not None:
                raise ValueError("equalize_relu6 needs equalize or absorb_bias")
            return None
        kw = {} if self.equalize_relu6 is None else {"relu6": self.equalize_relu6}
        return EqualizeConfig(equalize=self.equalize, absorb_bias=self.absorb_bias,
                              guard_bits=self.config.weight_bits, **kw)  # the guard judges at the bits used


BN_INVERSION_PREFIX = "bn-inversion:"
SYNTHETIC_PREFIX = "synthetic:"


def tensor_transform(spec):
    """For [0, 1] image tensors (synthetic sets): resize to the model's input size, then normalize."""
    import torch.nn.functional as F

    mean = torch.tensor(spec.mean).reshape(-1, 1, 1)
    std = torch.tensor(spec.std).reshape(-1, 1, 1)
    size = tuple(spec.input_size[1:])

    def apply(img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) != size:
            img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return (img - mean) / std

    return apply


def generate_bn_inversion(model: torch.nn.Module, out: str, num_images: int, config=None, *, overwrite: bool = False,
                          device: str = "cpu", **options):
    """A BN-inversion SyntheticSet for ``model`` in ``out`` (resumes a finished or partial set).

    ``config`` (a :class:`~dfqkern.datagen.BNInversionConfig`) and keyword ``options`` (its fields)
    as in :func:`~dfqkern.datagen.generate_bn_inversion_set`; the model's input spec gives the
    image shape and normalization."""
    from .datagen import generate_bn_inversion_set

    spec = model_info(model).input_spec
    return generate_bn_inversion_set(out, model, config, num_images=num_images, input_shape=spec.input_size,
                                     mean=spec.mean, std=spec.std, model_id=model_info(model).arch,
                                     device=device, overwrite=overwrite, **options)


def plan_bn_inversion(model: torch.nn.Module, out: str, num_images: int, config=None, *, device: str | None = None,
                      shard_size: int | None = None, **options):
    """The shard plan :func:`generate_bn_inversion` will follow (a
    :class:`~dfqkern.datagen.ShardPlan`: for dgh the whole set when it fits in memory, with the
    estimate); pass its ``shard_size`` on so both agree."""
    from .datagen import plan_shards

    return plan_shards(config, num_images=num_images, input_shape=model_info(model).input_spec.input_size, device=device,
                       shard_size=shard_size, out_dir=out, model=model, **options)


def pool_dir(out: str) -> str:
    """Where the unfiltered pool of a filtered set is generated (beside ``out``, resumable)."""
    return f"{out}.pool"


def filter_generated(model: torch.nn.Module, pool: str, out: str, steps, num_images: int | None = None, *,
                     overwrite: bool = False):
    """Filter the finished set ``pool`` through ``steps`` (``FilterStep`` or ``"energy:0.5"``) into
    ``out`` with the model's own input transform; see :func:`~dfqkern.datagen.filter_synthetic_set`."""
    from .datagen import filter_synthetic_set

    return filter_synthetic_set(pool, out, model, steps, num_images=num_images,
                                transform=tensor_transform(model_info(model).input_spec), overwrite=overwrite)


def load_calibration(spec: str, model: torch.nn.Module, n: int, seed: int, work_dir: str | None = None,
                     iters: int | None = None) -> torch.Tensor:
    """``n`` calibration inputs from an image folder / tar, ``synthetic:DIR`` (a SyntheticSet), or
    ``bn-inversion:METHOD[:single|mixup]`` (generated now from the model's BatchNorm statistics into
    ``work_dir``, resumable; label mode and ``iters`` default to :class:`~dfqkern.datagen.BNInversionConfig`'s)."""
    from .data import build_transform, calibration_tensor, open_dataset
    from .datagen.store import load_synthetic

    if spec.startswith(BN_INVERSION_PREFIX):
        parts = spec[len(BN_INVERSION_PREFIX):].split(":")
        options = {"method": parts[0], "seed": seed}
        if len(parts) > 1:
            options["label_mode"] = parts[1]
        if iters is not None:
            options["iters"] = iters
        if work_dir is None:
            raise ValueError("calib_data 'bn-inversion:...' needs a work directory for the generated set")
        out = generate_bn_inversion(model, work_dir, n, **options)
        ds = load_synthetic(out, transform=tensor_transform(model_info(model).input_spec))
    elif spec.startswith("synthetic:"):
        ds = load_synthetic(spec[len("synthetic:"):], transform=tensor_transform(model_info(model).input_spec))
        channels = model_info(model).input_spec.input_size[0]
        if ds.channels != channels:  # the transform would broadcast 1 channel over 3 without a word
            raise ValueError(f"calib_data {spec!r} holds {ds.channels}-channel images; the model takes {channels} "
                             f"channels")
    else:
        ds = open_dataset(spec, transform=build_transform(model_info(model).input_spec))
    if len(ds) == 0:
        raise ValueError(f"calib_data {spec!r} holds no images")
    return calibration_tensor(ds, min(n, len(ds)), seed)


def model_classes(model: torch.nn.Module) -> tuple[list[str] | None, int]:
    """``(class names or None, number of outputs)`` of a classifier, for labelling evaluation data:
    names for the CIFAR-10 registry models and timm ImageNet models (synset ids, as ImageNet folders
    are named), else None."""
    spec = model_info(model).input_spec
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            num_classes = int(model(torch.zeros(1, *spec.input_size, device=device)).shape[-1])
    finally:
        model.train(was_training)
    arch = str(model_info(model).arch or "")
    names = None
    if arch.startswith("cifar10_") and num_classes == 10:
        from .datagen.prompts import CIFAR10_CLASSES

        names = list(CIFAR10_CLASSES)
    elif arch.startswith("timm:"):
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        names = list(ImageNetInfo(subset).label_names()) if subset else None
    return (names if names is not None and len(names) == num_classes else None), num_classes


def evaluate_on(model, data: str, limit: int | None = None, batch_size: int = 256, device: str = "cpu") -> dict:
    from .data import build_transform, open_dataset
    from .evaluation import evaluate_top1

    names, num_classes = model_classes(model)
    ds = open_dataset(data, transform=build_transform(model_info(model).input_spec), classes=names,
                      num_classes=num_classes)
    return evaluate_top1(model, ds, batch_size=batch_size, device=device, limit=limit)


def run_quantize(job: QuantizeJob) -> dict:
    """Build, calibrate, pack and save; returns a summary (accuracies when ``eval_data`` is given).

    Reconstruction checkpoints every unit into ``<out>.partial/`` (removed on success): a killed run
    given the same job resumes after its finished units, unless ``job.resume`` is False."""
    from .outputs import OutputLock

    with OutputLock(job.out):  # one writer per out (and its .partial / .calib-data siblings)
        return _run_quantize(job)


def _run_quantize(job: QuantizeJob) -> dict:
    from .io import save_quantized
    from .models import create_model
    from .quantize import pack_model

    torch.manual_seed(job.config.seed)
    t0 = time.time()
    fp = create_model(job.model, checkpoint=job.checkpoint, num_classes=job.num_classes,
                      pretrained=job.pretrained).to(job.device)
    calib = load_calibration(job.calib_data, fp, job.num_calib, job.config.seed, work_dir=f"{job.out}.calib-data")
    src = fp  # what quantize_model gets: the float model, equalized on request (fp stays the FP reference)
    if job.equalize_config is not None:
        from .equalize import equalize_model

        src = equalize_model(fp, job.equalize_config, data=calib)
    q = quantize_model(src, job.config, backend=job.backend)
    partial = None
    if job.method == "observer":
        calibrate_activations(q, calib, job.batch_size, job.device)
        if job.bias_correction != "none":
            from .calib.bias_correction import correct_bias

            correct_bias(q, job.bias_correction, float_model=src, data=calib, batch_size=job.batch_size,
                         device=job.device)
    else:  # calibrate() observes the ranges itself before reconstructing
        from .calib import calibrate

        partial = _partial_dir(job, src, calib)
        q = calibrate(q, src, calib, job.calib_config.replace(checkpoint_dir=str(partial)))
    act_report = None
    if job.act_correction != "none":
        from .calib.act_correction import correct_activations

        act_report = correct_activations(q, calib, scale=job.act_correction == "affine", batch_size=job.batch_size,
                                         device=job.device)
    pack_model(q)
    kwargs = {"num_classes": job.num_classes} if job.num_classes else {}
    save_quantized(q, job.out, overwrite=job.overwrite, arch=job.model, arch_kwargs=kwargs)
    if partial is not None:
        _remove_partial(partial)
    summary = {"model": job.model, "scheme": job.config.scheme_name, "method": job.method, "out": job.out,
               "calib_images": len(calib), "seconds_quantize": round(time.time() - t0, 1),
               "unhandled": model_info(q).report.unhandled}
    if job.config.ln_reparam:  # which LayerNorms were folded (dfqkern.calib.ln_reparam), and why others were not
        summary["ln_reparam"] = model_info(q).report.ln_reparam
    if src is not fp:
        summary["equalize"] = src.dfqkern_equalize_report.to_dict()
    if act_report is not None:
        summary["act_correction"] = act_report.to_dict()
    if job.bias_correction != "none":
        summary["bias_correction"] = q.dfqkern_bias_correction_report.to_dict()
    report = model_info(q).calib_report
    if report is not None:  # what the no-regression guard did (see dfqkern.calib.guard)
        summary["calibration"] = {
            "units": len(report.units), "block_units": sum(u.kind == "block" for u in report.units),
            "units_resumed": sum(u.resumed for u in report.units),
            "heldout_images": report.heldout_images, "units_kept_start": report.units_kept_start,
            "reverted_to_observer": report.reverted_to_observer,
            "heldout_loss_observer": report.model_loss_observer, "heldout_loss_final": report.model_loss_final,
            "config": job.calib_config.result_fields()}  # what the reconstruction ran with (iters, lrs, pd_weight, ...)
    if job.eval_data:
        summary["fp_top1"] = evaluate_on(fp, job.eval_data, job.eval_limit, device=job.device)["top1"]
        if src is not fp:  # equalization through ReLU6 is exact only under its bound: show what it did
            summary["fp_equalized_top1"] = evaluate_on(src, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["quant_top1"] = evaluate_on(q, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["drop"] = round(summary["fp_top1"] - summary["quant_top1"], 2)
    return summary


# ----------------------------------------------------------------------------- resumable reconstruction

PARTIAL_JOB_FILE = "job.json"
# What calib's checkpoint_dir holds (progress.json, unit_NNNN.safetensors, their .tmp) plus our job record.
_PARTIAL_FILES = ("job.json", "progress.json", "progress.tmp", "unit_*.safetensors", "unit_*.tmp")


def _job_fingerprint(job: QuantizeJob, fp: torch.nn.Module, calib: torch.Tensor) -> str:
    """sha256 of what decides the calibrated model: the float weights, the calibration images and
    both configs (calib's own checkpoint fingerprint has no weights)."""
    import hashlib

    from ._version import __version__

    h = hashlib.sha256(json.dumps({"version": __version__, "model": job.model, "num_classes": job.num_classes,
                                   "quant": job.config.to_dict(), "calib": job.calib_config.result_fields()},
                                  sort_keys=True, default=str).encode())
    for name, t in fp.state_dict().items():
        h.update(name.encode())
        h.update(_raw_bytes(t))
    for i in range(0, len(calib), 64):  # in chunks: no second copy of a large calibration set
        h.update(_raw_bytes(calib[i:i + 64]))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bf16 too


def _remove_partial(path: Path) -> None:
    """Remove a partial-calibration directory: only the files a run writes there."""
    for pattern in _PARTIAL_FILES:
        for f in path.glob(pattern):
            f.unlink()
    try:
        path.rmdir()
    except OSError:
        raise ValueError(f"{str(path)!r} holds files dfqkern did not write ({sorted(p.name for p in path.iterdir())[:3]}"
                         f"); move them or remove the directory") from None


def _partial_dir(job: QuantizeJob, fp: torch.nn.Module, calib: torch.Tensor) -> Path:
    """``<out>.partial/`` for this job: kept when it was left by the same job, else emptied."""
    path = Path(f"{job.out}.partial")
    fingerprint = _job_fingerprint(job, fp, calib)
    if path.exists():
        try:
            recorded = json.loads((path / PARTIAL_JOB_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if job.resume and recorded == fingerprint:
            log.warning("resuming the calibration in %s (finished units are kept)", path)
            return path
        why = "resume is off" if not job.resume else "it is from another model, data or config"
        log.warning("starting fresh: removing the partial calibration %s (%s)", path, why)
        _remove_partial(path)
    path.mkdir(parents=True)
    write_json({"fingerprint": fingerprint, "model": job.model, "calib_data": job.calib_data}, path / PARTIAL_JOB_FILE)
    return path


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomic JSON write (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
