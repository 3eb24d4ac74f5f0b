"""``dfqkern report RUN --out DIR``: end to end on a tiny run, the argument errors (each naming its
argument, nothing written), and the error without matplotlib (the report extra)."""
from __future__ import annotations

import json
import sys

import pytest

import dfqkern
from dfqkern.pipeline import evaluate_on

from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_cli_end_to_end(tiny_run, tiny_image_folder, tiny_tar_dataset, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    summary = tmp_path / "q.json"
    summary.write_text(json.dumps({"out": "moved/elsewhere", "method": "observer", "fp_top1": 80.0,
                                   "quant_top1": 77.5, "drop": 2.5, "calibration": {"units": 4}}))
    rc, stdout, err = run_cli(capsys, "report", tiny_run["ck4"], "--out", out, "--checkpoint", tiny_run["weights"],
                              "--synthetic", tiny_run["synthetic"], "--summary", summary, "--format", "md")
    assert rc == 0, err
    assert "report of 1 checkpoint(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["act_ranges_ck_w4a8.png", "report.json", "report.md",
                                                     "samples.png", "sqnr.png"]
    rep = json.loads((out / "report.json").read_text())
    run = rep["runs"][0]
    assert run["accuracy"] == {"fp_top1": 80.0, "quant_top1": 77.5, "drop": 2.5, "source": "recorded by the run"}
    assert run["recorded"] == {"method": "observer", "calibration": {"units": 4}}
    assert all(r["weight_sqnr_db"] > 15 for r in run["layers"])  # the float model was rebuilt from --checkpoint
    # no --calib-data: the synthetic set's images probe the models
    assert rep["inputs"]["probe_images"] == f"3 images of `synthetic:{tiny_run['synthetic']}`"
    assert "| ck_w4a8 | w4a8 | observer | 80.00 | 77.50 | 2.50 |" in (out / "report.md").read_text()

    rc, stdout, err = run_cli(capsys, "report", tiny_run["ck4"], "--out", out, "--overwrite", "--checkpoint",
                              tiny_run["weights"], "--eval-data", tiny_tar_dataset["tar"], "--calib-data",
                              tiny_image_folder, "--num-calib", 4, "--format", "html")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    run = json.loads((out / "report.json").read_text())["runs"][0]
    data = str(tiny_tar_dataset["tar"])
    measured = evaluate_on(dfqkern.load_quantized(tiny_run["ck4"]), data)
    assert run["accuracy"]["quant_top1"] == measured["top1"] and run["accuracy"]["source"] == "evaluated now"
    assert run["accuracy"]["n"] == len(tiny_tar_dataset["rows"])
    assert run["accuracy"]["fp_top1"] == evaluate_on(tiny_run["fp"], data)["top1"]
    assert run["probe"]["images"] == 4


def _error(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, "report", *argv)
    assert rc == 2, err
    return err


def test_report_argument_errors(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ck, out = tiny_run["ck4"], tmp_path / "rep"
    assert "run (RUN)" in _error(capsys, tmp_path / "missing", "--out", out)
    assert "neither a packed checkpoint" in _error(capsys, tmp_path, "--out", out)
    not_a_set = tmp_path / "syn"
    not_a_set.mkdir()
    assert "synthetic (--synthetic)" in (e := _error(capsys, ck, "--out", out, "--synthetic", not_a_set)) \
        and "no manifest.json" in e
    assert "calib_data (--calib-data)" in _error(capsys, ck, "--out", out, "--calib-data", tmp_path / "nope")
    assert "would generate images" in _error(capsys, ck, "--out", out, "--calib-data", "bn-inversion:dgh")
    assert "summary (--summary)" in _error(capsys, ck, "--out", out, "--summary", tmp_path / "nope.json")
    assert "num_calib (--num-calib)" in _error(capsys, ck, "--out", out, "--num-calib", -1)
    assert "eval_data (--eval-data)" in _error(capsys, ck, "--out", out, "--eval-data", tmp_path / "nope")
    assert "is the run itself" in _error(capsys, ck, "--out", ck, "--overwrite")
    with pytest.raises(SystemExit, match="--model digits_cnn without --checkpoint or --pretrained"):
        run_cli(capsys, "report", ck, "--out", out, "--model", "digits_cnn")
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "report", ck, "--out", out, "--format", "pdf")
    assert e.value.code == 2
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "out (--out)" in (e := _error(capsys, ck, "--out", out)) and "pass --overwrite" in e
    assert "not a dfqkern report" in _error(capsys, ck, "--out", out, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "syn"]  # no temporary directory or lock left


def test_report_without_matplotlib(tiny_run, tmp_path, capsys, monkeypatch):
    """Without the extra, ``dfqkern report`` stops first (before even the RUN check), naming the extra; the
    demo says its report was skipped and why."""
    from dfqkern.demo import write_demo_report
    from dfqkern.report import ReportJob

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "rep"
    for run in (tiny_run["ck4"], tmp_path / "missing"):
        with pytest.raises(SystemExit, match=r"needs matplotlib: pip install dfqkern\[report\]"):
            run_cli(capsys, "report", run, "--out", out)
    with pytest.raises(ImportError, match=r"dfqkern\[report\]"):
        ReportJob(run=tiny_run["ck4"], out=out)
    lines = []
    assert write_demo_report(tmp_path, tiny_run["fp"], tiny_run["images"], tiny_run["synthetic"], [],
                             print_fn=lines.append) is None
    assert lines == ["report skipped: the report needs matplotlib: pip install dfqkern[report]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
