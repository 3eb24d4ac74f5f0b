"""The report's content as a list of blocks (heading, paragraph, table, image, code), built once from
the facts; :mod:`dfqkern.report.render` turns the same blocks into markdown or HTML."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

NA = "n/a"


@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "img", "code"
    text: str = ""
    headers: tuple = ()
    rows: tuple = ()
    file: str = ""


def db(v) -> str:
    if v is None:
        return NA
    return "exact" if v == math.inf else f"{v:.2f}"


def num(v, digits: int = 4) -> str:
    return NA if v is None else f"{v + 0.0:.{digits}g}"  # + 0.0: no "-0" for a range that starts at zero


def pct(v) -> str:
    return NA if v is None else f"{v:.2f}"


def _accuracy(runs: list[dict]) -> list[Block]:
    rows = [(r["name"], r["scheme"], r["recorded"].get("method", NA), pct(a.get("fp_top1")), pct(a.get("quant_top1")),
             pct(a.get("drop")), a["source"] + (f" ({a['n']} images)" if a.get("n") else ""))
            for r in runs if (a := r["accuracy"]) is not None]
    if not rows:
        return [Block("h2", "Accuracy"), Block("p", "No accuracy recorded: pass `--eval-data` (measured now) or "
                                                    "`--summary` (the JSON `dfqkern quantize --json-out` wrote).")]
    return [Block("h2", "Accuracy"), Block("table", headers=("checkpoint", "scheme", "method", "FP top-1 %",
                                                             "quant top-1 %", "drop", "source"), rows=tuple(rows))]


def _overview(runs: list[dict]) -> list[Block]:
    rows = []
    for r in runs:
        p = r["probe"] or {}
        rows.append((r["name"], r["arch"] or NA, r["scheme"], str(len(r["layers"])),
                     f"{r['checkpoint_bytes'] / 1024:.1f}", f"{r['float_bytes'] / 1024:.1f}",
                     f"{r['compression']:.2f}x", db(p.get("logits_sqnr_db")), pct(p.get("top1_agreement"))))
    return [Block("h2", "Checkpoints"),
            Block("table", headers=("checkpoint", "arch", "scheme", "quantized layers", "packed KiB", "float KiB",
                                    "smaller", "model output SQNR dB", "same top-1 as float %"), rows=tuple(rows))]


def _sqnr(runs: list[dict], figures: dict, inputs: dict) -> list[Block]:
    out = [Block("h2", "Per-layer quantization error (SQNR)")]
    if inputs["float_model"] is None:
        out.append(Block("p", "SQNR not available: no float model was given (`--model` / `--checkpoint` / "
                              "`--pretrained`), and a packed checkpoint keeps no float weights."))
    else:
        out.append(Block("p", "Weight SQNR: each layer's dequantized packed weight against the float weight (BatchNorm "
                              "folded as the quantizer folds it). Output SQNR: the layer's output in the quantized "
                              "model against the float model's on the same images; it includes the error of every "
                              "layer before it. SQNR = 10 log10(signal power / error power), higher is better."))
    if "sqnr" in figures:
        out.append(Block("img", "per-layer SQNR", file=figures["sqnr"]))
    for r in runs:
        out.append(Block("h3", f"{r['name']} ({r['scheme']})"))
        out.append(Block("table", headers=("layer", "kind", "W bits", "A bits", "weight shape", "weight SQNR dB",
                                           "output SQNR dB"),
                         rows=tuple((x["name"], x["kind"], str(x["weight_bits"]),
                                     "float" if x["act_bits"] is None else str(x["act_bits"]),
                                     "x".join(map(str, x["weight_shape"])), db(x["weight_sqnr_db"]),
                                     db(x["output_sqnr_db"])) for x in r["layers"])))
        out += [Block("p", f"Note: {n}.") for n in r["notes"]]
    return out


def _ranges(runs: list[dict], figures: dict) -> list[Block]:
    out = [Block("h2", "Activation ranges"),
           Block("p", "What each activation quantizer can represent: codes 0 .. 2^bits - 1 map to "
                      "(code - zero point) x scale. 'Input reached': the min / max of the layer's input on the probe "
                      "images; beyond the quantizer's range it is clipped.")]
    for r in runs:
        out.append(Block("h3", f"{r['name']} ({r['scheme']})"))
        if r["name"] in figures.get("ranges", {}):
            out.append(Block("img", f"activation ranges of {r['name']}", file=figures["ranges"][r["name"]]))
        rows = []
        for a in r["activation_ranges"]:
            seen = NA if a["seen_low"] is None else f"{num(a['seen_low'])} .. {num(a['seen_high'])}"
            scale = NA if a["scale"] is None else (num(a["scale"][0]) if len(a["scale"]) == 1 else
                                                   f"{num(min(a['scale']))} .. {num(max(a['scale']))}")
            zero = NA if a["zero_point"] is None else (str(a["zero_point"][0]) if len(a["zero_point"]) == 1 else
                                                       f"{min(a['zero_point'])} .. {max(a['zero_point'])}")
            rows.append((a["name"], a["kind"], str(a["bits"]), num(a["low"]), num(a["high"]), scale, zero, seen))
        if rows:
            out.append(Block("table", headers=("quantizer", "kind", "bits", "low", "high", "scale", "zero point",
                                               "input reached"), rows=tuple(rows)))
        else:
            out.append(Block("p", "Weight-only: no activation quantizers."))
    return out


def _synthetic(syn: dict | None, figures: dict) -> list[Block]:
    out = [Block("h2", "Synthetic calibration samples")]
    if syn is None:
        return out + [Block("p", "No synthetic set given or found (`--synthetic DIR`).")]
    gen = syn.get("generator") or {}
    out.append(Block("p", f"`{syn['path']}`: {syn['num_images']} images {'x'.join(map(str, syn['image_size'] or []))}"
                          f", source {syn.get('source') or NA}, generator {gen.get('id', NA)}, labels "
                          f"{syn.get('label_mode') or syn.get('label_type') or NA}; the first {len(syn['samples'])} "
                          f"with their target classes and weights."))
    if "samples" in figures:
        out.append(Block("img", "synthetic samples", file=figures["samples"]))
    out.append(Block("table", headers=("image", "file", "label (class weight)"),
                     rows=tuple((str(s["index"]), s["file"], ", ".join(f"{c} {w:.2f}" for c, w in s["labels"]) or NA)
                                for s in syn["samples"])))
    return out


def _config(runs: list[dict]) -> list[Block]:
    out = [Block("h2", "Bit policy and configuration")]
    for r in runs:
        out.append(Block("h3", f"{r['name']} ({r['scheme']})"))
        bits = {}
        for x in r["layers"]:
            key = f"W{x['weight_bits']}A{'-' if x['act_bits'] is None else x['act_bits']}"
            bits[key] = bits.get(key, 0) + 1
        parts = [", ".join(f"{k}: {v} layer(s)" for k, v in sorted(bits.items())),
                 f"{len(r['folded_bn'])} BatchNorm(s) folded", f"{len(r['unhandled'])} module(s) left in float"]
        if r["attention"]:
            parts.append(f"{len(r['attention'])} attention module(s) swapped")
        out.append(Block("p", f"`{r['path']}` (dfqkern {r['package_version']}): " + "; ".join(parts) + "."))
        if r["unhandled"]:
            out.append(Block("table", headers=("left in float", "why"),
                             rows=tuple((k, str(v)) for k, v in r["unhandled"].items())))
        out.append(Block("code", json.dumps(r["config"], indent=1, sort_keys=True)))
        if r["recorded"]:
            out.append(Block("p", "Recorded by the run (its `--json-out` summary):"))
            out.append(Block("code", json.dumps(r["recorded"], indent=1, sort_keys=True, default=str)))
    return out


def build_blocks(report: dict, figures: dict) -> list[Block]:
    """``figures``: file names by figure (``sqnr``, ``samples``, ``ranges`` -> {checkpoint name: file})."""
    inputs = report["inputs"]
    intro = (f"Run `{report['run']}`: {len(report['runs'])} packed checkpoint(s); dfqkern {report['dfqkern_version']}. "
             f"Float model: {inputs['float_model'] or 'not given'}. Probe images: {inputs['probe_images'] or 'none'}.")
    runs = report["runs"]
    return [Block("h1", "dfqkern quantization report"), Block("p", intro), *_accuracy(runs), *_overview(runs),
            *_sqnr(runs, figures, inputs), *_ranges(runs, figures), *_synthetic(report["synthetic"], figures),
            *_config(runs)]
