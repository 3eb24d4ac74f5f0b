"""The QAT benchmark's bookkeeping (bench/qat_cifar10.py): row keys, the generated table and its verdicts.
No model is run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the bench scripts import each other by plain name
    try:
        spec = importlib.util.spec_from_file_location("qat_cifar10", BENCH / "qat_cifar10.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _qat(setting, method, top1, start, wall=100.0, seed=0, epochs=4):
    return {"kind": "qat", "setting": setting, "method": method, "seed": seed, "epochs": epochs, "iters": 200,
            "top1": top1, "start_top1": start, "gain": round(top1 - start, 2), "wall_s": wall,
            "history": [{"epoch": 1, "g_loss": 3.0}, {"epoch": 2, "s_loss": 2.0, "kl": 1.5},
                        {"epoch": 4, "s_loss": 1.25, "kl": 0.5}]}


def test_table_is_generated_from_rows_with_verdicts(bench):
    from dfqkern.qat import METHODS

    rows = {
        "a": {"kind": "ptq", "setting": "w3a3", "method": "observer", "seed": 0, "iters": 0, "top1": 70.0,
              "wall_s": 9.0},
        "b": _qat("w3a3", "gdfq", 80.5, 70.0),               # beats its start and within 1.0 of FP 81.0
        "c": _qat("w3a3", "ait", 69.0, 70.0),                # does not beat its start
        "d": _qat("w3a3", "hast", 80.5, 70.0, wall=4000.0),  # accurate but over 30 minutes
        "e": _qat("w4a4", "akt", 75.0, 74.0),                # no target for w4a4 (first/last 8-bit)
        "f": _qat("w4a4-all", "acq", 79.0, 60.0),           # more than 1.0 below FP
    }
    res = {"fp_top1": 81.0, "dev_images": 5000, "rows": rows,
           "meta": {"epochs": 4, "iters": 200, "batch_size": 32, "warmup_epochs": 1, "start_images": 512,
                    "gen_iters": 200, "calib_iters": 1000, "threads": 2, "machine": "x", "commit": "abc"}}
    md = bench.render_markdown(res)
    table = [line for line in md.splitlines() if line.startswith("| w")]
    # settings in SETTINGS order (w4a4, w3a3, w4a4-all), PTQ rows first, then the methods' registry order
    assert [line.split(" | ")[1] for line in table] == ["akt", "observer", "gdfq", "ait", "hast", "acq"]
    assert list(METHODS).index("ait") < list(METHODS).index("hast")
    by_method = {line.split(" | ")[1]: line for line in table}
    assert by_method["gdfq"].endswith("| yes |") and "+10.50" in by_method["gdfq"]
    assert by_method["ait"].endswith("| no |") and "-1.00" in by_method["ait"]
    assert by_method["hast"].endswith("| accuracy yes, time no |")
    assert by_method["akt"].endswith("|  |")
    assert by_method["acq"].endswith("| no |")
    assert "2 -> 1.25 (kl 1.5 -> 0.5)" in by_method["gdfq"]  # first and last epoch that trained the student
    assert "4 epochs x 200 iterations" in md and "FP top-1 **81.00 %**" in md


def test_row_keys_separate_budgets_and_seeds(bench):
    keys = {bench.row_key("w3a3", "gdfq", s, e, 200) for s in (0, 1) for e in (4, 8)}
    assert len(keys) == 4
    assert bench.row_key("w3a3", "observer", 0, 0, 0) == "w3a3|observer|0|0x0"


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "1", "--warmup-epochs", "1"], "warmup_epochs"),
    (["--methods", "nope"], "nope"),
    (["--qat-set", "weight_scale_lr"], "--qat-set takes FIELD=VALUE"),
    (["--qat-set", "nope=1"], "--qat-set takes FIELD=VALUE"),
    (["--qat-set", "weight_scale_lr=x"], "weight_scale_lr takes a float"),
    (["--qat-set", "weight_scale_lr=-1"], "weight_scale_lr must be"),
    (["--qat-set", "epochs=2"], "use the script's own flag"),
    (["--replay-weight", "-1"], "replay_weight must be"),
])
def test_bad_arguments_are_refused_before_work(bench, monkeypatch, capsys, argv, msg):
    monkeypatch.setattr(bench, "open_dev", lambda *a, **k: pytest.fail("data opened before the arguments were checked"))
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert msg in capsys.readouterr().err


def test_rows_from_a_qdrop_start_have_their_own_key_and_label(bench):
    assert bench.row_key("w3a3", "gdfq", 0, 4, 200) == "w3a3|gdfq|0|4x200"  # observer start: the old key
    assert bench.row_key("w3a3", "gdfq", 0, 4, 200, "qdrop") == "w3a3|gdfq|0|4x200|from-qdrop"
    rows = {"o": _qat("w3a3", "gdfq", 72.0, 70.0),
            "q": {**_qat("w3a3", "gdfq", 80.5, 79.0), "start": "qdrop"},
            "p": {"kind": "ptq", "setting": "w3a3", "method": "qdrop", "seed": 0, "iters": 1000, "top1": 79.0,
                  "wall_s": 90.0}}
    res = {"fp_top1": 81.0, "dev_images": 5000, "rows": rows,
           "meta": {"epochs": 4, "iters": 200, "batch_size": 32, "warmup_epochs": 1, "start_images": 512,
                    "gen_iters": 200, "calib_iters": 1000, "threads": 2, "machine": "x", "commit": "abc"}}
    table = [line for line in bench.render_markdown(res).splitlines() if line.startswith("| w")]
    # observer-start rows (and PTQ rows) first, then the rows fine-tuned from QDrop
    assert [line.split(" | ")[1] for line in table] == ["qdrop", "gdfq", "gdfq (from qdrop)"]
    assert "| 79.00 | +1.50 |" in table[2] and table[2].endswith("| yes |")


def test_replay_and_qat_set_rows_have_their_own_key_and_label(bench):
    base = bench.row_key("w3a3", "acq", 0, 4, 200, "qdrop")
    replay = bench.row_key("w3a3", "acq", 0, 4, 200, "qdrop", 1.0)
    both = bench.row_key("w3a3", "acq", 0, 4, 200, "qdrop", 1.0, {"weight_scale_lr": 0.0})
    assert len({base, replay, both}) == 3 and replay == base + "|replay1"
    rows = {"r": {**_qat("w3a3", "acq", 80.0, 79.0), "start": "qdrop", "replay_weight": 1.0,
                  "qat_set": {"weight_scale_lr": 0.0, "student_lr": 1e-05}}}
    res = {"fp_top1": 81.0, "dev_images": 5000, "rows": rows,
           "meta": {"epochs": 4, "iters": 200, "batch_size": 32, "warmup_epochs": 1, "start_images": 512,
                    "gen_iters": 200, "calib_iters": 1000, "threads": 2, "machine": "x", "commit": "abc"}}
    line = [x for x in bench.render_markdown(res).splitlines() if x.startswith("| w")][0]
    assert "| acq (from qdrop, replay 1, student_lr=1e-05,weight_scale_lr=0) |" in line


def test_methods_run_with_several_seeds_get_a_mean_and_deviation(bench):
    rows = {f"a{s}": _qat("w3a3", "acq", t, 66.0, seed=s) for s, t in ((0, 74.0), (1, 72.0), (2, 73.0))}
    rows["one"] = _qat("w3a3", "akt", 73.0, 66.0)  # one seed: no summary line
    rows["q"] = {**_qat("w3a3", "acq", 78.0, 79.0), "start": "qdrop"}  # another start: its own group
    res = {"fp_top1": 81.0, "dev_images": 5000, "rows": rows,
           "meta": {"epochs": 4, "iters": 200, "batch_size": 32, "warmup_epochs": 1, "start_images": 512,
                    "gen_iters": 200, "calib_iters": 1000, "threads": 2, "machine": "x", "commit": "abc"}}
    md = bench.render_markdown(res)
    summary = md[md.index("Rows run with several seeds"):].splitlines()
    assert [x for x in summary if x.startswith("| w3a3")] == ["| w3a3 | acq | 4x200 | 3 | 73.00 ± 1.00 | 8.00 | +7.00 |"]
