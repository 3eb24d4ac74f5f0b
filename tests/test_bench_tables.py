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
    assert datafree.dataset_key("convmixer", "dgh", "mixup", 2, 512, 200, "ce0.5") == \
        "convmixer|dgh|mixup|512|200|2|ce0.5"


def test_legacy_rows_migrate_to_ce1_and_the_summary_pairs_the_defaults(datafree):
    res = _results([_row("w2a4", "dgh", "single", s, 77.0 + s) for s in range(3)]  # legacy: ce 1, no tag
                   + [_row("w2a4", "dgh", "mixup", s, 79.0 + s, "ce0.5") for s in range(3)]
                   + [_row("w2a4", "dgh", "single", 0, 76.0, "ce0.5")])
    res = datafree.migrate(res)
    assert "w2a4|resnet20|dgh|single|512|200|1|ce1|qdrop|1000" in res["rows"]
    assert "resnet20|dgh|single|512|200|1|ce1" in res["datasets"] and "dgh|single|512|200|1" not in res["datasets"]
    migrated = res["rows"]["w2a4|resnet20|dgh|single|512|200|1|ce1|qdrop|1000"]
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
    section = datafree.render_markdown(datafree.migrate(res)).split("## Options per data name")[1]
    lines = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert "`genie-labels`, labels single, ce 0.5" in lines["genie single ce0.5"]  # older row: derived
    assert "no filter" in lines["genie single ce0.5"]
    dgh = lines["dgh mixup ce0.5-energy0.5"]
    assert "BN statistics of all 1024 images" in dgh and "filter: energy keeps 512 of 1024" in dgh


# ----------------------------------------------------------------------------- data-free table per model

def _old_key_to_new(key: str) -> str:
    """A row key written before --model (setting|dataset...|calib|iters) as the ResNet-20 key of today."""
    setting, rest = key.split("|", 1)
    return f"{setting}|resnet20|{rest}"


def test_committed_datafree_rows_migrate_to_resnet20_keys(datafree):
    """Every row of the committed JSON (all ResNet-20, written before --model) is found under its model key,
    with its FP top-1 under models['resnet20'], and renders in the ResNet-20 section only."""
    import json

    old = json.loads((BENCH / "results" / "cifar10_datafree.json").read_text())
    if "models" in old:  # written by a run since --model: already in today's form, which migrate keeps as it is
        assert datafree.migrate(json.loads(json.dumps(old))) == old
        assert all(k.split("|")[1] == r["model"] in datafree.MODELS for k, r in old["rows"].items())
        return
    res = datafree.migrate(json.loads(json.dumps(old)))
    assert set(res["rows"]) == {_old_key_to_new(k) for k in old["rows"]}
    assert all(r["model"] == "resnet20" and r["dataset"] in res["datasets"] for r in res["rows"].values())
    assert set(res["datasets"]) == {f"resnet20|{k}" for k in old["datasets"]}
    assert res["models"]["resnet20"]["fp_top1"] == old["fp_top1"] and "fp_top1" not in res
    assert datafree.migrate(json.loads(json.dumps(res))) == res  # idempotent: a resumed run keeps its keys
    text = datafree.render_markdown(res)
    assert text.count("\n## ") == 1 and "## ResNet-20" in text
    body = text.split("### Mean over seeds")[0]
    assert sum(line.startswith("| w") for line in body.splitlines()) == len(old["rows"])


def _convmixer_row(setting, top1):
    dkey = "convmixer|dgh|mixup|512|500|0|ce0.5"
    r = {"model": "convmixer", "setting": setting, "source": "dgh", "label_mode": "mixup", "seed": 0,
         "top1": top1, "dataset": dkey, "variant": "ce0.5", "ce_weight": 0.5, "dirichlet_alpha": 1.0,
         "calib_wall_s": 100.0, "total_wall_s": 300.0, "load_avg_1min": [1.0, 1.0]}
    return f"{setting}|{dkey}|qdrop|1000", r, dkey


def test_datafree_models_do_not_collide_and_convmixer_compares_with_its_own_real_rows(datafree, tmp_path):
    """Same source, label mode, seed and setting on both models: two rows, two sections, and ConvMixer's
    real-data column is the edge table's real QDrop row of the same setting (not ResNet-20's)."""
    import json

    res = datafree.migrate(_results([_row("w4a4", "dgh", "mixup", 0, 80.0, "ce0.5")]))
    meta = dict(res["meta"], gen_iters=500)
    res["models"]["convmixer"] = {"arch": "cifar10_convmixer_256_8", "fp_top1": 86.54, "dev_images": 5000,
                                  "meta": meta}
    for key, r, dkey in (_convmixer_row("w4a4", 84.0), _convmixer_row("w4a8", 86.0)):
        res["rows"][key], res["datasets"][dkey] = r, {"gen_wall_s": 200.0, "target_hit_rate": 1.0,
                                                       "target_mass": 1.0}
    assert len(res["rows"]) == 3
    text = datafree.render_markdown(res)
    resnet, convmixer = text.split("## ConvMixer-256/8")
    assert "## ResNet-20" in resnet and "cifar10_edge.md" in convmixer and "cifar10_convmixer_256_8" in convmixer
    edge_rows = json.loads((BENCH / "results" / "cifar10_edge.json").read_text())["rows"].values()
    real = {r["setting"]: r["top1"] for r in edge_rows if r["net"] == "convmixer" and r["data"] == "real"
            and r["method"] == "qdrop" and r["calib_images"] == 512 and r["iters"] == 500 and r["seed"] == 0}
    lines = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")]
                               for line in convmixer.split("### Mean over seeds")[0].splitlines()
                               if line.startswith("| w"))}
    assert set(lines) == {"w4a8", "w4a4"} and list(lines) == ["w4a8", "w4a4"]  # the table's setting order
    for setting, top in (("w4a8", 86.0), ("w4a4", 84.0)):
        cells = lines[setting]
        assert cells[4] == f"{86.54 - top:.2f}"
        assert cells[5] == f"{real[setting]:.2f}" and cells[6] == f"{real[setting] - top:.2f}"
    # ConvMixer's targets (issue 17), not ResNet-20's: W4A4 2.54 below FP is within its 3.0 (ResNet-20: 2.0),
    # W4A8 has a target at all (1.0); both within 1.5 of the committed real-data QDrop rows (84.18, 86.62).
    assert lines["w4a4"][-1] == lines["w4a8"][-1] == "yes"
    table = _bench_module("common").Results(str(tmp_path / "t"), lambda d: "", fresh=False, empty=res)
    datafree.drop_model(table, "convmixer")  # --fresh --model convmixer keeps ResNet-20's rows
    assert [r["model"] for r in res["rows"].values()] == ["resnet20"] and "convmixer" not in res["models"]
    assert all(k.startswith("resnet20|") for k in res["datasets"])


def test_datafree_model_flag_picks_its_settings(datafree):
    assert datafree.parse_args(["--model", "convmixer"]).settings == ["w4a8", "w4a4", "w2a4"]
    assert datafree.parse_args([]).settings == ["w4a4", "w3a3", "w2a4"]  # ResNet-20, as before --model
    assert datafree.parse_args(["--model", "convmixer", "--settings", "w4a8"]).settings == ["w4a8"]
    with pytest.raises(SystemExit):
        datafree.parse_args(["--model", "vgg"])


# ----------------------------------------------------------------------------- deployment latency table

@pytest.fixture(scope="module")
def deploy():
    return _bench_module("deploy_latency_cifar10")


def _deploy_lines(deploy, data) -> dict:
    """(setting, batch) -> the cells of that table line."""
    out = {}
    for line in deploy.render_markdown(data).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| w"):
            out[(cells[0], int(cells[1]))] = cells
    return out


def _bench_row(model, b, median, minimum, **extra):
    return dict(model=model, batch_size=b, median_ms=median, min_ms=minimum, **extra)


def test_deploy_table_of_a_run_before_the_newer_rows(deploy):
    """A run timed before `dfqkern bench --compile` and the onnxruntime int8 peer (the committed JSON with those
    rows taken out) still renders: their cells say so, the ratio columns stay blank, and a resumed run times
    the setting again."""
    import json

    data = json.loads((BENCH / "results" / "deploy_latency_intel-r-xeon-r-processor.json").read_text())
    newer = (deploy.COMPILED, deploy.ORT_INT8)
    for r in data["rows"].values():
        r["bench"]["rows"] = [x for x in r["bench"]["rows"] if x["model"] not in newer]
        r.pop("top1_ort_int8", None)
    lines = _deploy_lines(deploy, data)
    assert set(lines) == {(s, b) for s in data["rows"] for b in data["rows"][s]["bench"]["batch_sizes"]}
    col = {kind: 2 + i for i, kind in enumerate(deploy.ROWS)}
    for (setting, b), cells in lines.items():
        r = data["rows"][setting]
        by = {x["model"]: x for x in r["bench"]["rows"] if x["batch_size"] == b}
        assert cells[col["packed"]] == f"{by['packed']['median_ms']:.3f} / {by['packed']['min_ms']:.3f}"
        assert cells[col[deploy.COMPILED]] == cells[col[deploy.ORT_INT8]] == deploy.NOT_RUN
        assert cells[2 + len(deploy.ROWS):4 + len(deploy.ROWS)] == ["-", "-"]
        assert deploy.missing_rows(r) == list(newer)  # so a resumed run times this setting again
    assert "not run in these runs" in deploy.render_markdown(data)


def test_deploy_table_with_the_compiled_and_onnxruntime_int8_rows(deploy):
    rows = [_bench_row("packed", 1, 1.2, 1.1), _bench_row(deploy.COMPILED, 1, 0.9, 0.8, max_abs_diff_vs_packed=0.0),
            _bench_row(deploy.ORT_INT8, 1, 0.3, 0.28), _bench_row("onnxruntime", 1, 1.35, 1.3),
            _bench_row("pt2", 1, 2.0, 1.9), _bench_row("float", 1, 1.8, 1.7),
            _bench_row("packed", 8, 5.0, 4.5), dict(model=deploy.COMPILED, batch_size=8, error="RuntimeError: boom"),
            _bench_row(deploy.ORT_INT8, 8, 2.0, 1.9), _bench_row("onnxruntime", 8, 6.0, 5.5),
            _bench_row("pt2", 8, 6.1, 5.6), _bench_row("float", 8, 5.5, 5.2)]
    data = {"meta": {"cpu": "test", "isa": "avx2", "threads": 1, "machine": "test", "warmup": 1, "repeats": 2,
                     "commit": "abc"},
            "rows": {"w4a8": {"bench": {"batch_sizes": [1, 8], "rows": rows}, "load": [1.0, 1.5],
                              "top1_packed": 79.8, "top1_onnxruntime": 79.78, "top1_ort_int8": 80.1}}}
    lines = _deploy_lines(deploy, data)
    assert lines[("w4a8", 1)][2:] == ["1.200 / 1.100", "0.900 / 0.800", "0.300 / 0.280", "1.350 / 1.300",
                                      "2.000 / 1.900", "1.800 / 1.700", f"{0.3 / 1.2:.2f}x", f"{0.3 / 0.9:.2f}x",
                                      "79.80 / 80.1 / 79.78", "1.0/1.5"]
    assert lines[("w4a8", 8)][3] == "error: RuntimeError: boom" and lines[("w4a8", 8)][9] == "-"
    assert deploy.missing_rows(data["rows"]["w4a8"]) == []
    text = deploy.render_markdown(data)
    assert "compiled vs onnxruntime int8 (median)" in text and "differ from the packed row's by at most 0 " in text


def _fill(out: str, key: str, started, go) -> None:
    """Open the table, say so, wait for ``go`` (both processes hold a stale copy), then add one row."""
    common = _bench_module("common")
    table = common.Results(out, lambda data: f"{len(data['rows'])} rows", fresh=False, empty={"rows": {}})
    started.put(key)
    go.wait(30)
    table.row(key, lambda: {"top1": 1.0})


def test_two_processes_filling_one_table_keep_each_others_rows(tmp_path):
    """Each run read the table before the other wrote: the last writer must not drop the other's row."""
    import json
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, started, go = str(tmp_path / "table"), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_fill, args=(out, k, started, go)) for k in ("a", "b")]
    for p in procs:
        p.start()
    assert {started.get(timeout=60), started.get(timeout=60)} == {"a", "b"}
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(json.loads((tmp_path / "table.json").read_text())["rows"]) == ["a", "b"]
    assert (tmp_path / "table.md").read_text().strip() == "2 rows"


def test_a_row_written_meanwhile_brings_what_it_refers_to(tmp_path):
    """Two runs of one table (e.g. data-free ResNet-20 and ConvMixer, one per core): a row the other run wrote
    comes with its model entry, so the table renders (it raised KeyError: the row came, its model did not), and
    what one run discards (--fresh of one model) is not merged back."""
    common = _bench_module("common")
    out = str(tmp_path / "table")

    def render(d):  # looks up what each row refers to, as the data-free table does
        return "\n".join(d["models"][r["model"]] for r in d["rows"].values())

    a, b = (common.Results(out, render, fresh=False, empty={"rows": {}, "models": {}}, merge=("rows", "models"))
            for _ in range(2))
    a.data["models"]["m1"] = "one"
    a.row("r1", lambda: {"model": "m1"})
    b.data["models"]["m2"] = "two"
    b.row("r2", lambda: {"model": "m2"})  # b read the table before a wrote
    assert (tmp_path / "table.md").read_text() == "one\ntwo\n"
    b.discard("rows", ["r1"])
    b.discard("models", ["m1"])
    b.row("r3", lambda: {"model": "m2"})
    assert (tmp_path / "table.md").read_text() == "two\ntwo\n"


def test_fresh_run_does_not_bring_back_the_rows_it_discarded(tmp_path):
    common = _bench_module("common")
    out = str(tmp_path / "table")
    old = common.Results(out, lambda data: "", fresh=False, empty={"rows": {}})
    old.row("a", lambda: {"v": 1})
    old.row("b", lambda: {"v": 1})
    new = common.Results(out, lambda data: "", fresh=True, empty={"rows": {}})
    new.row("a", lambda: {"v": 2})
    assert "b" not in new.rows  # else the fresh run would skip recomputing b
    assert new.rows == {"a": {"v": 2}}


def test_datafree_rows_of_other_budgets_are_labelled_and_averaged_apart(datafree):
    """A row with more images or iterations than the others shows its budget and is not pooled with their
    seeds (it was: a 2048-image row joined the 512-image rows' mean, under the last run's header numbers)."""
    import json

    res = datafree.migrate(json.loads((BENCH / "results" / "cifar10_datafree.json").read_text()))
    base = next(r for r in res["rows"].values() if r["model"] == "resnet20" and r["setting"] == "w3a3"
                and r["variant"] == "ce0.5" and r["label_mode"] == "mixup" and r["seed"] == 0)
    big = dict(base, calib_images=4 * base["calib_images"], iters=2 * base["iters"], seed=7, top1=10.0)
    res["rows"]["w3a3|big"] = big
    text = datafree.render_markdown(res)
    budget = f"{big['calib_images']} / " + text.split(f"| {base['calib_images']} / ")[1].split(" / ")[0] + \
        f" / {big['iters']}"
    assert any(line.startswith("| w3a3 | dgh mixup ce0.5 | 7 | 10.00 |") and f"| {budget} |" in line
               for line in text.splitlines())
    means = [line for line in text.split("### Mean over seeds")[1].splitlines() if line.startswith("| w3a3 | dgh | ce0.5 |")]
    assert any(f"| {budget} |" in line and "10.00 ± 0.00 (n=1)" in line for line in means)
    assert not any("10.00" not in line and "(n=1)" not in line and f"| {budget} |" in line for line in means)


def test_datafree_filtered_sets_sharing_a_pool_are_each_charged_its_generation(datafree):
    """Two filter chains on one pool: the second reloads the pool in seconds, yet its rows carry the pool's
    first generation time (the bn row of the committed table showed 6 s before this)."""
    first = {"gen_wall_s": 1090.0, "gen_cpu_s": 1000.0, "pool": "dgh-mixup-n1024", "pool_wall_s": 1089.0,
             "pool_cpu_s": 999.0}
    datasets = {"a": first, "b": {"gen_wall_s": 50.0, "gen_cpu_s": 40.0, "pool": "other", "pool_wall_s": 50.0,
                                  "pool_cpu_s": 40.0}}
    reused = {"gen_wall_s": 6.0, "gen_cpu_s": 5.0, "pool": "dgh-mixup-n1024", "pool_wall_s": 0.5, "pool_cpu_s": 0.4}
    got = datafree.charge_shared_pool(reused, datasets)
    assert got["gen_wall_s"] == 1094.5 and got["gen_cpu_s"] == 1003.6 and got["pool_wall_s"] == 1089.0
    assert reused["gen_wall_s"] == 6.0  # not modified in place
    fresh = {"gen_wall_s": 70.0, "gen_cpu_s": 60.0, "pool": "new", "pool_wall_s": 69.0, "pool_cpu_s": 59.0}
    assert datafree.charge_shared_pool(fresh, datasets) == fresh  # nothing generated it before
    assert datafree.charge_shared_pool(first, datasets) == first  # the first generation itself


@pytest.fixture(scope="module")
def vit():
    return _bench_module("vit_cifar10")


def test_vit_gen_set_rows_are_their_own_data_and_keys(vit):
    import json

    data = json.loads((BENCH / "results" / "cifar10_vit.json").read_text())
    plain = next(r for r in data["rows"].values()
                 if r["data"] == "psaq" and r["method"] == "qdrop" and not r.get("gen_set"))
    tv = {**plain, "gen_set": {"tv_weight": 3.25}, "top1": plain["top1"] + 1.0}  # a value no committed row has
    assert vit.data_name(plain) == f"psaq@{plain.get('gen_iters') or 'default'}"  # rows of earlier runs keep their name
    assert vit.data_name(tv) == vit.data_name(plain) + " tv_weight=3.25"
    assert vit.row_key(tv) != vit.row_key(plain)
    assert vit.row_key({**tv, "gen_set": {"tv_weight": 2.0}}).startswith(
        f"{plain['setting']}|qdrop|{vit.data_name(plain)}|tv_weight=2|")  # the committed rows' keys resume
    table = vit.render_markdown({**data, "rows": {**data["rows"], vit.row_key(tv): tv}})
    line = next(ln for ln in table.splitlines() if f"| {vit.data_name(tv)} |" in ln)
    assert f"| {tv['top1']:.2f} |" in line  # averaged apart from the plain seeds
    assert vit.render_markdown(data).count("tv_weight=3.25") == 0
    cells = [len(ln.split("|")) for ln in table.splitlines() if ln.startswith("| w4a4 | psaq")]
    assert len(set(cells)) == 1  # a gen-set name adds no column


@pytest.mark.parametrize("items, message", [
    (["tv_weight"], "--gen-set takes FIELD=VALUE"),
    (["nope=1"], "--gen-set takes FIELD=VALUE"),
    (["tv_weight=x"], "tv_weight takes a float"),
    (["seed=3"], "use the script's own flag"),
])
def test_vit_gen_set_rejects_bad_fields_before_any_work(vit, items, message):
    from dfqkern.datagen.config import BNInversionConfig

    with pytest.raises(ValueError, match=message):
        vit.parse_field_set(items, BNInversionConfig, "--gen-set", vit.GEN_OWN_FLAGS)
    assert vit.parse_field_set(["tv_weight=2", "label_mode=mixup", "ce_weight=0.5"], BNInversionConfig, "--gen-set",
                               vit.GEN_OWN_FLAGS) == {"tv_weight": 2.0, "label_mode": "mixup", "ce_weight": 0.5}


def test_datafree_rows_of_two_methods_compare_with_their_own_real_rows(datafree):
    """A brecq row beside qdrop rows on the same set: each compares with the real-data row of its own method
    (cifar10_real.json), names its method, and the seed means keep the methods apart."""
    import json

    key, r, dkey = _row("w3a3", "dgh", "mixup", 0, 77.5, "ce0.5")
    brecq = dict(r, method="brecq")
    res = _results([(key, dict(r, method="qdrop"), dkey), (key.replace("|qdrop|", "|brecq|"), brecq, dkey)])
    res = datafree.migrate(res)
    real_rows = json.loads((BENCH / "results" / "cifar10_real.json").read_text())["rows"].values()
    real = {m: next(x["top1"] for x in real_rows if x["method"] == m and x["setting"] == "w3a3"
                    and x["first_last_bits"] == 8 and x["calib_images"] >= 1024) for m in ("qdrop", "brecq")}
    assert real["qdrop"] != real["brecq"]
    text = datafree.render_markdown(res)
    body, means = text.split("### Mean over seeds")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| w3a3")]
    assert sorted((c[-2], c[5]) for c in cells) == sorted((m, f"{v:.2f}") for m, v in real.items())
    mean_rows = [line for line in means.split("### Options")[0].splitlines() if line.startswith("| w3a3")]
    assert sorted(line.split(" | ")[4] for line in mean_rows) == ["brecq", "qdrop"]


def test_datafree_gen_set_names_the_set_and_bad_fields_fail_early(datafree):
    """--gen-set options join the variant (data name, set folder, row key) and the options section; fields the
    script owns, unknown fields and bad values are refused by the parser, before any model is opened."""
    assert datafree.variant_name(0.5, 1.0, "mixup", gen_set={"tv_weight": 2.0}) == "ce0.5-tv_weight2"
    assert datafree.variant_name(0.5, 1.0, "mixup", "energy:0.5", "bf16", {"tv_weight": 2.0, "jitter": 2}) == \
        "ce0.5-bf16-jitter2-tv_weight2-energy0.5"
    assert datafree.parse_args(["--gen-set", "tv_weight=2", "--gen-set", "jitter=2"]).gen_set == \
        {"tv_weight": 2.0, "jitter": 2}
    for bad in ("ce_weight=1", "iters=5", "nope=1", "tv_weight=x", "tv_weight=-1"):
        with pytest.raises(SystemExit):
            datafree.parse_args(["--gen-set", bad])
    o = {"method": "dgh", "label_mode": "mixup", "ce_weight": 0.5, "dirichlet_alpha": 1.0, "shard_size": 512,
         "pool_images": 512, "augment": "none", "input_prior_weight": 0.0, "filter": [], "gen_set": {"tv_weight": 2.0}}
    assert "tv_weight 2" in datafree.options_text(o)


def test_vit_set_made_by_an_earlier_run_is_not_timed(vit, tmp_path, monkeypatch):
    """A finished set found in the work dir costs ~0 s to 'generate': its time is recorded as unknown (None, shown
    as such), not as a generation time; a set made now is timed."""
    import argparse
    import json
    import types

    import dfqkern.datagen
    import dfqkern.pipeline

    def fake_generate(model, out, n, **options):
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "manifest.json").write_text("{}")

    monkeypatch.setattr(dfqkern.pipeline, "generate_bn_inversion", fake_generate)
    monkeypatch.setattr(dfqkern.datagen, "load_synthetic", lambda out, transform=None: [])
    monkeypatch.setattr(vit, "model_info", lambda m: types.SimpleNamespace(input_spec=None))
    monkeypatch.setattr(dfqkern.pipeline, "tensor_transform", lambda spec: None)
    monkeypatch.setattr(vit, "calibration_tensor", lambda ds, n, seed: ds)
    args = argparse.Namespace(gen_set={"tv_weight": 2.0}, gen_iters=50, work_dir=str(tmp_path))
    _, made = vit.calibration_images("psaq", None, None, 4, 0, args)
    _, found = vit.calibration_images("psaq", None, None, 4, 0, args)
    assert made["gen_wall_s"] is not None and found["gen_wall_s"] is None
    assert made["set"] == found["set"] and made["set"].endswith("psaq-n4-it50-s0-tv_weight2")
    committed = json.loads((BENCH / "results" / "cifar10_vit.json").read_text())
    data = {**committed, "rows": {}, "latency": None,
            "datasets": {"psaq|0|4|50|tv_weight=2": {"data": "psaq", "seed": 0, "images": 4, "gen_iters": 50,
                                                     "gen_set": {"tv_weight": 2.0}, **found}}}
    assert "| psaq tv_weight=2 | 50 | 0 | 4 | made by an earlier run, not timed |" in vit.render_markdown(data)


def test_committed_vit_rows_sit_under_their_own_keys(vit):
    """Every committed row resumes: its key is what row_key makes of it today."""
    import json

    rows = json.loads((BENCH / "results" / "cifar10_vit.json").read_text())["rows"]
    assert rows and all(vit.row_key(r) == k for k, r in rows.items())
