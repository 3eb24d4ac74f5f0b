"""Real-data accuracy benchmark: CIFAR-10 ResNet-20, calibrated on real training images.

One command reproduces the committed table::

    python bench/accuracy_cifar10.py            # every row; rows already in the JSON are kept (resume)
    python bench/accuracy_cifar10.py --fresh    # recompute everything

Rows: W4A4, W3A3, W2A4 with first and last layer at 8 bits, and W4A4 with every layer quantized,
each with methods observer / brecq / qdrop / genie on ``--calib-images`` (1024) random training
images; plus the observer-only W8A8 / W4A8 / W4A4 rows on 256 images (the foundation baseline).
Top-1 is measured on the 5,000 dev test images. Each finished row is written to
``bench/results/cifar10_real.json`` at once and the markdown table is regenerated from the JSON
(never typed), so a killed run resumes at the next row.

A3: ``QuantConfig(act_bits=3)`` calibrates and evaluates in fake-quant (no packed kernel runs 3-bit
activations; the table measures accuracy, not deployment).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, Timer, add_choices, add_run_flags, cifar10_dir, dev_set, document,  # noqa: E402
                    generated_by, join_key, now, parser, run_meta, table_head, top1, train_set)

import torch  # noqa: E402

from dfqkern.calib import CalibConfig, calibrate  # noqa: E402
from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.data import calibration_tensor  # noqa: E402
from dfqkern.models import create_model  # noqa: E402
from dfqkern.quantize import quantize_model  # noqa: E402
from dfqkern.model_info import model_info  # noqa: E402

MODEL = "cifar10_resnet20"
# name -> (weight bits, activation bits, first/last bits)
SETTINGS = {
    "w4a4": (4, 4, 8),
    "w3a3": (3, 3, 8),
    "w2a4": (2, 4, 8),
    "w4a4-all": (4, 4, None),
}
METHODS = ("observer", "brecq", "qdrop", "genie")
FOUNDATION = ("w8a8", "w4a8", "w4a4")  # observer-only rows on FOUNDATION_IMAGES images
FOUNDATION_IMAGES = 256
TARGET_DROP = {"w4a4": 1.5, "w3a3": 5.0, "w2a4": 7.0}  # first/last 8-bit, CALIB images
FOUNDATION_TARGET_DROP = {"w8a8": 0.3}
TIME_LIMIT_S = 15 * 60


def quant_config(wbits: int, abits: int, first_last: int | None) -> QuantConfig:
    return QuantConfig(weight_bits=wbits, act_bits=abits, first_last_bits=first_last)


def open_cifar10(data_dir: "str | None"):
    """(pretrained ResNet-20, dev test set with labels, training images) from the shared data folder."""
    data_dir = cifar10_dir(data_dir)
    fp_model = create_model(MODEL, checkpoint=data_dir / "resnet20-12fca82f.th")
    spec = model_info(fp_model).input_spec
    return fp_model, dev_set(data_dir, spec), train_set(data_dir, spec)


def run_row(fp_model, dev, calib: torch.Tensor, setting: str, wbits: int, abits: int, first_last, method: str,
            iters: int, seed: int, progress: bool) -> dict:
    cfg = CalibConfig(method=method, iters=iters, seed=seed, progress=progress)
    with Timer() as t:  # timed: weight observers, activation ranges, reconstruction
        qmodel = quantize_model(fp_model, quant_config(wbits, abits, first_last))
        calibrate(qmodel, fp_model, calib, cfg)
    eval_start = time.perf_counter()
    acc = top1(qmodel, dev, progress)
    return {
        "setting": setting, "wbits": wbits, "abits": abits, "first_last_bits": first_last, "method": method,
        "calib_images": len(calib), "iters": 0 if method == "observer" else iters, "seed": seed,
        "top1": acc, "calib_wall_s": round(t.wall, 1), "calib_cpu_s": round(t.cpu, 1),
        "eval_wall_s": round(time.perf_counter() - eval_start, 1), "load_avg_1min": t.load,
        "units": len(model_info(qmodel).calib_report.units), "finished": now(),
    }


def row_summary(fp: float):
    """The line printed after a :func:`run_row` row, against the FP top-1 ``fp``."""
    return lambda r: (f"top-1 {r['top1']:.2f} (drop {fp - r['top1']:.2f}) calib {r['calib_wall_s']:.0f}s wall / "
                      f"{r['calib_cpu_s']:.0f}s cpu")


def row_key(r: dict) -> str:
    return join_key(r["setting"], r["method"], r["calib_images"], r["iters"], r["seed"])


# ----------------------------------------------------------------------------- report

def render_markdown(results: dict) -> str:
    fp = results["fp_top1"]
    meta = results["meta"]
    lines = [
        "# CIFAR-10 ResNet-20, real-data calibration",
        "",
        f"{generated_by(__file__)} Model `{MODEL}`, FP top-1 "
        f"**{fp:.2f} %** on the {results['dev_images']} dev test images (JPEG q75, so about 10 points below the "
        f"lossless test set). Calibration: {meta['calib_images']} random real training images (seed "
        f"{meta['seed']}); batch 32; reconstruction iterations per unit (block or lone layer) as listed. "
        f"Weights per-channel asymmetric, activations per-tensor asymmetric, MSE observers. "
        f"torch threads: {meta['threads']} (OMP_WAIT_POLICY={meta.get('omp_wait_policy')}); machine: {meta['machine']}.",
        "",
        "Activation ranges are observed (MSE) on the first 256 calibration images for every method "
        "(`CalibConfig.observe_samples`); reconstruction methods then use all of them. `calib` times cover "
        "`quantize_model` (weight observers) plus `calibrate`; evaluation is not included.",
        "",
        "Timing caveat: the CPU was shared with other engineers' builds and tests while this ran "
        "(the 1-minute load average before/after each row is listed; 2 cores), so wall times are pessimistic. "
        "`calib cpu s` is this process's CPU time.",
        "",
        "W3A3: `QuantConfig(act_bits=3)`, fake-quant evaluation (no packed kernel runs A3).",
        "",
        *table_head("setting", "first/last", "method", "iters", "top-1 %", "drop (pts)", "target drop",
                    "calib wall s", "calib cpu s", "load before/after", "within target"),
    ]
    rows = sorted(results["rows"].values(),
                  key=lambda r: (r["calib_images"] != meta["calib_images"], list(SETTINGS).index(r["setting"])
                                 if r["setting"] in SETTINGS else 99, r["setting"], METHODS.index(r["method"]),
                                 r["iters"]))
    for r in rows:
        drop = fp - r["top1"]
        if r["calib_images"] == meta["calib_images"]:
            target = TARGET_DROP.get(r["setting"]) if r["first_last_bits"] == 8 else None
        else:
            target = FOUNDATION_TARGET_DROP.get(r["setting"])
        ok = "" if target is None else ("yes" if drop <= target and r["calib_wall_s"] <= TIME_LIMIT_S else
                                        "accuracy yes, time no" if drop <= target else "no")
        fl = "8-bit" if r["first_last_bits"] == 8 else "quantized"
        name = r["setting"] if r["calib_images"] == meta["calib_images"] else f"{r['setting']} ({r['calib_images']} img)"
        lines.append(f"| {name} | {fl} | {r['method']} | {r['iters']} | {r['top1']:.2f} | {drop:.2f} | "
                     f"{'' if target is None else f'<= {target}'} | {r['calib_wall_s']:.0f} | {r['calib_cpu_s']:.0f} | "
                     f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f} | {ok} |")
    return document(lines, meta)


def main(argv=None) -> int:
    p = parser(__doc__)
    add_choices(p, "--settings", SETTINGS)
    add_choices(p, "--methods", METHODS)
    p.add_argument("--iters", type=int, default=1000, help="reconstruction iterations per unit (block or lone layer)")
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-foundation", action="store_true", help="skip the observer-only 256-image rows")
    add_run_flags(p, "cifar10_real")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    fp_model, dev, train = open_cifar10(args.data_dir)
    calib = calibration_tensor(train, args.calib_images, seed=args.seed)

    table = Results(args.out, render_markdown, fresh=args.fresh, empty={"rows": {}})
    results = table.data
    results.update(model=MODEL, dev_images=len(dev))
    results["meta"] = run_meta(args.threads, calib_images=args.calib_images, seed=args.seed)
    if "fp_top1" not in results:
        results["fp_top1"] = top1(fp_model, dev, args.progress)
        print(f"FP top-1 {results['fp_top1']:.2f}", flush=True)

    plan = []
    if not args.no_foundation:
        foundation_calib = calib[:FOUNDATION_IMAGES]
        for s in FOUNDATION:
            wb, ab = int(s[1]), int(s[3])
            plan.append((foundation_calib, s, wb, ab, 8, "observer"))
    for s in args.settings:
        for m in args.methods:
            plan.append((calib, s, *SETTINGS[s], m))
    for data, setting, wb, ab, fl, method in plan:
        key = row_key({"setting": setting, "method": method, "calib_images": len(data),
                       "iters": 0 if method == "observer" else args.iters, "seed": args.seed})
        table.row(key, lambda: run_row(fp_model, dev, data, setting, wb, ab, fl, method,
                                       args.iters, args.seed, args.progress), row_summary(results["fp_top1"]))
    table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
