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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_calib <= 0:
            raise ValueError(f"num_calib must be positive, got {self.num_calib}")
        act_widths = {self.config.act_bits} | {r.act_bits for r in self.config.rules if isinstance(r.act_bits, int)}
        unpackable = sorted(b for b in act_widths if b is not None and b not in ACT_BITS)
        if unpackable:  # the job ends by packing: refuse before any work
            raise ValueError(f"act_bits {unpackable[0]} has no packed kernel (packed activation widths: {ACT_BITS}); "
                             f"the quantize job packs the model")
        if Path(self.out).exists() and not self.overwrite:
            raise FileExistsError(f"out {self.out!r} exists; pass --overwrite to replace it")


BN_INVERSION_PREFIX = "bn-inversion:"


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

    spec = model.dfqkern_input_spec
    return generate_bn_inversion_set(out, model, config, num_images=num_images, input_shape=spec.input_size,
                                     mean=spec.mean, std=spec.std, model_id=getattr(model, "dfqkern_arch", None),
                                     device=device, overwrite=overwrite, **options)


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
        ds = load_synthetic(out, transform=tensor_transform(model.dfqkern_input_spec))
    elif spec.startswith("synthetic:"):
        ds = load_synthetic(spec[len("synthetic:"):], transform=tensor_transform(model.dfqkern_input_spec))
    else:
        ds = open_dataset(spec, transform=build_transform(model.dfqkern_input_spec))
    if len(ds) == 0:
        raise ValueError(f"calib_data {spec!r} holds no images")
    return calibration_tensor(ds, min(n, len(ds)), seed)


def evaluate_on(model, data: str, limit: int | None = None, batch_size: int = 256, device: str = "cpu") -> dict:
    from .data import build_transform, open_dataset
    from .evaluation import evaluate_top1

    ds = open_dataset(data, transform=build_transform(model.dfqkern_input_spec))
    return evaluate_top1(model, ds, batch_size=batch_size, device=device, limit=limit)


def run_quantize(job: QuantizeJob) -> dict:
    """Build, calibrate, pack and save; returns a summary (accuracies when ``eval_data`` is given)."""
    from .io import save_quantized
    from .models import create_model
    from .quantize import pack_model

    torch.manual_seed(job.config.seed)
    t0 = time.time()
    fp = create_model(job.model, checkpoint=job.checkpoint, num_classes=job.num_classes,
                      pretrained=job.pretrained).to(job.device)
    calib = load_calibration(job.calib_data, fp, job.num_calib, job.config.seed, work_dir=f"{job.out}.calib-data")
    q = quantize_model(fp, job.config)
    if job.method == "observer":
        calibrate_activations(q, calib, job.batch_size, job.device)
    else:  # calibrate() observes the ranges itself before reconstructing
        from .calib import CalibConfig, calibrate

        kw = {"method": job.method, "batch_size": job.batch_size, "seed": job.config.seed}
        if job.iters is not None:
            kw["iters"] = job.iters
        q = calibrate(q, fp, calib, CalibConfig(**kw))
    pack_model(q)
    kwargs = {"num_classes": job.num_classes} if job.num_classes else {}
    save_quantized(q, job.out, overwrite=job.overwrite, arch=job.model, arch_kwargs=kwargs)
    summary = {"model": job.model, "scheme": job.config.scheme_name, "method": job.method, "out": job.out,
               "calib_images": len(calib), "seconds_quantize": round(time.time() - t0, 1),
               "unhandled": q.dfqkern_report.unhandled}
    report = getattr(q, "dfqkern_calib_report", None)
    if report is not None:  # what the no-regression guard did (see dfqkern.calib.guard)
        summary["calibration"] = {
            "units": len(report.units), "block_units": sum(u.kind == "block" for u in report.units),
            "heldout_images": report.heldout_images, "units_kept_start": report.units_kept_start,
            "reverted_to_observer": report.reverted_to_observer,
            "heldout_loss_observer": report.model_loss_observer, "heldout_loss_final": report.model_loss_final}
    if job.eval_data:
        summary["fp_top1"] = evaluate_on(fp, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["quant_top1"] = evaluate_on(q, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["drop"] = round(summary["fp_top1"] - summary["quant_top1"], 2)
    return summary


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomic JSON write (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
