"""Data-free QAT benchmark: CIFAR-10 ResNet-20 fine-tuned on generated images only (dfqkern.qat).

One command reproduces the committed table::

    python bench/qat_cifar10.py            # every row; rows already in the JSON are kept (resume)
    python bench/qat_cifar10.py --fresh    # recompute everything

Settings: W4A4 and W3A3, each with first/last layer at 8 bits (as in the PTQ tables) and with every
layer quantized (as the QAT papers report). For each setting, every QAT method (``dfqkern.qat.METHODS``)
starts from the observer-initialized model (MSE ranges observed on a BN-inverted dgh mixup set, the
data of the data-free PTQ table) and is fine-tuned for ``--epochs`` x ``--iters`` iterations of
``--batch-size`` generated images; seeds ``--seeds`` for every method and ``--multi-seeds`` for the
methods in ``--multi-seed-methods`` (the best two, picked after a first pass). Beside them the PTQ rows:
observer (the QAT start) and QDrop on the same dgh mixup set. ``--double-budget-method`` also runs one
method at twice the epochs at W3A3 (first/last 8-bit), so the note shows whether the budget limits it.
Top-1 on the 5,000 dev test images; no real training image is touched. Each finished row is written
to ``bench/results/cifar10_qat.json`` at once and the markdown table is regenerated from the JSON
(never typed), with every row's per-epoch losses. A3: fake-quant evaluation (no packed kernel runs A3).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, Timer, add_choices, add_run_flags, cifar10_dir, comma_list, dev_set,  # noqa: E402
                    document, field_set_label, generated_by, join_key, now, parse_field_set, parser, run_meta,
                    table_head, top1)
from accuracy_cifar10 import MODEL  # noqa: E402

import torch  # noqa: E402

from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.qat import METHODS as QAT_METHODS, QATConfig, finetune  # noqa: E402
from dfqkern.model_info import model_info  # noqa: E402

# name -> (weight bits, activation bits, first/last bits)
SETTINGS = {"w4a4": (4, 4, 8), "w3a3": (3, 3, 8), "w4a4-all": (4, 4, None), "w3a3-all": (3, 3, None)}
PTQ_METHODS = ("observer", "qdrop")
TARGET_DROP = {"w3a3": 1.0, "w4a4-all": 1.0}  # the goals for the best data-free row
CALIB_ITERS = 1000  # QDrop iterations per unit: the PTQ rows and the start of QAT rows from qdrop
TIME_LIMIT_S = 30 * 60  # per row, 2 cores
DOUBLE_SETTING = "w3a3"


STARTS = ("observer", "qdrop")  # what a QAT row fine-tunes: the observer-initialized or the QDrop-calibrated model


def row_key(setting: str, method: str, seed: int, epochs: int, iters: int, start: str = "observer",
            replay: float = 0.0, qat_set: "dict | None" = None) -> str:
    # observer-start keys without replay or --qat-set keep their original form, so older rows still match
    return join_key(setting, method, seed, f"{epochs}x{iters}", *(() if start == "observer" else (f"from-{start}",)),
                    *((f"replay{replay:g}",) if replay else ()), *((field_set_label(qat_set),) if qat_set else ()))


# QATConfig fields this script sets with its own flags (--qat-set refuses them)
QAT_OWN_FLAGS = ("method", "epochs", "iters", "batch_size", "warmup_epochs", "generator_width", "seed", "replay_weight",
                 "progress")


def open_dev(data_dir: "str | None", limit: "int | None" = None):
    """(pretrained ResNet-20, dev test set): only the dev images are opened, never the training set. ``limit``:
    a seeded random subset (the dev csv is sorted by class, so its first N images are one class)."""
    from dfqkern.data import random_subset
    from dfqkern.models import create_model

    d = cifar10_dir(data_dir)
    fp = create_model(MODEL, checkpoint=d / "resnet20-12fca82f.th")
    dev = dev_set(d, model_info(fp).input_spec)
    return fp, (random_subset(dev, limit, seed=0) if limit else dev)


def start_images(fp, work_dir: Path, images: int, gen_iters: int, seed: int,
                 progress: bool) -> tuple[torch.Tensor, dict]:
    """The dgh mixup set of the data-free PTQ table (generated once, cached in ``work_dir``)."""
    from datafree_cifar10 import generate

    from dfqkern.data import calibration_tensor
    from dfqkern.datagen import load_synthetic
    from dfqkern.datagen.bn_inversion import DEFAULT_CE_WEIGHT
    from dfqkern.pipeline import tensor_transform

    set_dir, timing = generate(fp, work_dir, "dgh", "mixup", seed, images, gen_iters, progress,
                               ce_weight=DEFAULT_CE_WEIGHT["mixup"])
    ds = load_synthetic(set_dir, transform=tensor_transform(model_info(fp).input_spec))
    return calibration_tensor(ds, len(ds), seed=seed), {"path": str(set_dir), **timing}


def observer_start(fp, setting: str, calib: torch.Tensor):
    from dfqkern.quantize import calibrate_activations, quantize_model

    wbits, abits, first_last = SETTINGS[setting]
    q = quantize_model(fp, QuantConfig(weight_bits=wbits, act_bits=abits, first_last_bits=first_last))
    calibrate_activations(q, calib, progress=False)
    return q


def run_ptq_row(fp, dev, calib, setting, method, seed, args) -> dict:
    from dfqkern.calib import CalibConfig, calibrate

    with Timer() as t:
        q = observer_start(fp, setting, calib)
        if method == "qdrop":
            calibrate(q, fp, calib, CalibConfig(method="qdrop", iters=args.calib_iters, seed=seed,
                                                progress=args.progress))
    return {"kind": "ptq", "iters": 0 if method == "observer" else args.calib_iters, "wall_s": round(t.wall, 1),
            "top1": top1(q, dev, args.progress)}


def run_qat_row(fp, dev, calib, setting, method, seed, epochs, start_top1, args, start="observer") -> dict:
    from dfqkern.calib import CalibConfig, calibrate

    cfg = QATConfig(method=method, epochs=epochs, iters=args.iters, batch_size=args.batch_size,
                    warmup_epochs=args.warmup_epochs, generator_width=args.generator_width, seed=seed,
                    replay_weight=args.replay_weight, progress=args.progress, **args.qat_set)
    with Timer() as t:
        q = observer_start(fp, setting, calib)
        if start == "qdrop":  # the same calibration as the QDrop PTQ row of this setting and seed
            calibrate(q, fp, calib, CalibConfig(method="qdrop", iters=args.calib_iters, seed=seed,
                                                progress=args.progress))
        finetune(q, fp, cfg, replay=calib if args.replay_weight else None)
    acc = top1(q, dev, args.progress)
    return {"kind": "qat", "start": start, "replay_weight": args.replay_weight, "qat_set": args.qat_set,
            **({"start_iters": args.calib_iters} if start == "qdrop" else {}),
            "epochs": epochs, "iters": args.iters, "batch_size": args.batch_size,
            "warmup_epochs": args.warmup_epochs, "top1": acc, "start_top1": start_top1,
            "gain": round(acc - start_top1, 2), "wall_s": round(t.wall, 1), "cpu_s": round(t.cpu, 1),
            "load_avg_1min": t.load,
            "history": q.dfqkern_qat_report["history"], "config": cfg.to_dict()}


# ----------------------------------------------------------------------------- report

def _loss_trend(r: dict) -> str:
    """Student loss (and KL) of the first and the last epoch that trained the student."""
    hist = [h for h in r.get("history", []) if "s_loss" in h]
    if not hist:
        return ""
    a, b = hist[0], hist[-1]
    return f"{a['s_loss']:.3g} -> {b['s_loss']:.3g}" + (f" (kl {a['kl']:.3g} -> {b['kl']:.3g})" if "kl" in a else "")


def _verdict(r: dict, fp: float) -> str:
    checks = []
    if r["kind"] == "qat" and r["setting"].startswith("w3a3"):
        checks.append(r["top1"] > r["start_top1"])  # every method must beat its own start at W3A3
    if r["setting"] in TARGET_DROP:
        checks.append(fp - r["top1"] <= TARGET_DROP[r["setting"]])
    if not checks:
        return ""
    ok, in_time = all(checks), r["wall_s"] <= TIME_LIMIT_S
    return "yes" if ok and in_time else "accuracy yes, time no" if ok else "no"


def render_markdown(results: dict) -> str:
    fp, meta = results["fp_top1"], results["meta"]
    lines = [
        "# CIFAR-10 ResNet-20, data-free quantization-aware training",
        "",
        f"{generated_by(__file__)} Model `{MODEL}`, FP top-1 **{fp:.2f} %** "
        f"on {results['dev_images']} dev test images. No real image is used: the QAT start (observer) and the QDrop "
        f"row calibrate on {meta['start_images']} dgh mixup images inverted from the model's BatchNorm statistics "
        f"({meta['gen_iters']} iterations); QAT then trains a generator and the quantized model on generated images "
        f"only (`dfqkern.qat.finetune`). Budget: {meta['epochs']} epochs x {meta['iters']} iterations x batch "
        f"{meta['batch_size']} ({meta['warmup_epochs']} generator-only warm-up epochs, generator width "
        f"{meta.get('generator_width', 128)}); QDrop: iterations per unit as each row's budget says (rows *from "
        f"qdrop* start from the {CALIB_ITERS} it/unit QDrop row unless their `start_iters` in the JSON says "
        f"otherwise). `-all`: every layer quantized, else first/last 8-bit. A3 is "
        f"evaluated in fake-quant (no packed kernel runs A3). torch threads: {meta['threads']}; machine: "
        f"{meta['machine']}.",
        "",
        "`gain`: top-1 minus the start's (the observer-initialized model, or for rows marked *from qdrop* the "
        "QDrop-calibrated model of the same setting and seed: QAT from a PTQ result). *replay W*: each student step "
        "also distils on a batch of the start's dgh calibration images, weight W (`QATConfig.replay_weight`). `within target`: W3A3 QAT rows must beat their start; W3A3 "
        "(first/last 8-bit) and W4A4-all must be within 1.0 point of FP; every row within 30 minutes wall.",
        "",
        *table_head("setting", "method", "seed", "budget", "top-1 %", "drop (pts)", "start top-1", "gain", "wall s",
                    "student loss first -> last epoch", "within target"),
    ]
    order = list(PTQ_METHODS) + list(QAT_METHODS)
    def order_key(r):
        return (list(SETTINGS).index(r["setting"]), STARTS.index(r.get("start", "observer")),
                r.get("replay_weight", 0), field_set_label(r.get("qat_set") or {}), order.index(r["method"]),
                r.get("epochs", 0), r.get("iters", 0), r["seed"])

    seeds: dict = {}  # (setting, method label, budget) -> [(top-1, gain)]
    for r in sorted(results["rows"].values(), key=order_key):
        if r["kind"] == "qat":
            budget = f"{r['epochs']}x{r['iters']}"
            start, gain = f"{r['start_top1']:.2f}", f"{r['gain']:+.2f}"
        else:
            budget = f"{r['iters']} it/unit" if r["iters"] else "-"
            start = gain = ""
        notes = ([f"from {r['start']}"] if r.get("start", "observer") != "observer" else []) + \
            ([f"replay {r['replay_weight']:g}"] if r.get("replay_weight") else []) + \
            ([field_set_label(r["qat_set"])] if r.get("qat_set") else [])
        method = r["method"] + (f" ({', '.join(notes)})" if notes else "")
        seeds.setdefault((r["setting"], method, budget), []).append((r["top1"], r.get("gain")))
        lines.append(f"| {r['setting']} | {method} | {r['seed']} | {budget} | {r['top1']:.2f} | "
                     f"{fp - r['top1']:.2f} | {start} | {gain} | {r['wall_s']:.0f} | {_loss_trend(r)} | "
                     f"{_verdict(r, fp)} |")
    multi = {k: v for k, v in seeds.items() if len(v) > 1 and k[1] != "observer"}  # the observer has no seed
    if multi:
        lines += ["", "Rows run with several seeds (QAT seeds change the generator, the draws and the student's "
                  "updates; the start is the same): mean ± sample standard deviation.", "",
                  *table_head("setting", "method", "budget", "seeds", "top-1 %", "drop (pts)", "gain")]
        for (setting, method, budget), v in multi.items():
            top = [t for t, _ in v]
            gains = [g for _, g in v if g is not None]
            sd = statistics.stdev(top)
            gain = f"{statistics.fmean(gains):+.2f}" if len(gains) == len(v) else ""
            lines.append(f"| {setting} | {method} | {budget} | {len(v)} | {statistics.fmean(top):.2f} ± {sd:.2f} | "
                         f"{fp - statistics.fmean(top):.2f} | {gain} |")
    return document(lines, meta)


def main(argv=None) -> int:
    p = parser(__doc__, "model checkpoint + dev test images")
    add_choices(p, "--settings", SETTINGS)
    add_choices(p, "--methods", PTQ_METHODS + QAT_METHODS)
    p.add_argument("--seeds", default="0", type=comma_list(item=int), help="seeds of every method")
    add_choices(p, "--multi-seed-methods", QAT_METHODS, default="",
                help="methods also run with --multi-seeds (the best two)")
    p.add_argument("--multi-seeds", default="0,1,2", type=comma_list(item=int))
    add_choices(p, "--double-budget-method", QAT_METHODS, default="",
                help=f"also run this QAT method at 2x epochs on {DOUBLE_SETTING}")
    add_choices(p, "--starts", STARTS, default="observer",
                help="what the QAT rows fine-tune: the observer start and/or the QDrop-calibrated model (its PTQ row "
                     "is run first and is the row's start top-1)")
    p.add_argument("--replay-weight", type=float, default=0.0,
                   help="QAT rows also distil on the start's dgh calibration images at this weight "
                        "(QATConfig.replay_weight; own row key and label)")
    p.add_argument("--qat-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another QATConfig field for the QAT rows, e.g. weight_scale_lr=0 (repeatable; own row key "
                        "and label)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=200, help="QAT iterations per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--generator-width", type=int, default=64,
                   help="generator channels (GDFQ: 128; at 128 the generator costs about 3x the ResNet-20 teacher "
                        "per step, so the reduced CPU budget halves it)")
    p.add_argument("--start-images", type=int, default=512, help="dgh mixup images of the observer start and QDrop")
    p.add_argument("--gen-iters", type=int, default=200, help="BN-inversion iterations of that set")
    p.add_argument("--calib-iters", type=int, default=CALIB_ITERS, help="QDrop iterations per unit")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on N random dev images (smoke runs)")
    add_run_flags(p, "cifar10_qat", work_dir=("the dgh set is kept, shared with datafree_cifar10", "bench-datafree"))
    args = p.parse_args(argv)
    try:  # a bad budget or field fails before any work
        args.qat_set = parse_field_set(args.qat_set, QATConfig, "--qat-set", QAT_OWN_FLAGS)
        QATConfig(epochs=args.epochs, iters=args.iters, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                  generator_width=args.generator_width, replay_weight=args.replay_weight, **args.qat_set)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)

    fp, dev = open_dev(args.data_dir, args.eval_limit)
    table = Results(args.out, render_markdown, fresh=args.fresh, empty={"rows": {}})
    results = table.data
    results.update(model=MODEL, dev_images=len(dev))
    results["meta"] = run_meta(args.threads, epochs=args.epochs, iters=args.iters, batch_size=args.batch_size,
                               generator_width=args.generator_width, warmup_epochs=args.warmup_epochs,
                               start_images=args.start_images, gen_iters=args.gen_iters, calib_iters=args.calib_iters)
    if "fp_top1" not in results:
        results["fp_top1"] = top1(fp, dev, args.progress)

    jobs = []  # (setting, method, seed, epochs, start)
    for setting in args.settings:
        for method in args.methods:
            qat = method in QAT_METHODS
            for seed in sorted(set(args.seeds) | (set(args.multi_seeds) if method in args.multi_seed_methods else set())):
                for start in (args.starts if qat else ("observer",)):
                    jobs.append((setting, method, seed, args.epochs if qat else 0, start))
    for method in args.double_budget_method:
        for start in args.starts:
            jobs.append((DOUBLE_SETTING, method, args.seeds[0], 2 * args.epochs, start))
    calib = None
    for setting, method, seed, epochs, start in jobs:
        key = row_key(setting, method, seed, epochs,
                      args.iters if epochs else args.calib_iters if method == "qdrop" else 0, start,
                      *((args.replay_weight, args.qat_set) if method in QAT_METHODS else ()))
        if key in table.rows:
            print(f"skip {key}", flush=True)
            continue
        if calib is None:
            calib, results["start_set"] = start_images(fp, args.work_dir, args.start_images, args.gen_iters, 0,
                                                       args.progress)

        def ptq(method):
            row = run_ptq_row(fp, dev, calib, setting, method, seed, args)
            return {**row, "setting": setting, "method": method, "seed": seed, "finished": now()}

        def qat_row():  # after the PTQ row it starts from (same setting and seed: its top-1 is the row's start)
            start_key = row_key(setting, start, seed, 0, args.calib_iters if start == "qdrop" else 0)
            first = table.rows.get(start_key) or table.row(start_key, lambda: ptq(start))
            row = run_qat_row(fp, dev, calib, setting, method, seed, epochs, first["top1"], args, start)
            return {**row, "setting": setting, "method": method, "seed": seed, "finished": now()}

        table.row(key, qat_row if method in QAT_METHODS else lambda: ptq(method),
                  lambda r: f"top-1 {r['top1']:.2f} (drop {results['fp_top1'] - r['top1']:.2f}) in {r['wall_s']:.0f}s")
    table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
