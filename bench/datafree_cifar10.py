"""Data-free accuracy benchmark: CIFAR-10 nets calibrated on images inverted from their own BatchNorm statistics.

One command per model reproduces the committed table (one section per model)::

    python bench/datafree_cifar10.py             # ResNet-20, every row; rows already in the JSON are kept (resume)
    python bench/datafree_cifar10.py --model convmixer --sources dgh --label-modes mixup --ce-weights 0.5 \
        --gen-iters 500 --settings w4a8,w4a4 --calib-iters 500  # ConvMixer-256/8, library data-free defaults
    python bench/datafree_cifar10.py --fresh     # recompute ResNet-20's rows (--fresh drops only --model's rows)

``--model``: ``resnet20`` (CIFAR ResNet-20) or ``convmixer`` (the shared pretrained ConvMixer-256/8:
depthwise convs, BatchNorm after GELU); weights from ``common.NETS``. ConvMixer's real-data QDrop rows
(``cifar10_edge.json``) used 500 reconstruction iterations, hence ``--calib-iters 500`` above: same budget.

For every (inversion method, label mode, seed) a synthetic set of ``--images`` images is generated
(``dfqkern.datagen.generate_bn_inversion_set``: PNG shards + manifest, resumable, kept in
``--work-dir`` and reused by every setting), then the model is quantized and calibrated with
``--calib-method`` (qdrop) on it, exactly as the real-data rows of ``bench/accuracy_cifar10.py``
(same settings, iterations, observers), and top-1 is measured on the 5,000 dev test images. No
real training image is touched. Each finished row is written to ``bench/results/cifar10_datafree.json``
at once and the markdown table is regenerated from the JSON (never typed); the real-data qdrop rows
are read from ``bench/results/cifar10_real.json`` (ResNet-20) or ``bench/results/cifar10_edge.json``
(ConvMixer) for the comparison column.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (NETS, RESULTS_DIR, Results, Timer, add_choices, add_run_flags, cifar10_dir,  # noqa: E402
                    comma_list, dev_set, document, generated_by, join_key, now, open_net, parse_field_set, parser,
                    field_set_tags, run_meta, table_head, top1)
from accuracy_cifar10 import SETTINGS, row_summary, run_row  # noqa: E402
import accuracy_edge_cifar10 as edge  # noqa: E402

import torch  # noqa: E402

from dfqkern.data import calibration_tensor  # noqa: E402
from dfqkern.datagen import filter_synthetic_set, generate_bn_inversion_set, load_synthetic  # noqa: E402
from dfqkern.datagen.bn_inversion import DEFAULT_CE_WEIGHT  # noqa: E402
from dfqkern.datagen.config import PRECISIONS, BNInversionConfig, parse_filters, pool_size  # noqa: E402
from dfqkern.pipeline import tensor_transform  # noqa: E402
from dfqkern.model_info import model_info  # noqa: E402

SOURCES = ("dgh", "genie")
# The table's source names -> dfqkern's inversion methods. "genie" rows were made by the labelled genie
# that dfqkern now calls genie-labels (the name genie is Genie as published: no labels, swing on the
# model's strided convs); the row keys and cached set directories keep "genie", so they still match.
INVERSION_METHOD = {"dgh": "dgh", "genie": "genie-labels"}
LABEL_MODES = ("single", "mixup")
MODELS = ("resnet20", "convmixer")  # names of common.NETS, in the table's order
TITLE = {"resnet20": "ResNet-20", "convmixer": "ConvMixer-256/8"}
# name -> (weight bits, activation bits, first/last bits): the real-data table's settings plus W4A8
BITS = {**SETTINGS, "w4a8": (4, 8, 8)}
DF_SETTINGS = ("w4a8", "w4a4", "w3a3", "w2a4")  # the table's order
MODEL_SETTINGS = {"resnet20": ("w4a4", "w3a3", "w2a4"), "convmixer": ("w4a8", "w4a4", "w2a4")}  # --settings default
# Targets per model (data-free, first/last 8-bit): points below FP, and points below the real-data result of the
# same calibration method; ConvMixer's are issue 17's.
TARGET_DROP = {"resnet20": {"w4a4": 2.0}, "convmixer": {"w4a8": 1.0, "w4a4": 3.0}}
TARGET_GAP_TO_REAL = {"resnet20": {"w2a4": 2.0}, "convmixer": {"w4a8": 1.5, "w4a4": 1.5}}
# BNInversionConfig fields the script sets with flags of its own (--gen-set refuses them)
GEN_OWN_FLAGS = ("method", "label_mode", "iters", "seed", "ce_weight", "dirichlet_alpha", "precision")
TIME_LIMIT_S = 20 * 60  # generation + calibration per setting
REAL_RESULTS = RESULTS_DIR / "cifar10_real.json"
EDGE_RESULTS = RESULTS_DIR / "cifar10_edge.json"


def variant_name(ce_weight: float, dirichlet_alpha: float, label_mode: str, filters: str = "",
                 precision: str = "fp32", gen_set: "dict | None" = None) -> str:
    """The inversion options a set was made with, as a short tag: 'ce0.5', 'ce1-a0.5' (mixup Dirichlet alpha),
    'ce0.5-bf16' (the model's forward autocast to bf16 during inversion), 'ce0.5-tv_weight2' (``--gen-set``
    options, sorted), 'ce0.5-energy0.5' (GenQ filter chain ``filters``, e.g. 'energy:0.5+bn:0.5'; '' or 'none':
    unfiltered)."""
    tags = [f"ce{ce_weight:g}"]
    if label_mode == "mixup" and dirichlet_alpha != 1.0:
        tags.append(f"a{dirichlet_alpha:g}")
    if precision != "fp32":
        tags.append(precision)
    tags += field_set_tags(gen_set or {})
    tags += [f"{s.kind}{s.keep_fraction:g}" for s in filter_steps(filters)]
    return "-".join(tags)


def filter_steps(chain: str):
    """A chain from ``--filter-chains``: steps joined by '+' ('energy:0.5+bn:0.5'); 'none' or '': no filter."""
    return [] if chain in ("", "none") else parse_filters(chain.split("+"))


def dataset_key(model: str, method: str, label_mode: str, seed: int, images: int, gen_iters: int,
                variant: str) -> str:
    return join_key(model, method, label_mode, images, gen_iters, seed, variant)


def row_key(setting: str, dataset: str, calib_method: str, calib_iters: int) -> str:
    return join_key(setting, dataset, calib_method, calib_iters)


def migrate(results: dict) -> dict:
    """Results of earlier runs in today's form. Rows of the first runs (before the cross-entropy weight was
    swept) were made with ce_weight 1; every run before ``--model`` was ResNet-20: its FP top-1, dev images
    and meta move under ``models["resnet20"]`` and its dataset and row keys gain the model name."""
    renamed = {}
    for old in list(results["datasets"]):
        new = old if old.count("|") != 4 else f"{old}|ce1"  # no variant: ce 1
        new = new if new.count("|") != 5 else f"resnet20|{new}"  # no model: ResNet-20
        if new != old:
            renamed[old] = new
            results["datasets"][new] = results["datasets"].pop(old)
    if "models" not in results:
        results["models"] = {}
        if "fp_top1" in results:
            results["models"]["resnet20"] = {"arch": results.pop("model", NETS["resnet20"][0]),
                                             "fp_top1": results.pop("fp_top1"),
                                             "dev_images": results.pop("dev_images"), "meta": dict(results["meta"])}
    for key in list(results["rows"]):
        r = results["rows"][key]
        if "variant" not in r:
            r.update(variant="ce1", ce_weight=1.0, dirichlet_alpha=1.0 if r["label_mode"] == "mixup" else None)
        r.setdefault("model", "resnet20")
        if r["dataset"] in renamed:
            r["dataset"] = renamed[r["dataset"]]
            calib = key.rsplit("|", 2)[1:]  # calibration method and iterations
            results["rows"][row_key(r["setting"], r["dataset"], *calib)] = results["rows"].pop(key)
    return results


def generate(fp_model, work_dir: Path, method: str, label_mode: str, seed: int, images: int, gen_iters: int,
             progress: bool, ce_weight: float = 1.0, dirichlet_alpha: float = 1.0,
             filters: str = "", model: str = "resnet20", precision: str = "fp32",
             gen_set: "dict | None" = None) -> tuple[Path, dict]:
    """The synthetic set (generated now, or resumed / reused from ``work_dir``), its timing and the options
    it was made with. ``method`` is the table's source name (``INVERSION_METHOD``). With ``filters`` a pool
    of images / (product of keep fractions) is generated and filtered down to ``images``. ``model``: its name in
    :data:`MODELS` (the set folders of ResNet-20, made before there was a choice, carry no model name); ``gen_set``:
    further :class:`BNInversionConfig` options (``--gen-set``)."""
    spec = model_info(fp_model).input_spec
    steps = filter_steps(filters)
    pool = pool_size(images, steps)
    prefix = "" if model == "resnet20" else f"{model}-"
    gen_set = dict(gen_set or {})
    variant = variant_name(ce_weight, dirichlet_alpha, label_mode, precision=precision, gen_set=gen_set)
    base = f"{prefix}{method}-{label_mode}-n{{}}-it{gen_iters}-s{seed}-{variant}"
    pool_dir = work_dir / base.format(pool)
    options = dict(method=INVERSION_METHOD[method], label_mode=label_mode, iters=gen_iters, seed=seed,
                   ce_weight=ce_weight, dirichlet_alpha=dirichlet_alpha, precision=precision, **gen_set)
    out, chain = pool_dir, None
    with Timer() as timer:
        with Timer() as pool_timer:
            # shard_size = the set: dgh matches the statistics of the whole set, not of one shard.
            generate_bn_inversion_set(pool_dir, fp_model, num_images=pool, input_shape=spec.input_size,
                                      mean=spec.mean, std=spec.std, shard_size=pool, model_id=NETS[model][0],
                                      progress=progress, **options)
        if steps:
            tag = variant_name(ce_weight, dirichlet_alpha, label_mode, filters, precision, gen_set)
            out = work_dir / f"{base.format(images)}-{tag}"
            filter_synthetic_set(pool_dir, out, fp_model, steps, num_images=images, progress=progress,
                                 transform=tensor_transform(spec))
            chain = load_synthetic(out, verify=False).manifest["filter"]["chain"]
    cfg = BNInversionConfig.build(**options).to_dict()
    used = {"method": cfg["method"], "label_mode": cfg["label_mode"], "ce_weight": cfg["options"]["ce_weight"],
            "dirichlet_alpha": dirichlet_alpha if label_mode == "mixup" else None, "iters": gen_iters,
            "shard_size": pool, "augment": cfg["options"]["augment"],
            "input_prior_weight": cfg["options"]["input_prior_weight"], "pool_images": pool, "precision": precision,
            "filter": [{k: c[k] for k in ("kind", "keep_fraction", "candidates", "kept")} for c in chain or []],
            "gen_set": gen_set}
    if chain and chain[-1]["kind"] == "bn":
        used["filter_bn_loss"] = chain[-1]["set_bn_loss"]
    return out, {"gen_wall_s": round(timer.wall, 1), "gen_cpu_s": round(timer.cpu, 1), "pool": pool_dir.name,
                 "pool_wall_s": round(pool_timer.wall, 1), "pool_cpu_s": round(pool_timer.cpu, 1), "options": used}


def charge_shared_pool(timing: dict, datasets: dict) -> dict:
    """``timing`` of a set whose pool an earlier set generated (reloaded here in seconds: two filter chains share
    one pool) charged with that pool's first generation time, as every row of a set is charged the set's."""
    first = max((d for d in datasets.values() if d.get("pool") == timing.get("pool")),
                key=lambda d: d.get("pool_wall_s", 0.0), default=None)
    if first is None or first.get("pool_wall_s", 0.0) <= timing["pool_wall_s"]:
        return timing
    out = dict(timing)
    for kind in ("wall", "cpu"):
        out[f"gen_{kind}_s"] = round(timing[f"gen_{kind}_s"] - timing[f"pool_{kind}_s"] + first[f"pool_{kind}_s"], 1)
        out[f"pool_{kind}_s"] = first[f"pool_{kind}_s"]
    return out


def dataset_options(ds: dict, r: dict, images: int) -> dict:
    """The options a row's set was made with: recorded since the method split, else what the earlier runs used
    (genie = the labelled genie, the whole set as dgh's statistics, no augmentation / input prior / filter)."""
    if "options" in ds:
        return ds["options"]
    ce = r.get("ce_weight", float(r["variant"].split("-")[0][2:]))  # the variant starts with 'ce<weight>'
    return {"method": INVERSION_METHOD[r["source"]], "label_mode": r["label_mode"], "ce_weight": ce,
            "dirichlet_alpha": r.get("dirichlet_alpha"), "shard_size": images, "augment": "none",
            "input_prior_weight": 0.0, "pool_images": images, "filter": []}


def options_text(o: dict) -> str:
    parts = [f"`{o['method']}`", f"labels {o['label_mode']}"]
    if o["label_mode"] != "none":
        parts.append(f"ce {o['ce_weight']:g}")
    if o.get("dirichlet_alpha") is not None:
        parts.append(f"Dirichlet({o['dirichlet_alpha']:g})")
    if o["method"] == "dgh":
        parts.append(f"BN statistics of all {o['shard_size']} images" if o["shard_size"] >= o["pool_images"]
                     else f"BN statistics per {o['shard_size']}-image shard")
    parts.append(f"augment {o['augment']}")
    if o["input_prior_weight"]:
        parts.append(f"input prior {o['input_prior_weight']:g}")
    if o.get("precision", "fp32") != "fp32":
        parts.append(f"forward in {o['precision']} (autocast)")
    parts += [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(o.get("gen_set", {}).items())]
    chain = " then ".join(f"{f['kind']} keeps {f['kept']} of {f['candidates']}" for f in o["filter"])
    parts.append(f"filter: {chain}" if chain else "no filter")
    return ", ".join(parts)


def target_agreement(fp_model, synthetic) -> dict:
    """How well the FP model sees the targets the images were inverted for: top-1 hit rate of the
    dominant class and the mean softmax mass on the target classes."""
    images = torch.stack([synthetic[i][0] for i in range(len(synthetic))])
    labels = torch.stack([synthetic[i][1] for i in range(len(synthetic))])
    with torch.no_grad():
        probs = torch.softmax(fp_model.eval()(images), dim=1)
    hit = (probs.argmax(1) == labels.argmax(1)).float().mean().item()
    mass = (probs * (labels > 0)).sum(1).mean().item()
    return {"target_hit_rate": round(hit, 3), "target_mass": round(mass, 3)}


def real_reference(method: str, model: str = "resnet20") -> dict:
    """setting -> real-data top-1 of calibration ``method`` on ``model``. ResNet-20: the first/last 8-bit rows of
    the real-data table (one per setting at 1024 images). ConvMixer: the edge table's real-data rows at its main
    budget (``edge.BUDGET``), by key: that table also holds other budgets of the same (net, setting, method)."""
    if model == "resnet20":
        if not REAL_RESULTS.exists():
            return {}
        rows = json.loads(REAL_RESULTS.read_text())["rows"].values()
        return {r["setting"]: r["top1"] for r in rows if r["method"] == method and r["first_last_bits"] == 8
                and r["calib_images"] >= 1024}
    if not EDGE_RESULTS.exists():
        return {}
    rows, b = json.loads(EDGE_RESULTS.read_text())["rows"], edge.BUDGET
    keys = {s: edge.row_key(model, "real", s, method, b["calib_images"], b["iters"], b["seed"], None)
            for s in edge.SETTINGS}
    return {s: rows[k]["top1"] for s, k in keys.items() if k in rows}


# How the calibration compares with the real-data column's rows (:func:`real_reference`).
REAL_REFERENCE_TEXT = {
    "resnet20": "exactly as the real-data table (`cifar10_real.md`)",
    "convmixer": (f"as the real-data column, read from the edge table (`cifar10_edge.md`: "
                  f"{edge.BUDGET['calib_images']} real training images, {edge.BUDGET['iters']} reconstruction "
                  f"iterations per unit, seed {edge.BUDGET['seed']})"),
}


# ----------------------------------------------------------------------------- report

def _verdict(r: dict, fp: float, real: dict) -> str:
    checks = []
    drop, gap = TARGET_DROP[r["model"]], TARGET_GAP_TO_REAL[r["model"]]
    if r["setting"] in drop:
        checks.append(fp - r["top1"] <= drop[r["setting"]])
    if r["setting"] in gap and r["setting"] in real:
        checks.append(real[r["setting"]] - r["top1"] <= gap[r["setting"]])
    if not checks:
        return ""
    acc = all(checks)
    in_time = r["total_wall_s"] <= TIME_LIMIT_S
    return "yes" if acc and in_time else "accuracy yes, time no" if acc else "no"


def _method(r: dict, meta: dict) -> str:
    """Row ``r``'s reconstruction method (rows written before the column existed: the run's)."""
    return r.get("method", meta["calib_method"])


def _data_name(r: dict) -> str:
    return f"{r['source']} {r['label_mode']} {r['variant']}"


def render_markdown(results: dict) -> str:
    """One section per model with rows (:data:`MODELS` order); the package commit of the last run at the end."""
    lines = ["# CIFAR-10 data-free calibration (BatchNorm inversion)"]
    for model in MODELS:
        rows = [r for r in results["rows"].values() if r["model"] == model]
        if rows:
            lines += ["", *_model_section(results, model, rows)]
    return document(lines, results["meta"])


def _budget(r: dict, ds: dict, meta: dict) -> str:
    """'images / inversion iterations / reconstruction iterations per unit' of row ``r`` (set ``ds``)."""
    gen_iters = ds.get("options", {}).get("iters", meta["gen_iters"])
    return f"{r.get('calib_images', meta['images'])} / {gen_iters} / {r.get('iters', meta['calib_iters'])}"


def _model_section(results: dict, model: str, rows: list) -> list[str]:
    info = results["models"][model]
    fp, meta = info["fp_top1"], info["meta"]
    methods = sorted({_method(r, meta) for r in rows})
    real = {m: real_reference(m, model) for m in methods}
    lines = [
        f"## {TITLE[model]}",
        "",
        f"{generated_by(__file__)} Model `{info['arch']}`, FP top-1 "
        f"**{fp:.2f} %** on the {info['dev_images']} dev test images. No real image is used for calibration: "
        f"the images of a set are inverted from the model's BatchNorm statistics "
        f"(`generate_bn_inversion_set`, targets balanced over the 10 classes; "
        f"`mixup` = 2 classes per image with Dirichlet(1) weights, soft cross-entropy; the weight of the "
        f"target cross-entropy in the inversion loss is part of the data name: `ce1`, `ce0.5`), then "
        f"{' / '.join(f'`{m}`' for m in methods)} reconstruction (the `method` column), first/last layer "
        f"8-bit, {REAL_REFERENCE_TEXT[model]}. The seed drives generation and calibration. "
        f"Data `genie` is dfqkern's labelled genie (method `genie-labels`); every data name's options are listed "
        f"under *Options per data name*. torch threads: {meta['threads']}; machine: {meta['machine']}.",
        "",
        "`target hit / mass`: the FP model's top-1 agreement with each image's dominant target class and its "
        "mean softmax mass on the target classes. `total s` = generation + calibration wall time (the set is "
        "generated once and reused by the other settings; its time is charged to every row). Timing caveat: "
        "the 2-core CPU was shared with other jobs while this ran (1-minute load average listed). `budget`: "
        "images per set / inversion iterations / reconstruction iterations per unit.",
        "",
        *table_head("setting", "data", "seed", "top-1 %", "drop (pts)", "real-data (same method)",
                    "gap to real", "target hit / mass", "gen s", "calib s", "total s", "load", "budget",
                    "method", "within target"),
    ]
    rows = sorted(rows, key=lambda r: (DF_SETTINGS.index(r["setting"]), r["source"], r["variant"], r["label_mode"],
                                       _method(r, meta), r["seed"]))
    for r in rows:
        ref = real[_method(r, meta)].get(r["setting"])
        gap = "" if ref is None else f"{ref - r['top1']:.2f}"
        ds = results["datasets"][r["dataset"]]
        lines.append(
            f"| {r['setting']} | {_data_name(r)} | {r['seed']} | {r['top1']:.2f} | {fp - r['top1']:.2f} | "
            f"{'' if ref is None else f'{ref:.2f}'} | {gap} | {ds['target_hit_rate']:.2f} / {ds['target_mass']:.2f} | "
            f"{ds['gen_wall_s']:.0f} | {r['calib_wall_s']:.0f} | {r['total_wall_s']:.0f} | "
            f"{r['load_avg_1min'][1]:.1f} | {_budget(r, ds, meta)} | {_method(r, meta)} | "
            f"{_verdict(r, fp, real[_method(r, meta)])} |")
    # Mean over seeds: the single-vs-mixup comparison the mission is about.
    groups: dict = {}
    for r in rows:
        budget = _budget(r, results["datasets"][r["dataset"]], meta)
        key = (r["setting"], r["source"], r["variant"], budget, _method(r, meta), r["label_mode"])
        groups.setdefault(key, []).append(r["top1"])
    lines += ["", "### Mean over seeds", "",
              "Same inversion options for both label modes in a row (`ce0.5`: cross-entropy weight 0.5), except "
              "the `dfqkern defaults` rows: each label mode at the library's default weight "
              "(`DEFAULT_CE_WEIGHT`: single labels 1, mixup 0.5).", "",
              *table_head("setting", "source", "options", "budget", "method", "single labels", "mixup labels",
                          "mixup - single")]

    def fmt(v):
        if not v:
            return "", None
        m = statistics.fmean(v)
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{m:.2f} ± {sd:.2f} (n={len(v)})", m

    defaults = {mode: variant_name(w, 1.0, mode) for mode, w in DEFAULT_CE_WEIGHT.items()}
    pairings = [(v, v, v) for v in sorted({k[2] for k in groups})]
    pairings.append((f"dfqkern defaults ({defaults['single']} / {defaults['mixup']})", defaults["single"],
                     defaults["mixup"]))
    budgets = sorted({k[3] for k in groups}, key=lambda b: [int(x) for x in b.split(" / ")])
    for setting in DF_SETTINGS:
        for source in SOURCES:
            for name, single_variant, mixup_variant in pairings:
                for budget, method in itertools.product(budgets, methods):
                    s_txt, s_mean = fmt(groups.get((setting, source, single_variant, budget, method, "single"), []))
                    m_txt, m_mean = fmt(groups.get((setting, source, mixup_variant, budget, method, "mixup"), []))
                    paired = single_variant != mixup_variant  # the defaults row: only with both sides
                    if (s_mean is None and m_mean is None) or (paired and (s_mean is None or m_mean is None)):
                        continue
                    diff = "" if s_mean is None or m_mean is None else f"{m_mean - s_mean:+.2f}"
                    lines.append(f"| {setting} | {source} | {name} | {budget} | {method} | {s_txt} | {m_txt} | {diff} |")
    opts = {}
    for r in rows:
        o = dataset_options(results["datasets"][r["dataset"]], r, r.get("calib_images", meta["images"]))
        opts.setdefault(_data_name(r), set()).add(options_text(o))
    lines += ["", "### Options per data name", "",
              "Images and inversion iterations per set: the `budget` column.", "",
              *table_head("data", "options")]
    lines += [f"| {name} | {'; '.join(sorted(texts))} |" for name, texts in sorted(opts.items())]
    return lines


def parse_args(argv=None):
    """The command line, checked before any model is opened; ``settings`` defaults to the model's
    (:data:`MODEL_SETTINGS`) and ``chains`` holds the parsed ``--filter-chains``."""
    p = parser(__doc__, "dev test images")
    p.add_argument("--model", default="resnet20", choices=MODELS,
                   help="the net to quantize (resnet20: CIFAR ResNet-20; convmixer: the pretrained ConvMixer-256/8)")
    add_choices(p, "--settings", DF_SETTINGS, default="",
                help=f"comma list of {list(DF_SETTINGS)} (default: the model's, {MODEL_SETTINGS})")
    add_choices(p, "--sources", SOURCES, "inversion methods ")
    add_choices(p, "--label-modes", LABEL_MODES)
    p.add_argument("--seeds", default="0,1,2", type=comma_list(item=int), help="comma list of seeds")
    p.add_argument("--images", type=int, default=512, help="synthetic images per set (= calibration images)")
    p.add_argument("--gen-iters", type=int, default=200, help="BN-inversion iterations")
    p.add_argument("--ce-weights", default="0.5,1", type=comma_list(item=float),
                   help="comma list of weights of the target cross-entropy in the inversion loss (each runs "
                        "both label modes; dfqkern's defaults: 1 for single labels, 0.5 for mixup)")
    p.add_argument("--dirichlet-alpha", type=float, default=1.0, help="Dirichlet concentration of mixup weights")
    p.add_argument("--filter-chains", default="none",
                   help="comma list of GenQ filter chains, steps joined by '+' ('none,energy:0.5,energy:0.5+bn:0.5'): "
                        "each generates IMAGES / (product of keep fractions) images and keeps IMAGES")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="arithmetic of the model's forward during inversion (bf16: autocast; own set and row keys)")
    p.add_argument("--gen-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a further BNInversionConfig option of every set (repeatable, e.g. tv_weight=2; in the set's "
                        f"data name and folder; {', '.join(GEN_OWN_FLAGS)} have flags of their own)")
    p.add_argument("--calib-method", default="qdrop", choices=("brecq", "qdrop", "genie"))
    p.add_argument("--calib-iters", type=int, default=1000, help="reconstruction iterations per unit")
    add_run_flags(p, "cifar10_datafree", work_dir=("synthetic sets are kept", "bench-datafree"))
    args = p.parse_args(argv)
    args.settings = args.settings or list(MODEL_SETTINGS[args.model])
    if not args.ce_weights or any(not w >= 0 for w in args.ce_weights):
        p.error(f"--ce-weights: expected numbers >= 0, got {args.ce_weights}")
    chains = [c for c in args.filter_chains.split(",") if c]
    try:
        [filter_steps(c) for c in chains]
    except ValueError as err:
        p.error(f"--filter-chains: {err}")
    args.chains = chains
    try:  # a bad inversion option fails before any model is opened
        args.gen_set = parse_field_set(args.gen_set, BNInversionConfig, "--gen-set", GEN_OWN_FLAGS)
        BNInversionConfig(method="dgh", **args.gen_set)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    return args


def drop_model(table: Results, model: str) -> None:
    """--fresh: forget ``model``'s rows, sets and FP top-1 (also when another run writes the table meanwhile);
    the other models' rows stay."""
    data = table.data
    table.discard("rows", [k for k, r in data["rows"].items() if r["model"] == model])
    table.discard("datasets", [k for k in data["datasets"] if k.startswith(f"{model}|")])
    table.discard("models", [model])


def main(argv=None) -> int:
    args = parse_args(argv)
    model, chains = args.model, args.chains
    torch.set_num_threads(args.threads)

    fp_model = open_net(model)
    dev = dev_set(cifar10_dir(args.data_dir), model_info(fp_model).input_spec)
    # Never fresh here: --fresh drops only this model's rows (below), not the other models'.
    table = Results(args.out, render_markdown, fresh=False, empty={"rows": {}, "datasets": {}, "models": {}},
                    upgrade=migrate, merge=("rows", "datasets", "models"))
    results = table.data
    if args.fresh:
        drop_model(table, model)
    results["meta"] = run_meta(args.threads, images=args.images, gen_iters=args.gen_iters,
                               calib_method=args.calib_method, calib_iters=args.calib_iters)
    info = results["models"].setdefault(model, {"arch": NETS[model][0]})
    info.update(dev_images=len(dev), meta=results["meta"])
    if "fp_top1" not in info:
        info["fp_top1"] = top1(fp_model, dev, args.progress)

    # Seed-major order: a partial run already holds a complete single-vs-mixup comparison per seed.
    jobs = [(seed, source, ce, mode, chain) for seed in args.seeds for source in args.sources
            for ce in args.ce_weights for mode in args.label_modes for chain in chains]
    for seed, source, ce, mode, chain in jobs:
        variant = variant_name(ce, args.dirichlet_alpha, mode, chain, args.precision, args.gen_set)
        dkey = dataset_key(model, source, mode, seed, args.images, args.gen_iters, variant)
        pending = [s for s in args.settings
                   if row_key(s, dkey, args.calib_method, args.calib_iters) not in results["rows"]]
        if not pending:
            print(f"skip {dkey} (all settings measured)", flush=True)
            continue
        print(f"data {dkey}", flush=True)
        set_dir, timing = generate(fp_model, args.work_dir, source, mode, seed, args.images, args.gen_iters,
                                   args.progress, ce, args.dirichlet_alpha, chain, model, args.precision, args.gen_set)
        synthetic = load_synthetic(set_dir, transform=tensor_transform(model_info(fp_model).input_spec))
        if dkey not in results["datasets"]:  # first generation's time counts, not a reload's
            results["datasets"][dkey] = {**charge_shared_pool(timing, results["datasets"]),
                                         **target_agreement(fp_model, synthetic), "path": str(set_dir)}
            table.save()
        ds = results["datasets"][dkey]
        print(f"  generated in {ds['gen_wall_s']:.0f}s, target hit {ds['target_hit_rate']:.2f} "
              f"mass {ds['target_mass']:.2f}", flush=True)
        calib = calibration_tensor(synthetic, len(synthetic), seed=seed)
        for setting in pending:
            def compute():
                row = run_row(fp_model, dev, calib, setting, *BITS[setting], args.calib_method,
                              args.calib_iters, seed, args.progress)
                row.update(model=model, source=source, label_mode=mode, dataset=dkey, variant=variant, ce_weight=ce,
                           dirichlet_alpha=args.dirichlet_alpha if mode == "mixup" else None,
                           total_wall_s=round(ds["gen_wall_s"] + row["calib_wall_s"], 1), finished=now())
                return row

            table.row(row_key(setting, dkey, args.calib_method, args.calib_iters), compute,
                      row_summary(info["fp_top1"]))
    table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
