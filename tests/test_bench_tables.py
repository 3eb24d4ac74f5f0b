"""The data-free benchmark's bookkeeping (bench/datafree_cifar10.py): migrating rows of earlier
runs, keys per inversion option, and the generated single-vs-mixup summary. No model is run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    """Import ``bench/<name>.py`` (the bench scripts import each other by plain name)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def datafree():
    return _bench_module("datafree_cifar10")


def _row(setting, source, mode, seed, top1, variant=None):
    dkey = f"{source}|{mode}|512|200|{seed}" + (f"|{variant}" if variant else "")
    r = {"setting": setting, "source": source, "label_mode": mode, "seed": seed, "top1": top1, "dataset": dkey,
         "calib_wall_s": 100.0, "total_wall_s": 300.0, "load_avg_1min": [1.0, 1.0]}
    if variant:
        r["variant"] = variant
    return f"{setting}|{dkey}|qdrop|1000", r, dkey


def _results(rows):
    out = {"fp_top1": 81.0, "dev_images": 5000, "rows": {}, "datasets": {},
           "meta": {"images": 512, "gen_iters": 200, "calib_method": "qdrop", "calib_iters": 1000, "threads": 2,
                    "machine": "test", "commit": "abc"}}
    for key, r, dkey in rows:
        out["rows"][key] = r
        out["datasets"][dkey] = {"gen_wall_s": 200.0, "target_hit_rate": 1.0, "target_mass": 1.0}
    return out


def test_variant_names_and_keys(datafree):
    assert datafree.variant_name(1.0, 1.0, "single") == "ce1"
    assert datafree.variant_name(0.5, 1.0, "mixup") == "ce0.5"
    assert datafree.variant_name(0.5, 0.3, "mixup") == "ce0.5-a0.3"
    assert datafree.variant_name(0.5, 0.3, "single") == "ce0.5"  # alpha means nothing for one-hot targets
    assert datafree.dataset_key("dgh", "mixup", 2, 512, 200, "ce0.5") == "dgh|mixup|512|200|2|ce0.5"


def test_legacy_rows_migrate_to_ce1_and_the_summary_pairs_the_defaults(datafree):
    res = _results([_row("w2a4", "dgh", "single", s, 77.0 + s) for s in range(3)]  # legacy: ce 1, no tag
                   + [_row("w2a4", "dgh", "mixup", s, 79.0 + s, "ce0.5") for s in range(3)]
                   + [_row("w2a4", "dgh", "single", 0, 76.0, "ce0.5")])
    res = datafree.migrate(res)
    assert "w2a4|dgh|single|512|200|1|ce1|qdrop|1000" in res["rows"]
    assert "dgh|single|512|200|1|ce1" in res["datasets"] and "dgh|single|512|200|1" not in res["datasets"]
    migrated = res["rows"]["w2a4|dgh|single|512|200|1|ce1|qdrop|1000"]
    assert migrated["variant"] == "ce1" and migrated["ce_weight"] == 1.0 and migrated["dataset"].endswith("|ce1")
    assert datafree.migrate(res) == res  # idempotent
    summary = datafree.render_markdown(res).split("## Mean over seeds")[1]
    lines = {line.split(" | ")[2]: line for line in summary.splitlines() if line.startswith("| w2a4")}
    assert "78.00 ± 1.00 (n=3)" in lines["ce1"] and lines["ce1"].endswith("|  |")  # no mixup at ce1
    assert "76.00 ± 0.00 (n=1)" in lines["ce0.5"] and "+4.00" in lines["ce0.5"]
    defaults = lines["dfqkern defaults (ce1 / ce0.5)"]
    assert "78.00 ± 1.00 (n=3)" in defaults and "80.00 ± 1.00 (n=3)" in defaults and defaults.endswith("+2.00 |")


# ----------------------------------------------------------------------------- edge-network table

@pytest.fixture(scope="module")
def edge():
    return _bench_module("accuracy_edge_cifar10")


def _edge_results(edge, tops: dict, data="real", setting="w4a4", kept=None, reverted=()):
    meta = {"calib_images": 512, "seed": 0, "iters": 500, "gen_iters": 200, "threads": 2, "machine": "test",
            "commit": "abc"}
    rows = {}
    for method, top1 in tops.items():
        rows[edge.row_key("shufflenetv2", data, setting, method, 512, 500, 0, 200)] = {
            "method": method, "top1": top1, "units_kept_start": (kept or {}).get(method, 0),
            "reverted_to_observer": method in reverted, "net": "shufflenetv2", "data": data, "setting": setting,
            "calib_images": 512, "seed": 0, "iters": 0 if method == "observer" else 500,
            "gen_iters": None if data == "real" else 200}
    return {"fp_top1": {"shufflenetv2": 71.0}, "dev_images": 5000, "rows": rows, "meta": meta}


def _edge_line(text: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith("| shufflenetv2 "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_edge_table_checks_every_method_against_the_observer(edge):
    cells = _edge_line(edge.render_markdown(_edge_results(
        edge, {"observer": 65.0, "adaround": 69.5, "brecq": 70.0, "qdrop": 68.5}, kept={"brecq": 2})))
    assert cells[:4] == ["shufflenetv2", "71.00", "real", "w4a4"]
    assert cells[4:8] == ["65.00", "69.50", "70.00 (2)", "68.50"]
    assert cells[8:] == ["yes", "2.50", "met"]  # 2.5 points below FP: within the 3-point real-data target
    cells = _edge_line(edge.render_markdown(_edge_results(
        edge, {"observer": 65.0, "adaround": 64.9, "qdrop": 67.5}, data="dgh-mixup", reverted=("adaround",))))
    assert cells[4:8] == ["65.00", "64.90 (R)", "", "67.50"]
    assert cells[8:] == ["no", "3.50", "met"]  # 3.5 points: within the 4-point data-free target
    cells = _edge_line(edge.render_markdown(_edge_results(edge, {"observer": 60.0, "qdrop": 66.0})))
    assert cells[-1] == "missed"
    cells = _edge_line(edge.render_markdown(_edge_results(edge, {"observer": 60.0, "qdrop": 66.0}, setting="w4a8")))
    assert cells[-1] == ""  # the QDrop target is a W4A4 target


def test_edge_rows_of_other_budgets_get_their_own_table(edge):
    """A longer budget (500 inversion iterations, 2000 reconstruction iterations) never mixes into the main
    table's cells; it is listed below, against the observer of the same synthetic set."""
    res = _edge_results(edge, {"observer": 65.0, "qdrop": 66.0}, data="dgh-mixup")
    base = {"net": "shufflenetv2", "data": "dgh-mixup", "setting": "w4a4", "calib_images": 512, "seed": 0,
            "gen_iters": 500, "units_kept_start": 0, "reverted_to_observer": False}
    res["rows"][edge.row_key("shufflenetv2", "dgh-mixup", "w4a4", "observer", 512, 0, 0, 500)] = dict(
        base, method="observer", iters=0, top1=64.0)
    res["rows"][edge.row_key("shufflenetv2", "dgh-mixup", "w4a4", "qdrop", 512, 2000, 0, 500)] = dict(
        base, method="qdrop", iters=2000, top1=68.5)
    text = edge.render_markdown(res)
    assert _edge_line(text)[4:] == ["65.00", "", "", "66.00", "yes", "5.00", "missed"]
    other = [[c.strip() for c in x.strip("|").split("|")] for x in text.split("## Other budgets")[1].splitlines()
             if x.startswith("| shufflenetv2 ")]
    assert other == [["shufflenetv2", "71.00", "dgh-mixup", "w4a4", "512", "500", "observer", "0", "64.00", "", "",
                      ""],
                     ["shufflenetv2", "71.00", "dgh-mixup", "w4a4", "512", "500", "qdrop", "2000", "68.50", "+4.50",
                      "2.50", "met"]]
    assert "## Other budgets" not in edge.render_markdown(_edge_results(edge, {"observer": 65.0}))


def test_edge_keys_of_older_runs_are_upgraded(edge):
    """Rows written before the key named the inversion budget (all 200 iterations) keep resuming."""
    old = {"rows": {"convmixer|dgh-mixup|w4a4|qdrop|512|500|0": {"data": "dgh-mixup", "top1": 81.0},
                    "convmixer|real|w4a4|qdrop|512|500|0": {"data": "real", "top1": 84.0}}}
    rows = edge.upgrade_keys(old)["rows"]
    assert rows == {edge.row_key("convmixer", "dgh-mixup", "w4a4", "qdrop", 512, 500, 0, 200):
                    {"data": "dgh-mixup", "top1": 81.0, "gen_iters": 200},
                    edge.row_key("convmixer", "real", "w4a4", "qdrop", 512, 500, 0, 999):
                    {"data": "real", "top1": 84.0, "gen_iters": None}}


# ----------------------------------------------------------------------------- data-free options and filters

def test_datafree_filter_variants_and_options_section(datafree):
    assert datafree.variant_name(0.5, 1.0, "mixup", "energy:0.5") == "ce0.5-energy0.5"
    assert datafree.variant_name(0.5, 1.0, "mixup", "energy:0.5+bn:0.75") == "ce0.5-energy0.5-bn0.75"
    assert datafree.variant_name(0.5, 1.0, "mixup", "none") == datafree.variant_name(0.5, 1.0, "mixup") == "ce0.5"
    assert datafree.INVERSION_METHOD["genie"] == "genie-labels"  # the rows' labelled genie, renamed
    res = _results([_row("w2a4", "genie", "single", 0, 79.0, "ce0.5"), _row("w2a4", "dgh", "mixup", 0, 80.0,
                                                                             "ce0.5-energy0.5")])
    res["datasets"]["dgh|mixup|512|200|0|ce0.5-energy0.5"]["options"] = {
        "method": "dgh", "label_mode": "mixup", "ce_weight": 0.5, "dirichlet_alpha": 1.0, "shard_size": 1024,
        "augment": "none", "input_prior_weight": 0.0, "pool_images": 1024,
        "filter": [{"kind": "energy", "keep_fraction": 0.5, "candidates": 1024, "kept": 512}]}
    section = datafree.render_markdown(res).split("## Options per data name")[1]
    lines = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert "`genie-labels`, labels single, ce 0.5" in lines["genie single ce0.5"]  # older row: derived
    assert "no filter" in lines["genie single ce0.5"]
    dgh = lines["dgh mixup ce0.5-energy0.5"]
    assert "BN statistics of all 1024 images" in dgh and "filter: energy keeps 512 of 1024" in dgh
