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

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# (torch's and the extension's) made each step up to 7x slower in our profile. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfqkern.calib import CalibConfig, calibrate  # noqa: E402
from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.data import build_transform, calibration_tensor, default_cifar10_dir, open_dataset  # noqa: E402
from dfqkern.evaluation import evaluate_top1  # noqa: E402
from dfqkern.models import create_model  # noqa: E402
from dfqkern.quantize import quantize_model  # noqa: E402
from dfqkern.model_info import model_info

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
    data_dir = Path(data_dir) if data_dir else default_cifar10_dir()
    fp_model = create_model(MODEL, checkpoint=data_dir / "resnet20-12fca82f.th")
    transform = build_transform(model_info(fp_model).input_spec)
    dev = open_dataset(data_dir / "cifar10_test_dev_jpeg.tar.gz", transform,
                       labels_csv=data_dir / "cifar10_test_dev_labels.csv")
    train = open_dataset(data_dir / "cifar10_train_jpeg.tar.gz", transform)
    return fp_model, dev, train


def choice_list(parser: argparse.ArgumentParser, value: str, allowed, flag: str) -> list[str]:
    """A comma list from the command line, each item one of ``allowed`` (else a usage error naming ``flag``)."""
    items = [v for v in value.split(",") if v]
    for v in items:
        if v not in allowed:
            parser.error(f"{flag}: {v!r} is not one of {list(allowed)}")
    return items


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_row(fp_model, dev, calib: torch.Tensor, setting: str, wbits: int, abits: int, first_last, method: str,
            iters: int, seed: int, progress: bool) -> dict:
    cfg = CalibConfig(method=method, iters=iters, seed=seed, progress=progress)
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()  # timed: weight observers, activation ranges, reconstruction
    qmodel = quantize_model(fp_model, quant_config(wbits, abits, first_last))
    calibrate(qmodel, fp_model, calib, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()[0]
    t = time.perf_counter()
    top1 = evaluate_top1(qmodel, dev, batch_size=500, progress=progress)["top1"]
    return {
        "setting": setting, "wbits": wbits, "abits": abits, "first_last_bits": first_last, "method": method,
        "calib_images": len(calib), "iters": 0 if method == "observer" else iters, "seed": seed,
        "top1": round(top1, 2), "calib_wall_s": round(wall, 1), "calib_cpu_s": round(cpu, 1),
        "eval_wall_s": round(time.perf_counter() - t, 1), "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "units": len(model_info(qmodel).calib_report.units),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def row_key(r: dict) -> str:
    return f"{r['setting']}|{r['method']}|{r['calib_images']}|{r['iters']}|{r['seed']}"


# ----------------------------------------------------------------------------- report

def render_markdown(results: dict) -> str:
    fp = results["fp_top1"]
    meta = results["meta"]
    lines = [
        "# CIFAR-10 ResNet-20, real-data calibration",
        "",
        f"Generated by `python bench/accuracy_cifar10.py` (do not edit by hand). Model `{MODEL}`, FP top-1 "
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
        "| setting | first/last | method | iters | top-1 % | drop (pts) | target drop | calib wall s | calib cpu s "
        "| load before/after | within target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
    lines += ["", f"Package commit at the last run: `{meta['commit']}`.", ""]
    return "\n".join(lines)


def save(results: dict, out: Path, render=None) -> None:
    """Write ``out``.json and the markdown table rendered from it, each atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text_md = (render or render_markdown)(results)
    for suffix, text in ((".json", json.dumps(results, indent=1, sort_keys=True)), (".md", text_md)):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out.with_suffix(suffix))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="CIFAR-10 data folder (default: $DFQKERN_CIFAR10_DIR or "
                                                    "../shared/data/cifar10)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--iters", type=int, default=1000, help="reconstruction iterations per unit (block or lone layer)")
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-foundation", action="store_true", help="skip the observer-only 256-image rows")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cifar10_real"))
    p.add_argument("--fresh", action="store_true", help="discard rows already in the JSON")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    settings = choice_list(p, args.settings, SETTINGS, "--settings")
    methods = choice_list(p, args.methods, METHODS, "--methods")
    torch.set_num_threads(args.threads)

    fp_model, dev, train = open_cifar10(args.data_dir)
    calib = calibration_tensor(train, args.calib_images, seed=args.seed)

    out = Path(args.out)
    results = None
    if out.with_suffix(".json").exists() and not args.fresh:
        results = json.loads(out.with_suffix(".json").read_text())
    if results is None:
        results = {"rows": {}}
    results.update(model=MODEL, dev_images=len(dev))
    results["meta"] = {"calib_images": args.calib_images, "seed": args.seed, "threads": args.threads,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                       "commit": git_commit(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if "fp_top1" not in results:
        results["fp_top1"] = round(evaluate_top1(fp_model, dev, batch_size=500, progress=args.progress)["top1"], 2)
        print(f"FP top-1 {results['fp_top1']:.2f}", flush=True)

    plan = []
    if not args.no_foundation:
        foundation_calib = calib[:FOUNDATION_IMAGES]
        for s in FOUNDATION:
            wb, ab = int(s[1]), int(s[3])
            plan.append((foundation_calib, s, wb, ab, 8, "observer"))
    for s in settings:
        for m in methods:
            plan.append((calib, s, *SETTINGS[s], m))
    for data, setting, wb, ab, fl, method in plan:
        key = row_key({"setting": setting, "method": method, "calib_images": len(data),
                       "iters": 0 if method == "observer" else args.iters, "seed": args.seed})
        if key in results["rows"]:
            print(f"skip {key} (already measured)", flush=True)
            continue
        print(f"run {key}", flush=True)
        row = run_row(fp_model, dev, data, setting, wb, ab, fl, method, args.iters, args.seed, args.progress)
        results["rows"][key] = row
        save(results, out)
        print(f"  top-1 {row['top1']:.2f} (drop {results['fp_top1'] - row['top1']:.2f}) calib {row['calib_wall_s']:.0f}s "
              f"wall / {row['calib_cpu_s']:.0f}s cpu", flush=True)
    save(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
