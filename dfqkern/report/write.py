"""Build a report from a :class:`~dfqkern.report.job.ReportJob` and write it atomically: every file goes
into a temporary directory beside ``out``, renamed into place when complete (an interrupted run
leaves no half-written report)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from .job import REPORT_JSON, ReportJob

REPORT_MD, REPORT_HTML = "report.md", "report.html"
SQNR_PNG, SAMPLES_PNG = "sqnr.png", "samples.png"


def _json_safe(obj):
    """JSON without the non-standard Infinity / NaN: an exact (noise-free) SQNR is written as "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _probe_images(job: ReportJob, spec_model, synthetic: Path | None) -> tuple[torch.Tensor | None, str | None]:
    """The images of the output SQNR and observed ranges, and what they are."""
    from ..pipeline import SYNTHETIC_PREFIX, load_calibration

    if job.calib_images is not None:
        x = job.calib_images[:job.num_calib]
        return x.detach().float().cpu(), f"{len(x)} given images"
    spec = job.calib_data or (f"{SYNTHETIC_PREFIX}{synthetic}" if synthetic is not None else None)
    if spec is None or job.num_calib == 0:
        return None, None
    try:
        x = load_calibration(spec, spec_model, job.num_calib, seed=0)
    except ValueError as e:
        if job.calib_data is not None:  # asked for: its error stands
            raise
        return None, f"none (the synthetic set does not fit the model: {e})"
    return x.float().cpu(), f"{len(x)} images of `{spec}`"


def _evaluator(job: ReportJob, float_model):
    """``model -> {"fp_top1", "quant_top1", "drop", "n"}`` on ``job.eval_data`` (the float model's top-1
    measured once)."""
    from ..pipeline import evaluate_on

    fp = evaluate_on(float_model, job.eval_data, job.eval_limit)["top1"] if float_model is not None else None

    def evaluate(model):
        res = evaluate_on(model, job.eval_data, job.eval_limit)
        return {"fp_top1": fp, "quant_top1": res["top1"], "n": res.get("n"),
                "drop": None if fp is None else round(fp - res["top1"], 2)}

    return evaluate


def build_report(job: ReportJob) -> tuple[dict, dict[str, bytes]]:
    """(every number of the report, PNG bytes by file name)."""
    from .._version import __version__
    from ..io import load_quantized
    from . import plots
    from .facts import checkpoint_facts
    from .samples import find_synthetic, synthetic_facts
    from .sqnr import folded_reference

    float_model = job.float_model() if callable(job.float_model) and not isinstance(job.float_model, torch.nn.Module) \
        else job.float_model
    reference = folded_reference(float_model)[0] if float_model is not None else None
    synthetic = None if job.synthetic is False else (
        Path(job.synthetic) if job.synthetic is not None else find_synthetic(Path(job.run), job.checkpoints))
    spec_model = float_model if float_model is not None else load_quantized(job.checkpoints[0],
                                                                            trust_unverified=job.trust_unverified)
    images, images_label = _probe_images(job, spec_model, synthetic)
    evaluate = _evaluator(job, float_model) if job.eval_data else None
    runs = [checkpoint_facts(c, reference=reference, images=images, record=job.records.get(c), evaluate=evaluate,
                             trust_unverified=job.trust_unverified) for c in job.checkpoints]
    syn, syn_images = synthetic_facts(synthetic, job.num_samples) if synthetic is not None else (None, None)
    report = {"dfqkern_version": __version__, "run": str(job.run),
              "inputs": {"float_model": (job.float_label or "given") if float_model is not None else None,
                         "probe_images": images_label},
              "runs": runs, "synthetic": syn}
    figures: dict[str, bytes] = {}
    if (png := plots.sqnr_plot(runs)) is not None:
        figures[SQNR_PNG] = png
    for r in runs:
        if (png := plots.range_plot(r)) is not None:
            figures[range_png(r["name"])] = png
    if syn is not None and (png := plots.sample_grid(syn_images, syn["samples"])) is not None:
        figures[SAMPLES_PNG] = png
    return report, figures


def range_png(checkpoint_name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in checkpoint_name)
    return f"act_ranges_{safe}.png"


def _figure_refs(report: dict, figures: dict) -> dict:
    refs = {"ranges": {r["name"]: range_png(r["name"]) for r in report["runs"] if range_png(r["name"]) in figures}}
    for key, name in (("sqnr", SQNR_PNG), ("samples", SAMPLES_PNG)):
        if name in figures:
            refs[key] = name
    return refs


def write_report(job: ReportJob) -> Path:
    """Write the report of ``job`` into ``job.out``: ``report.json`` always; ``report.md`` + PNGs
    (format md / both); ``report.html`` with the PNGs embedded (html / both). Returns ``job.out``."""
    import tempfile

    from ..outputs import OutputLock, replace_dir
    from .content import build_blocks
    from .render import to_html, to_markdown

    out = Path(job.out)
    with OutputLock(out, "--out"):
        report, figures = build_report(job)
        blocks = build_blocks(report, _figure_refs(report, figures))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            (tmp / REPORT_JSON).write_text(json.dumps(_json_safe(report), indent=1, sort_keys=True))
            if job.format in ("md", "both"):
                (tmp / REPORT_MD).write_text(to_markdown(blocks))
                for name, png in figures.items():
                    (tmp / name).write_bytes(png)
            if job.format in ("html", "both"):
                (tmp / REPORT_HTML).write_text(to_html(blocks, figures))
            tmp.chmod(0o755)  # mkdtemp makes it 0700; a report is for reading
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
