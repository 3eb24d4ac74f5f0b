"""``dfqkern finetune``: build, PTQ start, data-free QAT, pack and save (the same packed checkpoint format).

The PTQ start is the quantize job's own (:class:`dfqkern.pipeline.QuantizeJob` checks every shared
argument and the output location): observer ranges, or a reconstruction method such as QDrop, on
``calib_data`` (for a data-free run a synthetic set or ``bn-inversion:dgh:mixup``). QAT then sees
generated images, and with ``replay_weight`` > 0 also that calibration set. The training state is
kept in ``<out>.qat/`` after every epoch and removed on success; rerunning the same command after a kill recomputes the (deterministic) start and
resumes after the last finished epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig
from .config import QATConfig
from ..model_info import model_info


@dataclass
class FinetuneJob:
    """Everything ``dfqkern finetune`` needs (the CLI fills it from its flags)."""

    model: str
    calib_data: str
    out: str
    config: QuantConfig = field(default_factory=QuantConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    num_calib: int = 256
    start: str = "observer"
    start_iters: int | None = None
    batch_size: int = 32
    eval_data: str | None = None
    eval_limit: int | None = None
    overwrite: bool = False
    device: str = "cpu"
    resume: bool = True
    backend: str | None = None
    samples_out: str | None = None
    num_samples: int = 256

    def __post_init__(self):
        """Every argument and the output location, before any work."""
        from ..outputs import check_output_dir
        from ..pipeline import QuantizeJob

        if not isinstance(self.qat, QATConfig):
            raise TypeError(f"qat must be a QATConfig, got {type(self.qat).__name__}")
        self.ptq = QuantizeJob(model=self.model, calib_data=self.calib_data, out=self.out, config=self.config,
                               checkpoint=self.checkpoint, pretrained=self.pretrained, num_classes=self.num_classes,
                               num_calib=self.num_calib, method=self.start, iters=self.start_iters,
                               batch_size=self.batch_size, eval_data=self.eval_data, eval_limit=self.eval_limit,
                               overwrite=self.overwrite, device=self.device, resume=self.resume, backend=self.backend)
        if self.samples_out is not None:
            if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
                raise ValueError(f"num_samples must be an int >= 1, got {self.num_samples!r}")
            check_output_dir(self.samples_out, "samples_out", overwrite=self.overwrite)

    @property
    def state_dir(self) -> str:
        return f"{self.out}.qat"


def run_finetune(job: FinetuneJob) -> dict:
    """Run ``job`` holding the lock on its ``out``; returns the summary (accuracies with ``eval_data``)."""
    from ..outputs import OutputLock

    with OutputLock(job.out):
        return _run(job)


def _run(job: FinetuneJob) -> dict:
    from ..io import save_quantized
    from ..models import create_model
    from ..pipeline import evaluate_on, load_calibration
    from ..quantize import calibrate_activations, pack_model, quantize_model
    from .checkpoint import clear_state
    from .engine import finetune

    torch.manual_seed(job.config.seed)
    t0 = time.time()
    fp = create_model(job.model, checkpoint=job.checkpoint, num_classes=job.num_classes,
                      pretrained=job.pretrained).to(job.device)
    calib = load_calibration(job.calib_data, fp, job.num_calib, job.config.seed, work_dir=f"{job.out}.calib-data")
    q = quantize_model(fp, job.config, backend=job.backend)
    if job.start == "observer":
        calibrate_activations(q, calib, job.batch_size, job.device, progress=job.qat.progress)
    else:
        from ..calib import calibrate

        q = calibrate(q, fp, calib, job.ptq.calib_config.replace(progress=job.qat.progress))
    t_start = time.time() - t0
    summary = {"model": job.model, "scheme": job.config.scheme_name, "method": f"qat:{job.qat.method}",
               "start": job.start, "out": job.out, "calib_images": len(calib), "epochs": job.qat.epochs,
               "iters_per_epoch": job.qat.iters, "batch_size": job.qat.batch_size,
               "seconds_start": round(t_start, 1), "unhandled": model_info(q).report.unhandled}
    if job.eval_data:
        summary["fp_top1"] = evaluate_on(fp, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["start_top1"] = evaluate_on(q, job.eval_data, job.eval_limit, device=job.device)["top1"]
    if not job.resume:
        clear_state(job.state_dir)
    finetune(q, fp, job.qat, checkpoint_dir=job.state_dir, resume=job.resume,
             replay=calib if job.qat.replay_weight > 0 else None)
    report = q.dfqkern_qat_report
    summary.update(seconds_qat=report["seconds"], epochs_resumed=report["epochs_resumed"], history=report["history"])
    if job.eval_data:
        summary["quant_top1"] = evaluate_on(q, job.eval_data, job.eval_limit, device=job.device)["top1"]
        summary["drop"] = round(summary["fp_top1"] - summary["quant_top1"], 2)
    if job.samples_out is not None:
        from .samples import save_generated_set

        spec = model_info(fp).input_spec
        summary["samples_out"] = str(save_generated_set(q.dfqkern_qat_generator, job.samples_out, job.num_samples,
                                                        mean=spec.mean, std=spec.std, seed=job.qat.seed,
                                                        overwrite=job.overwrite))
    pack_model(q)
    kwargs = {"num_classes": job.num_classes} if job.num_classes else {}
    save_quantized(q, job.out, overwrite=job.overwrite, arch=job.model, arch_kwargs=kwargs)
    clear_state(job.state_dir)
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary
