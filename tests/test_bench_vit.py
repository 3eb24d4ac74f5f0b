"""bench/vit_cifar10.py end to end on a tiny setting: a random-weight CIFAR ViT, six tiny images as both CIFAR
files, one setting, observer + QDrop at two seeds, a data-free source reported as unavailable, batch-1 latency
in the child process; the table is regenerated from the JSON and a rerun resumes every row."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_bench_tables import _bench_module


@pytest.fixture(scope="module")
def vit_bench():
    return _bench_module("vit_cifar10")


def test_tiny_run_rows_skips_latency_and_resume(vit_bench, tiny_tar_dataset, tmp_path, monkeypatch, one_thread):
    from dfqkern.vit_nets import CifarViT

    data = tmp_path / "cifar"
    data.mkdir()
    shutil.copy(tiny_tar_dataset["tar"], data / "cifar10_test_dev_jpeg.tar.gz")
    shutil.copy(tiny_tar_dataset["csv"], data / "cifar10_test_dev_labels.csv")
    shutil.copy(tiny_tar_dataset["tar"], data / "cifar10_train_jpeg.tar.gz")
    torch.manual_seed(0)
    weights = tmp_path / "vit.pt"
    torch.save(CifarViT("qkv").state_dict(), weights)
    monkeypatch.setattr(vit_bench, "datafree_unavailable", lambda m: f"{m} is not here yet")
    out = tmp_path / "res" / "vit"
    argv = ["--data-dir", str(data), "--weights", str(weights), "--settings", "w8a8", "--methods", "observer,qdrop",
            "--data", "real,dfq-vit", "--seeds", "0,1", "--calib-images", "6", "--iters", "2", "--batch-size", "3",
            "--latency", "packed,compiled,eager", "--warmup", "1", "--repeats", "2", "--threads", "1", "--out", str(out),
            "--work-dir", str(tmp_path / "work")]
    assert vit_bench.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    keys = sorted(res["rows"])
    assert keys == sorted(["w8a8|observer|real|noln|6|0|0", "w8a8|qdrop|real|noln|6|2|0", "w8a8|qdrop|real|noln|6|2|1"])
    assert res["skipped"] == {"dfq-vit": "dfq-vit is not here yet"}
    assert set(res["latency"]["timings"]) == {"packed-w8a8", "compiled-w8a8", "eager"}
    assert all(t["median_ms"] > 0 for t in res["latency"]["timings"].values())
    md = out.with_suffix(".md").read_text()
    assert md == vit_bench.render_markdown(res) + "\n"  # generated from the JSON, not typed
    assert "python bench/vit_cifar10.py --data-dir" in md and "`dfq-vit`: dfq-vit is not here yet" in md
    assert "| w8a8 | real | qdrop | 2 | off |  | 0,1 |" in md  # iterations per unit: a column, not the header's
    assert "package commit" in md and res["latency"]["cpu"]  # a timing names its machine and commit

    def refuse(*a, **k):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(vit_bench, "run_row", refuse)
    monkeypatch.setattr(vit_bench, "run_latency", refuse)
    assert vit_bench.main(argv) == 0  # resumes: every row and the latency (same CPU, same commit) are in the JSON
    again = json.loads(out.with_suffix(".json").read_text())
    assert sorted(again["rows"]) == keys and again["latency"] == res["latency"]
    again["latency"]["commit"] = "another"  # a timing of other code is not kept
    out.with_suffix(".json").write_text(json.dumps(again))
    timed = []
    monkeypatch.setattr(vit_bench, "run_latency", lambda args, packed: timed.append(sorted(packed)) or res["latency"])
    assert vit_bench.main(argv) == 0  # timed again; the rows still resume
    assert timed == [["w8a8"]]
