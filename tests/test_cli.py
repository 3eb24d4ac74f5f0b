"""The ``dfqkern`` command line end to end on tiny image sets (in-process via ``cli.main`` and as a
console script in a subprocess)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfqkern import __version__, cli
from dfqkern.io import CONFIG_FILE, WEIGHTS_FILE, load_quantized

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json_block(text):
    """The JSON object a command prints (progress output may precede it)."""
    return json.loads(text[text.index("{"):])


@pytest.fixture
def quantized_ckpt(tmp_path, tiny_tar_dataset, capsys):
    """``dfqkern quantize`` of a CIFAR ResNet-20 (random weights) on the 32x32 tiny tar; returns (path, summary)."""
    out = tmp_path / "r20_w4a8"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data",
                              tiny_tar_dataset["tar"], "--num-calib", 5, "--batch-size", 2, "--eval-data",
                              tiny_tar_dataset["tar"], "--out", out, "--json-out", tmp_path / "q.json",
                              "--weight-observer", "minmax", "--act-observer", "minmax")
    assert rc == 0, err
    return out, _json_block(stdout), tmp_path / "q.json"


def test_quantize_eval_info(quantized_ckpt, tiny_tar_dataset, tmp_path, capsys):
    out, summary, json_out = quantized_ckpt
    assert json.loads(json_out.read_text()) == summary
    assert summary["model"] == "cifar10_resnet20" and summary["scheme"] == "w4a8"
    assert summary["calib_images"] == 5 and summary["method"] == "observer"
    assert 0 <= summary["quant_top1"] <= 100 and 0 <= summary["fp_top1"] <= 100
    assert summary["drop"] == pytest.approx(summary["fp_top1"] - summary["quant_top1"], abs=0.01)
    assert sorted(os.listdir(out)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left

    # eval of the packed checkpoint reproduces the quantized accuracy exactly (bit-identical reload)
    rc, stdout, err = run_cli(capsys, "eval", "--quantized", out, "--data", tiny_tar_dataset["tar"], "--json-out",
                              tmp_path / "e.json")
    assert rc == 0, err
    res = _json_block(stdout)
    assert res["top1"] == summary["quant_top1"] and res["n"] == len(tiny_tar_dataset["rows"])
    assert res["model"] == str(out) and json.loads((tmp_path / "e.json").read_text()) == res
    # --limit
    rc, stdout, _ = run_cli(capsys, "eval", "--quantized", out, "--data", tiny_tar_dataset["tar"], "--limit", 4)
    assert rc == 0 and _json_block(stdout)["n"] == 4

    rc, stdout, err = run_cli(capsys, "info", out)
    assert rc == 0, err
    assert "arch=cifar10_resnet20 scheme=w4a8" in stdout and f"dfqkern {__version__}" in stdout
    assert re.search(r"^conv1\s+conv2d\s+8\s+8", stdout, re.M)
    assert re.search(r"^layer2\.0\.conv1\s+conv2d\s+4\s+8", stdout, re.M)
    assert re.search(r"^linear\s+linear\s+8\s+8", stdout, re.M)
    m = re.search(r"size: ([\d.]+) KiB packed vs ([\d.]+) KiB float \(([\d.]+)x smaller\)", stdout)
    assert m and float(m.group(3)) > 3  # mostly 4-bit weights: about 4-8x smaller than fp32
    rc, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert rc == 0 and info["scheme"] == "w4a8" and info["compression"] == pytest.approx(float(m.group(3)), abs=0.01)


def test_overwrite_refusal(quantized_ckpt, tiny_tar_dataset, capsys):
    out, _, _ = quantized_ckpt
    before = (out / WEIGHTS_FILE).read_bytes()
    args = ["quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"], "--num-calib", 3,
            "--out", out, "--wbits", 8, "--weight-observer", "minmax", "--act-observer", "minmax"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "exists; pass --overwrite" in err and str(out) in err
    assert (out / WEIGHTS_FILE).read_bytes() == before
    rc, stdout, err = run_cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert _json_block(stdout)["scheme"] == "w8a8"
    assert load_quantized(out).dfqkern_config.weight_bits == 8


def test_digits_on_image_folder_all_layers(tiny_image_folder, tmp_path, capsys):
    """A grayscale 8x8 model on a folder of odd-sized RGB images: the model's transform resizes/converts."""
    out = tmp_path / "digits"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", tiny_image_folder,
                              "--out", out, "--wbits", 2, "--abits", 4, "--all-layers", "--symmetric-weights",
                              "--skip", "fc", "--num-calib", 100)
    assert rc == 0, err
    summary = _json_block(stdout)
    assert summary["scheme"] == "w2a4" and summary["calib_images"] == 7  # min(num_calib, images found)
    assert summary["unhandled"] == {"fc": "skipped by config"}
    model = load_quantized(out)
    assert type(model.fc) is torch.nn.Linear
    assert {(m.lq.weight_bits, m.lq.act_bits) for m in model.modules() if hasattr(m, "lq")} == {(2, 4)}
    assert all(int(m.w_zero[0]) == 2 for m in model.modules() if hasattr(m, "w_zero"))  # symmetric 2-bit


def test_weight_only_and_per_token_flags(tiny_tar_dataset, tmp_path, capsys):
    out = tmp_path / "wo"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data",
                              tiny_tar_dataset["tar"], "--out", out, "--abits", "none", "--per-token",
                              "--num-calib", 2, "--weight-observer", "minmax")
    assert rc == 0, err
    assert _json_block(stdout)["scheme"] == "w4"
    model = load_quantized(out)
    assert all(m.a_quant is None for m in model.modules() if hasattr(m, "a_quant"))


def test_errors(tmp_path, tiny_tar_dataset, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "quantize", "--model", "nope_net", "--calib-data", tiny_tar_dataset["tar"],
                         "--out", out)
    assert rc == 2 and "unknown model name 'nope_net'" in err and "cifar10_resnet20" in err
    rc, _, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", empty, "--out", out)
    assert rc == 2 and "contains no images" in err and str(empty) in err
    rc, _, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", tmp_path / "missing",
                         "--out", out)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", empty, "--out", out,
                         "--wbits", 5)
    assert rc == 2 and "weight_bits must be one of (2, 3, 4, 8), got 5" in err
    rc, _, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", empty, "--out", out,
                         "--num-calib", 0)
    assert rc == 2 and "num_calib must be positive" in err
    assert not out.exists() and not any(p.name.startswith(("never", ".never")) for p in tmp_path.iterdir())
    rc, _, err = run_cli(capsys, "eval", "--model", "timm:no_such_model_xyz", "--data", tiny_tar_dataset["tar"])
    assert rc == 2 and "no_such_model_xyz" in err
    rc, _, err = run_cli(capsys, "info", tmp_path / "nothing")
    assert rc == 2 and "is not a directory" in err
    with pytest.raises(SystemExit, match="give exactly one of --model"):
        cli.main(["eval", "--data", str(tiny_tar_dataset["tar"])])
    with pytest.raises(SystemExit) as e:  # argparse: bad choice
        cli.main(["quantize", "--model", "x", "--calib-data", "y", "--out", "z", "--method", "magic"])
    assert e.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_console_script_subprocess(quantized_ckpt):
    """The installed entry point (or ``python -m dfqkern.cli``) behaves like ``cli.main``."""
    out, _, _ = quantized_ckpt
    exe = shutil.which("dfqkern", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "dfqkern.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"dfqkern {__version__}"
    r = subprocess.run(cmd + ["info", str(out), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "cifar10_resnet20"
    r = subprocess.run(cmd + ["info", str(out / "nope")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "error" in r.stderr


@pytest.mark.slow
def test_demo(tmp_path):
    """``dfqkern demo`` offline (about 1 CPU-minute: trains the digits CNN, data-free calibration)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DFQKERN_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "dfqkern.cli", "demo", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(w\d+a\d+)\s+\S+\s+([\d.]+)%\s+([\d.]+)%", r.stdout, re.M)}
    assert "w8a8" in rows
    fp, q8 = rows["w8a8"]
    assert fp > 90 and fp - q8 < 5  # a trained digits CNN; W8A8 stays close
    ckpts = [p for p in out.iterdir() if (p / CONFIG_FILE).is_file()]
    assert len(ckpts) == len(rows)
    x = torch.zeros(2, 1, 8, 8)
    for p in ckpts:
        assert load_quantized(p)(x).shape == (2, 10)
    assert any((tmp_path / "cache").iterdir())  # the trained float model is cached


def test_generate_bn_inversion_then_quantize_on_it(tmp_path, tiny_tar_dataset, capsys):
    """``dfqkern generate --source bn-inversion`` writes a synthetic set with the options it was
    given (recorded in the manifest) that ``quantize --calib-data synthetic:DIR`` consumes."""
    syn = tmp_path / "syn"
    rc, out, err = run_cli(capsys, "generate", "--source", "bn-inversion", "--model", "cifar10_resnet20",
                           "--method", "dgh", "--label-mode", "mixup", "--ce-weight", 0.25, "--num-images", 4,
                           "--iters", 2, "--batch-size", 4, "--out", syn)
    assert rc == 0, err
    assert f"synthetic:{syn}" in out
    manifest = json.loads((syn / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 and manifest["config"]["options"]["ce_weight"] == 0.25
    assert all(len(e["classes"]) == 2 for e in manifest["images"])
    rc, out, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data", f"synthetic:{syn}",
                           "--num-calib", 4, "--batch-size", 2, "--out", tmp_path / "q",
                           "--weight-observer", "minmax", "--act-observer", "minmax")
    assert rc == 0, err
    assert (tmp_path / "q" / WEIGHTS_FILE).exists()


def test_quantize_with_reconstruction_reports_the_guard(tiny_tar_dataset, tmp_path, capsys):
    """``--method qdrop`` prints what the held-out guard measured and did, per run."""
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data",
                              tiny_tar_dataset["tar"], "--num-calib", 16, "--batch-size", 4, "--method", "qdrop",
                              "--iters", 3, "--out", tmp_path / "q")
    assert rc == 0, err
    summary = _json_block(stdout)
    calib = summary["calibration"]
    assert calib["units"] == 11 and calib["block_units"] == 9  # conv1, nine basic blocks, linear
    # 9 images: too few to hold any out, so the guard measures on the training images
    assert summary["calib_images"] == 9 and calib["heldout_images"] == 0
    assert calib["heldout_loss_final"] <= calib["heldout_loss_observer"]
    assert isinstance(calib["units_kept_start"], list) and isinstance(calib["reverted_to_observer"], bool)


def test_trust_unverified_flag(tiny_image_folder, tmp_path, capsys):
    """``eval --quantized`` and ``info`` refuse a checkpoint they cannot verify (no config_sha256, as
    written before it existed) unless given ``--trust-unverified``; an edited one stays refused."""
    from dfqkern.config import QuantConfig
    from dfqkern.io import save_quantized
    from dfqkern.models import create_model
    from dfqkern.quantize import calibrate_activations, quantize_model

    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn"), QuantConfig(weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(8, 1, 8, 8), progress=False)
    ck = save_quantized(q, tmp_path / "old")
    meta = json.loads((ck / CONFIG_FILE).read_text())
    del meta["config_sha256"]
    (ck / CONFIG_FILE).write_text(json.dumps(meta))
    for argv in (["info", ck, "--json"], ["eval", "--quantized", ck, "--data", tiny_image_folder]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and "--trust-unverified" in err and str(ck / CONFIG_FILE) in err, err
        with pytest.warns(UserWarning, match="unverified"):
            rc, out, err = run_cli(capsys, *argv, "--trust-unverified")
        assert rc == 0, err
        assert _json_block(out)["arch" if argv[0] == "info" else "n"] == ("digits_cnn" if argv[0] == "info" else 7)
    meta["config_sha256"] = "0" * 64  # present and wrong: never waived
    (ck / CONFIG_FILE).write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "info", ck, "--trust-unverified")
    assert rc == 2 and "does not match its config_sha256" in err
