"""``dfqkern generate`` on the CPU: --dry-run prints the plan (images per rank, shards, batch size,
memory estimate) and writes nothing; --precision and --batch-size auto reach the manifest."""
import json
import re

import pytest

from dfqkern import cli

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
BN = ["generate", "--source", "bn-inversion", "--model", "cifar10_resnet20", "--device", "cpu"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    rc, out, err = run(capsys, *BN, "--method", "dgh", "--num-images", 64, "--batch-size", "auto", "--precision",
                       "bf16", "--dry-run", "--out", tmp_path / "set")
    assert rc == 0, err
    assert "dgh: 1 shard(s) of up to 64 images (default for dgh: the whole set)" in out
    assert "batch size 32 (auto: the CPU default)" in out and "precision bf16 on cpu" in out
    # the images of the shard with gradient and two Adam moments: 64 * 4 copies * 4 bytes * 3*32*32
    assert f"estimated {64 * 16 * 3 * 32 * 32 / 2 ** 20:.1f} MiB for the images" in out
    assert re.search(r"[0-9.]+ MiB for one batch of activations", out) and "dry run: nothing generated" in out
    assert list(tmp_path.iterdir()) == []  # no set, no run file, no lock file


def test_dry_run_shows_the_images_of_each_rank(tmp_path, capsys, monkeypatch):
    """Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the plan splits the work; the dry run
    needs no process group."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    # dgh: every shard split over the ranks by batches (4 batches of 8 per shard of 32)
    rc, out, err = run(capsys, *BN, "--method", "dgh", "--num-images", 64, "--shard-size", 32, "--batch-size", 8,
                       "--dry-run", "--out", tmp_path / "a")
    assert rc == 0, err
    assert ("2 ranks, each shard split over the ranks, its BN statistics summed over them: "
            "rank 0: 32 images in 2 shard(s), rank 1: 32 images in 2 shard(s)") in out
    assert f"estimated {16 * 16 * 3 * 32 * 32 / 2 ** 20:.1f} MiB for the images of a shard" in out  # 16 per rank
    # zeroq: whole shards round-robin (3 shards of 16, 8, ...: rank 0 shards 0 and 2)
    rc, out, err = run(capsys, *BN, "--method", "zeroq", "--num-images", 40, "--shard-size", 16, "--dry-run",
                       "--out", tmp_path / "b")
    assert rc == 0, err
    assert "whole shards dealt round-robin: rank 0: 24 images in 2 shard(s), rank 1: 16 images in 1 shard(s)" in out
    assert list(tmp_path.iterdir()) == []


def test_diffusion_dry_run(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, out, err = run(capsys, "generate", "--source", "diffusion", "--pipeline", tiny_pipeline_dir, "--classes",
                       "cifar10", "--num-images", 600, "--device", "cpu", "--batch-size", "auto", "--dry-run",
                       "--out", tmp_path / "d")
    assert rc == 0, err
    weights = sum(f.stat().st_size for f in tiny_pipeline_dir.rglob("*.safetensors"))
    assert "600 images in 3 shard(s) of up to 256" in out and "fp32 on cpu" in out
    assert "rank 0: 344 images in 2 shard(s), rank 1: 256 images in 1 shard(s)" in out
    assert f"{weights / 2 ** 20:.1f} MiB of weight files" in out and "dry run: nothing generated" in out
    assert list(tmp_path.iterdir()) == []


def test_precision_and_auto_batch_reach_the_manifest(tmp_path, capsys):
    out_dir = tmp_path / "set"
    rc, out, err = run(capsys, *BN, "--num-images", 4, "--iters", 1, "--batch-size", "auto", "--precision", "bf16",
                       "--out", out_dir)
    assert rc == 0, err
    config = json.loads((out_dir / "manifest.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["batch_size"] == 32


@pytest.mark.parametrize("argv, match", [
    (["--precision", "fp16"], "precision 'fp16' needs a CUDA device"),
    (["--batch-size", "many"], None),
])
def test_bad_generation_flags_fail_before_writing(tmp_path, capsys, argv, match):
    if match is None:  # argparse: exit code 2 with the flag named
        with pytest.raises(SystemExit):
            cli.main([*BN, "--num-images", "4", "--out", str(tmp_path / "s"), *argv])
        assert "--batch-size: expected an int or 'auto'" in capsys.readouterr().err
    else:
        rc, _, err = run(capsys, *BN, "--num-images", 4, "--iters", 1, "--out", tmp_path / "s", *argv)
        assert rc == 2 and match in err
    assert not (tmp_path / "s").exists()
