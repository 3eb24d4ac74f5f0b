"""Pre-quantization steps benchmark: cross-layer equalization (CLE) and bias correction, each on / off.

One command reproduces the committed table::

    python bench/prequant_steps_cifar10.py           # every row; rows already in the JSON are kept (resume)
    python bench/prequant_steps_cifar10.py --nets mobilenetv2 --weights per_tensor

Networks (CIFAR-10): MobileNetV2-x0.35 (``bench/weights/``) and the shared pretrained ConvMixer-256/8
(GELU everywhere: CLE finds no safe pair there, which the table shows). Settings W4A8 and W4A4
(first and last layer 8-bit), MSE observers, observer calibration only (no reconstruction) on
``--calib-images`` random real training images; top-1 on the 5,000 dev test images. Weights
per-output-channel (the library's quantizer) or per-tensor: QuantConfig has no per-tensor weight
option, so this script sets every channel of a layer to one MSE-searched scale / zero point after
``quantize_model`` (:func:`per_tensor_weights`), before activations are observed. CLE: the library's
``equalize_model`` with high-bias absorption, ReLU6 pairs under the ``bounded`` policy with the
calibration images raising the bound; bias correction ``none`` / ``analytic`` / ``empirical`` on the
same calibration images. Each finished row is written to ``bench/results/prequant_steps.json`` at once
and the markdown table regenerated from the JSON, so a killed run resumes at the next row.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, add_choices, add_run_flags, cifar10_dir, dev_set, document,  # noqa: E402
                    generated_by, join_key, now, open_net, parser, run_meta, table_head, train_set)

import torch  # noqa: E402

from dfqkern.calib.bias_correction import BIAS_CORRECTION_MODES, correct_bias  # noqa: E402
from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.data import build_transform, calibration_tensor  # noqa: E402
from dfqkern.equalize import EqualizeConfig, equalize_model  # noqa: E402
from dfqkern.nn.observers import mse_qparams  # noqa: E402
from dfqkern.quantize import calibrate_activations, quant_layers, quantize_model  # noqa: E402
from dfqkern.model_info import model_info  # noqa: E402

NETS = ("mobilenetv2", "convmixer")  # the table's nets, in its order (weights: common.NETS)
SETTINGS = {"w4a8": (4, 8), "w4a4": (4, 4)}
WEIGHTS = ("per_channel", "per_tensor")
CLE = ("off", "on", "paper")  # on: the library default (chain guard at the weight bits); paper: unguarded


@torch.no_grad()
def per_tensor_weights(qmodel) -> None:
    """One scale / zero point per layer (MSE search over the whole tensor), stored in every channel."""
    for _, layer in quant_layers(qmodel):
        wq, cfg = layer.w_quant, layer.cfg
        scale, zp = mse_qparams(layer.weight, wq.bits, wq.symmetric, None, spec=cfg.observer_spec)
        wq.scale.copy_(scale.expand_as(wq.scale))
        wq.zero_point.copy_(zp.to(wq.zero_point).expand_as(wq.zero_point))


@torch.no_grad()
def top1(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum()) for i in range(0, len(images), 500))
    return 100.0 * hits / len(images)


def dev_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dev set decoded once (every row evaluates the same 5,000 images)."""
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=500, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def run_row(src, equalized: bool, calib, dev, wbits, abits, weights, bc) -> dict:
    wall = time.perf_counter()
    q = quantize_model(src, QuantConfig(weight_bits=wbits, act_bits=abits, first_last_bits=8))
    if weights == "per_tensor":
        per_tensor_weights(q)
    calibrate_activations(q, calib, batch_size=64, progress=False)
    report = correct_bias(q, bc, float_model=src, data=calib, batch_size=64)
    wall = time.perf_counter() - wall
    return {"top1": round(top1(q, *dev), 2), "calib_wall_s": round(wall, 1), "bc_corrected": len(report.corrected),
            "bc_skipped": len(report.skipped), "load_avg_1min": round(os.getloadavg()[0], 2), "finished": now()}


def row_key(net, setting, weights, cle, bc, images, seed) -> str:
    return join_key(net, setting, weights, f"cle-{cle}", f"bc-{bc}", images, seed)


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# CIFAR-10: cross-layer equalization and bias correction before observer calibration",
        "",
        f"{generated_by(__file__)} Top-1 % on the "
        f"{results.get('dev_images', '?')} dev test images. Observer calibration (MSE) on {meta['calib_images']} real "
        f"training images (seed {meta['seed']}), no reconstruction; first/last layer 8-bit. `per_tensor` weights: "
        "one MSE scale per layer set by the script (QuantConfig has per-channel weights only). CLE `on` = "
        "`equalize_model` with high-bias absorption (ReLU6 pairs `bounded`, bound raised by the calibration "
        "images) and its chain guard at the weights' bits (a chain of coupled pairs is kept only if it lowers "
        "the per-tensor weight noise); `paper` = the same without the guard (Nagel et al.). Pairs equalized: "
        "kept by the guard / found. BC = bias correction. "
        f"torch threads {meta['threads']}; machine: {meta['machine']}.",
        "",
        *table_head("net", "FP %", "FP after CLE %", "pairs equalized", "setting", "weights", "CLE",
                    *(f"BC {bc}" for bc in BIAS_CORRECTION_MODES)),
    ]
    for net in NETS:
        info = results["nets"].get(net)
        if info is None:
            continue
        for setting in SETTINGS:
            for weights in WEIGHTS:
                for cle in CLE:
                    cells = []
                    for bc in BIAS_CORRECTION_MODES:
                        r = results["rows"].get(row_key(net, setting, weights, cle, bc, meta["calib_images"],
                                                        meta["seed"]))
                        cells.append("" if r is None else f"{r['top1']:.2f}" + (" (=off)" if r.get("same_as_off")
                                                                                 else ""))
                    if not any(cells):
                        continue
                    pairs = info["pairs_equalized"]
                    if "pairs_found" in info:
                        pairs = f"{pairs} / {info['pairs_found']}"
                    lines.append(f"| {net} | {info['fp_top1']:.2f} | {info['fp_cle_top1']:.2f} | "
                                 f"{pairs} | {setting} | {weights} | {cle} | " + " | ".join(cells)
                                 + " |")
    lines += ["", "`(=off)`: CLE changed no weight on this net, so the row is the CLE-off model."]
    return document(lines, meta)


def migrate_unguarded(results: dict) -> None:
    """CLE rows from before equalize_model had its chain guard ran the paper's unguarded CLE: file them
    under ``paper`` (their top-1 is what that variant gives; nothing is recomputed)."""
    for key in [k for k, r in results["rows"].items() if r.get("cle") == "on" and "guard" not in r]:
        r = results["rows"].pop(key)
        r.update(cle="paper", guard=None)
        results["rows"][row_key(r["net"], r["setting"], r["weights"], "paper", r["bias_correction"],
                                results["meta"]["calib_images"], results["meta"]["seed"])] = r


def main(argv=None) -> int:
    p = parser(__doc__)
    for flag, allowed in (("--nets", NETS), ("--settings", SETTINGS), ("--weights", WEIGHTS),
                          ("--bias-correction", BIAS_CORRECTION_MODES)):
        add_choices(p, flag, allowed)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    add_run_flags(p, "prequant_steps", progress=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = cifar10_dir(args.data_dir)
    table = Results(args.out, render_markdown, fresh=args.fresh, empty={"rows": {}, "nets": {}})
    results = table.data
    migrate_unguarded(results)
    results["meta"] = run_meta(args.threads, calib_images=args.calib_images, seed=args.seed)
    train = train_set(data_dir)
    for net in args.nets:
        fp = open_net(net)
        spec = model_info(fp).input_spec
        dev_ds = dev_set(data_dir, spec)
        dev = dev_tensors(dev_ds)
        results["dev_images"] = len(dev_ds)
        train.transform = build_transform(spec)  # per net: ConvMixer normalizes differently
        calib = calibration_tensor(train, args.calib_images, seed=args.seed)
        eq = {"on": equalize_model(fp, EqualizeConfig(absorb_bias=True), data=calib),  # guard at 4 bits: W4 settings
              "paper": equalize_model(fp, EqualizeConfig(absorb_bias=True, guard_bits=None), data=calib)}
        rep = eq["on"].dfqkern_equalize_report
        changed = {k: any(not torch.equal(a, b) for a, b in zip(fp.state_dict().values(), m.state_dict().values()))
                   for k, m in eq.items()}
        if "pairs_found" not in results["nets"].get(net, {}):  # (re)measured when the guard came in
            results["nets"][net] = {"fp_top1": round(top1(fp, *dev), 2), "fp_cle_top1": round(top1(eq["on"], *dev), 2),
                                    "pairs_equalized": len(rep.equalized),
                                    "pairs_found": len(eq["paper"].dfqkern_equalize_report.equalized),
                                    "equalize": rep.to_dict()}
            table.save()
        print(f"{net}: {results['nets'][net]['fp_top1']} FP, {results['nets'][net]['fp_cle_top1']} after CLE, "
              f"{len(rep.equalized)} pairs", flush=True)
        for setting in args.settings:
            for weights in args.weights:
                for cle in CLE:
                    for bc in args.bias_correction:
                        def compute():
                            off = table.rows.get(row_key(net, setting, weights, "off", bc, args.calib_images,
                                                         args.seed))
                            if cle != "off" and not changed[cle] and off is not None:
                                return {**off, "same_as_off": True}
                            row = run_row(eq.get(cle, fp), cle != "off", calib, dev, *SETTINGS[setting], weights, bc)
                            row.update(net=net, setting=setting, weights=weights, cle=cle, bias_correction=bc,
                                       guard=SETTINGS[setting][0] if cle == "on" else None)
                            return row

                        table.row(row_key(net, setting, weights, cle, bc, args.calib_images, args.seed), compute,
                                  lambda r: f"top-1 {r['top1']:.2f} ({r['calib_wall_s']:.0f}s)")
    table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
