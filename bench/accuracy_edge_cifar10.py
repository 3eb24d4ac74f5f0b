"""Edge-network accuracy benchmark: reconstruction methods against their observer start on depthwise nets.

One command reproduces the committed table::

    python bench/accuracy_edge_cifar10.py          # every row; rows already in the JSON are kept (resume)
    python bench/accuracy_edge_cifar10.py --nets shufflenetv2 --data real --fresh
    # the "Other budgets" rows: library-default inversion (500 iterations), longer reconstruction
    python bench/accuracy_edge_cifar10.py --nets convmixer --data dgh-mixup --settings w4a4 \
        --methods observer,qdrop --gen-iters 500 --iters 2000   # (and --iters 500 for the 500 row)

Networks (CIFAR-10): ShuffleNetV2-x0.5 and MobileNetV2-x0.35 trained by ``bench/train_edge_cifar10.py``
(weights in ``bench/weights/``), and the shared pretrained ConvMixer-256/8. Settings W4A8 and W4A4
(first and last layer 8-bit), methods observer / adaround / brecq / qdrop, calibrated on
``--calib-images`` real training images or on as many images inverted from the model's BatchNorm
statistics with dfqkern's data-free defaults (dgh, mixup labels). Same seed, images and options for
every method of a (net, data, setting): only the method differs. Top-1 on the 5,000 dev test
images. Each finished row is written to ``bench/results/cifar10_edge.json`` at once and the
markdown table is regenerated from the JSON, so a killed run resumes at the next row.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, Timer, add_choices, add_run_flags, cifar10_dir, dev_set, document,  # noqa: E402
                    generated_by, join_key, now, open_net, parser, run_meta, table_head, top1, train_set)

import torch  # noqa: E402

from dfqkern.calib import CalibConfig, calibrate  # noqa: E402
from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.data import build_transform, calibration_tensor  # noqa: E402
from dfqkern.datagen import generate_bn_inversion_set, load_synthetic  # noqa: E402
from dfqkern.pipeline import tensor_transform  # noqa: E402
from dfqkern.quantize import quantize_model  # noqa: E402
from dfqkern.model_info import model_info  # noqa: E402

NETS = ("shufflenetv2", "mobilenetv2", "convmixer")  # the table's nets, in its order (weights: common.NETS)
SETTINGS = {"w4a8": (4, 8), "w4a4": (4, 4)}
METHODS = ("observer", "adaround", "brecq", "qdrop")
DATA = ("real", "dgh-mixup")
QDROP_W4A4_MAX_DROP = {"real": 3.0, "dgh-mixup": 4.0}  # the targets (points below FP)
# The main table's budget (and the flags' defaults); rows run with other budgets (e.g. the library's
# default 500 inversion iterations, longer reconstruction) are listed in a second table.
BUDGET = {"calib_images": 512, "seed": 0, "iters": 500, "gen_iters": 200}


def calibration_images(kind: str, fp_model, train, n: int, seed: int, work_dir: Path, gen_iters: int,
                       progress: bool) -> torch.Tensor:
    if kind == "real":
        return calibration_tensor(train, n, seed=seed)
    spec = model_info(fp_model).input_spec
    out = work_dir / f"{model_info(fp_model).arch}-dgh-mixup-n{n}-it{gen_iters}-s{seed}"
    generate_bn_inversion_set(out, fp_model, num_images=n, input_shape=spec.input_size, mean=spec.mean,
                              std=spec.std, method="dgh", label_mode="mixup", iters=gen_iters, seed=seed,
                              shard_size=n, model_id=model_info(fp_model).arch, progress=progress)
    synthetic = load_synthetic(out, transform=tensor_transform(spec))
    return calibration_tensor(synthetic, len(synthetic), seed=seed)


def run_row(fp_model, dev, calib, wbits, abits, method, iters, seed, progress) -> dict:
    with Timer() as t:
        qmodel = quantize_model(fp_model, QuantConfig(weight_bits=wbits, act_bits=abits, first_last_bits=8))
        calibrate(qmodel, fp_model, calib, CalibConfig(method=method, iters=iters, seed=seed, progress=progress))
    report = model_info(qmodel).calib_report
    return {"method": method, "iters": 0 if method == "observer" else iters, "top1": top1(qmodel, dev, progress),
            "calib_wall_s": round(t.wall, 1), "calib_cpu_s": round(t.cpu, 1), "units": len(report.units),
            "block_units": sum(u.kind == "block" for u in report.units),
            "units_kept_start": len(report.units_kept_start), "reverted_to_observer": report.reverted_to_observer,
            "heldout_loss": [report.model_loss_observer, report.model_loss_final], "finished": now()}


def row_key(net, data, setting, method, images, iters, seed, gen_iters) -> str:
    """The row's JSON key; ``gen_iters`` counts only for synthetic data (``gen-`` for real images)."""
    return join_key(net, data, setting, method, images, 0 if method == "observer" else iters, seed,
                    "gen-" if data == "real" else f"gen{gen_iters}")


def upgrade_keys(results: dict) -> dict:
    """Rows of runs before the key named the inversion budget: they all used 200 iterations."""
    rows = {}
    for key, r in results.get("rows", {}).items():
        if key.count("|") == 6:
            key = join_key(key, "gen-" if r["data"] == "real" else "gen200")
            r.setdefault("gen_iters", None if r["data"] == "real" else 200)
        rows[key] = r
    results["rows"] = rows
    return results


def _budget_key(net, data, setting, method, budget=BUDGET) -> str:
    return row_key(net, data, setting, method, budget["calib_images"], budget["iters"], budget["seed"],
                   budget["gen_iters"])


# ----------------------------------------------------------------------------- report

def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# CIFAR-10 edge networks: reconstruction vs its observer start",
        "",
        f"{generated_by(__file__)} Top-1 on the "
        f"{results['dev_images']} dev test images (JPEG q75). Calibration: {BUDGET['calib_images']} images, seed "
        f"{BUDGET['seed']}: `real` = random real training images, `dgh-mixup` = images inverted from the model's "
        f"BatchNorm statistics with dfqkern's data-free defaults (dgh, mixup labels) but {BUDGET['gen_iters']} "
        f"iterations (the library default is 500; no real image). Weights per-channel, activations per-tensor, "
        f"MSE observers, first/last layer 8-bit; reconstruction {BUDGET['iters']} iterations per unit, batch 32. Within a (net, data, "
        f"setting) row every method starts from the same observer model with the same seed and images. "
        f"torch threads 2 for the main table (the last run, of the rows below: {meta['threads']}); machine: "
        f"{meta['machine']}.",
        "",
        "`>= obs`: every method at or above the observer. Cell: top-1 % (units whose learning the guard "
        "undid, `R` = whole model returned to the observer start). Targets: QDrop W4A4 within "
        f"{QDROP_W4A4_MAX_DROP['real']:g} points of FP on real data, {QDROP_W4A4_MAX_DROP['dgh-mixup']:g} data-free.",
        "",
        *table_head("net", "FP %", "data", "setting", *METHODS, ">= obs", "QDrop drop", "target"),
    ]
    for net in NETS:
        fp = results["fp_top1"].get(net)
        if fp is None:
            continue
        for data in DATA:
            for setting in SETTINGS:
                cells, tops = [], {}
                for m in METHODS:
                    r = results["rows"].get(_budget_key(net, data, setting, m))
                    if r is None:
                        cells.append("")
                        continue
                    tops[m] = r["top1"]
                    note = "R" if r["reverted_to_observer"] else (str(r["units_kept_start"]) if r["units_kept_start"]
                                                                  else "")
                    cells.append(f"{r['top1']:.2f}" + (f" ({note})" if note else ""))
                if not tops:
                    continue
                ok = "" if "observer" not in tops or len(tops) < 2 else (
                    "yes" if all(v >= tops["observer"] for v in tops.values()) else "no")
                drop = f"{fp - tops['qdrop']:.2f}" if "qdrop" in tops else ""
                target = ""
                if setting == "w4a4" and "qdrop" in tops:
                    target = "met" if fp - tops["qdrop"] <= QDROP_W4A4_MAX_DROP[data] else "missed"
                lines.append(f"| {net} | {fp:.2f} | {data} | {setting} | " + " | ".join(cells)
                             + f" | {ok} | {drop} | {target} |")
    lines += _other_budgets(results)
    return document(lines, meta)


def _other_budgets(results: dict) -> list[str]:
    """Rows run with another budget than :data:`BUDGET`, each beside the observer of the same data."""
    main = {_budget_key(r["net"], r["data"], r["setting"], r["method"]) for r in results["rows"].values()}
    others = sorted(((k, r) for k, r in results["rows"].items() if k not in main),
                    key=lambda kr: (list(NETS).index(kr[1]["net"]), kr[1]["data"], kr[1]["setting"],
                                    kr[1].get("gen_iters") or 0, METHODS.index(kr[1]["method"]), kr[1]["iters"]))
    if not others:
        return []
    lines = ["", "## Other budgets", "",
             "Rows run with another generation or reconstruction budget than the table above (same images for "
             "every method of one data set: `gen iters` = BatchNorm-inversion iterations of the synthetic set, "
             "500 is the library default). `vs observer`: points over the observer on the same set.", "",
             *table_head("net", "FP %", "data", "setting", "images", "gen iters", "method", "recon iters", "top-1 %",
                         "vs observer", "QDrop drop", "target")]
    for key, r in others:
        fp = results["fp_top1"][r["net"]]
        gen = r.get("gen_iters")
        obs = results["rows"].get(row_key(r["net"], r["data"], r["setting"], "observer", r["calib_images"], 0,
                                          r["seed"], gen))
        vs = f"{r['top1'] - obs['top1']:+.2f}" if obs is not None and r["method"] != "observer" else ""
        drop = target = ""
        if r["method"] == "qdrop":
            drop = f"{fp - r['top1']:.2f}"
            if r["setting"] == "w4a4":
                target = "met" if fp - r["top1"] <= QDROP_W4A4_MAX_DROP[r["data"]] else "missed"
        lines.append(f"| {r['net']} | {fp:.2f} | {r['data']} | {r['setting']} | {r['calib_images']} | "
                     f"{gen if gen is not None else '-'} | {r['method']} | {r['iters']} | {r['top1']:.2f} | {vs} | "
                     f"{drop} | {target} |")
    return lines


def main(argv=None) -> int:
    p = parser(__doc__, "ConvMixer's pretrained weights: dfqkern.assets")
    for flag, allowed in (("--nets", NETS), ("--data", DATA), ("--settings", SETTINGS), ("--methods", METHODS)):
        add_choices(p, flag, allowed)
    p.add_argument("--iters", type=int, default=BUDGET["iters"], help="reconstruction iterations per unit")
    p.add_argument("--calib-images", type=int, default=BUDGET["calib_images"])
    p.add_argument("--gen-iters", type=int, default=BUDGET["gen_iters"],
                   help="BN-inversion iterations (dgh-mixup data)")
    p.add_argument("--seed", type=int, default=BUDGET["seed"])
    add_run_flags(p, "cifar10_edge", work_dir=("synthetic sets are kept", "bench-edge"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = cifar10_dir(args.data_dir)

    table = Results(args.out, render_markdown, fresh=args.fresh, empty={"rows": {}, "fp_top1": {}},
                    upgrade=upgrade_keys)
    results = table.data
    results["meta"] = run_meta(args.threads, calib_images=args.calib_images, seed=args.seed, iters=args.iters,
                               gen_iters=args.gen_iters)
    train = None
    for net in args.nets:
        fp_model = open_net(net)
        spec = model_info(fp_model).input_spec
        dev = dev_set(data_dir, spec)
        results["dev_images"] = len(dev)
        if net not in results["fp_top1"]:
            results["fp_top1"][net] = top1(fp_model, dev)
            table.save()
        print(f"{net}: FP top-1 {results['fp_top1'][net]:.2f}", flush=True)
        for data in args.data:
            calib = None

            def images():  # made once per (net, data), on the first row still to run
                nonlocal calib, train
                if calib is None:
                    if data == "real" and train is None:
                        train = train_set(data_dir)
                    if data == "real":
                        train.transform = build_transform(spec)  # per net: ConvMixer normalizes differently
                    calib = calibration_images(data, fp_model, train, args.calib_images, args.seed, args.work_dir,
                                               args.gen_iters, args.progress)
                return calib

            for setting in args.settings:
                for method in args.methods:
                    def compute():
                        row = run_row(fp_model, dev, images(), *SETTINGS[setting], method, args.iters,
                                      args.seed, args.progress)
                        row.update(net=net, data=data, setting=setting, calib_images=args.calib_images,
                                   seed=args.seed, gen_iters=None if data == "real" else args.gen_iters)
                        return row

                    table.row(row_key(net, data, setting, method, args.calib_images, args.iters, args.seed,
                                      args.gen_iters), compute,
                              lambda r: f"top-1 {r['top1']:.2f} (FP {results['fp_top1'][net]:.2f}) calib "
                                        f"{r['calib_wall_s']:.0f}s, kept start {r['units_kept_start']}, "
                                        f"reverted {r['reverted_to_observer']}")
    table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
