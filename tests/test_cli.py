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
from dfqkern.model_info import model_info, set_info
from cli_helpers import json_block, run_cli

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture
def quantized_ckpt(tmp_path, tiny_tar_dataset, capsys):
    """``dfqkern quantize`` of a CIFAR ResNet-20 (random weights) on the 32x32 tiny tar; returns (path, summary)."""
    out = tmp_path / "r20_w4a8"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data",
                              tiny_tar_dataset["tar"], "--num-calib", 5, "--batch-size", 2, "--eval-data",
                              tiny_tar_dataset["tar"], "--out", out, "--json-out", tmp_path / "q.json",
                              "--weight-observer", "minmax", "--act-observer", "minmax")
    assert rc == 0, err
    return out, json_block(stdout), tmp_path / "q.json"


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
    res = json_block(stdout)
    assert res["top1"] == summary["quant_top1"] and res["n"] == len(tiny_tar_dataset["rows"])
    assert res["model"] == str(out) and json.loads((tmp_path / "e.json").read_text()) == res
    # --limit
    rc, stdout, _ = run_cli(capsys, "eval", "--quantized", out, "--data", tiny_tar_dataset["tar"], "--limit", 4)
    assert rc == 0 and json_block(stdout)["n"] == 4

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
    assert json_block(stdout)["scheme"] == "w8a8"
    assert model_info(load_quantized(out)).config.weight_bits == 8


def test_digits_on_image_folder_all_layers(tiny_image_folder, tmp_path, capsys):
    """A grayscale 8x8 model on a folder of odd-sized RGB images: the model's transform resizes/converts."""
    out = tmp_path / "digits"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", tiny_image_folder,
                              "--out", out, "--wbits", 2, "--abits", 4, "--all-layers", "--symmetric-weights",
                              "--skip", "fc", "--num-calib", 100)
    assert rc == 0, err
    summary = json_block(stdout)
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
    assert json_block(stdout)["scheme"] == "w4"
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
                           "--iters", 2, "--batch-size", 4, "--tv-weight", 0.5, "--out", syn)
    assert rc == 0, err
    assert f"synthetic:{syn}" in out
    manifest = json.loads((syn / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 and manifest["config"]["options"]["ce_weight"] == 0.25
    assert manifest["config"]["options"]["tv_weight"] == 0.5
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
    summary = json_block(stdout)
    calib = summary["calibration"]
    assert calib["units"] == 11 and calib["block_units"] == 9  # conv1, nine basic blocks, linear
    # 9 images: too few to hold any out, so the guard measures on the training images
    assert summary["calib_images"] == 9 and calib["heldout_images"] == 0
    assert calib["heldout_loss_final"] <= calib["heldout_loss_observer"]
    assert isinstance(calib["units_kept_start"], list) and isinstance(calib["reverted_to_observer"], bool)


def test_quantize_with_the_prediction_difference_term(tiny_tar_dataset, tmp_path, capsys):
    """``--pd-weight`` reaches the reconstruction, whose configuration the summary lists."""
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"],
                         "--num-calib", 16, "--batch-size", 4, "--method", "qdrop", "--iters", 3, "--pd-weight", 0.5,
                         "--out", tmp_path / "q")
    assert rc == 0, err
    config = json_block(stdout)["calibration"]["config"]
    assert config["pd_weight"] == 0.5 and config["method"] == "qdrop" and config["iters"] == 3


def test_trust_unverified_flag(tiny_image_folder, tmp_path, capsys):
    """``eval --quantized`` and ``info`` refuse a checkpoint they cannot verify (no config_sha256, as
    written before it existed) unless given ``--trust-unverified``; an edited one stays refused."""
    from dfqkern.config import QuantConfig
    from dfqkern.io import save_quantized
    from dfqkern.models import create_model
    from dfqkern.quantize import calibrate_activations, quantize_model

    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn", num_classes=3), QuantConfig(weight_observer="minmax", act_observer="minmax"))
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
        assert json_block(out)["arch" if argv[0] == "info" else "n"] == ("digits_cnn" if argv[0] == "info" else 7)
    meta["config_sha256"] = "0" * 64  # present and wrong: never waived
    (ck / CONFIG_FILE).write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "info", ck, "--trust-unverified")
    assert rc == 2 and "does not match its config_sha256" in err


# ----------------------------------------------------------------------------- hardening (issue 15)

def _no_model_build(monkeypatch):
    """Make building a model fail the test: the errors below must come before any work."""
    import dfqkern.models

    def built(*a, **k):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(dfqkern.models, "create_model", built)


def _one_line_error(rc, err, *needles):
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


def test_quantize_checks_arguments_and_output_before_work(monkeypatch, tmp_path, tiny_tar_dataset, capsys):
    _no_model_build(monkeypatch)
    base = ["quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"]]
    out = tmp_path / "q"
    rc, _, err = run_cli(capsys, *base, "--out", out, "--method", "qdrop", "--iters", 0)
    _one_line_error(rc, err, "iters must be a positive int, got 0")
    rc, _, err = run_cli(capsys, *base, "--out", out, "--batch-size", 0)
    _one_line_error(rc, err, "batch_size must be a positive int, got 0")
    rc, _, err = run_cli(capsys, *base, "--out", out, "--method", "qdrop", "--pd-weight", -1)
    _one_line_error(rc, err, "pd_weight must be a float >= 0, got -1.0")
    rc, _, err = run_cli(capsys, *base, "--out", out, "--pd-weight", 1)
    _one_line_error(rc, err, "pd_weight 1.0 applies to reconstruction methods, not 'observer'")
    rc, _, err = run_cli(capsys, *base, "--out", out, "--eval-data", tiny_tar_dataset["tar"], "--eval-limit", 0)
    _one_line_error(rc, err, "eval_limit")
    rc, _, err = run_cli(capsys, *base, "--out", out, "--eval-data", tmp_path / "no_eval_data")
    _one_line_error(rc, err, "does not exist", tmp_path / "no_eval_data")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc, _, err = run_cli(capsys, *base, "--out", a_file, "--overwrite")
    _one_line_error(rc, err, "is a file", a_file)
    rc, _, err = run_cli(capsys, *base, "--out", a_file / "sub")  # the parent is a file: not writable
    _one_line_error(rc, err, a_file)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    rc, _, err = run_cli(capsys, *base, "--out", mine, "--overwrite")  # never replaces a foreign directory
    _one_line_error(rc, err, "not a dfqkern checkpoint", mine)
    assert (mine / "thesis.tex").read_text() == "precious"
    with monkeypatch.context() as m:  # as a user without write permission there (the tests may run as root)
        m.setattr(os, "access", lambda *a, **k: False)
        rc, _, err = run_cli(capsys, *base, "--out", mine / "q")
    _one_line_error(rc, err, "is not writable", mine)
    rc, _, err = run_cli(capsys, *base, "--out", out, "--json-out", mine)
    _one_line_error(rc, err, "--json-out", "is a directory", mine)
    rc, _, err = run_cli(capsys, *base, "--out", out, "--json-out", a_file / "r.json")
    _one_line_error(rc, err, "--json-out", a_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine", "src", "tiny_test_jpeg.tar.gz",
                                                          "tiny_test_labels.csv"]


def test_os_errors_are_one_line_errors_naming_the_path(monkeypatch, tmp_path, capsys):
    import dfqkern.pipeline

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(dfqkern.pipeline, "run_quantize", denied)
    rc, _, err = run_cli(capsys, "quantize", "--model", "digits_cnn", "--calib-data", tmp_path, "--out", tmp_path / "q")
    _one_line_error(rc, err, "Permission denied", tmp_path / "x")


def test_eval_checks_json_out_before_work(monkeypatch, tmp_path, tiny_image_folder, capsys):
    _no_model_build(monkeypatch)
    rc, _, err = run_cli(capsys, "eval", "--model", "digits_cnn", "--data", tiny_image_folder, "--json-out", tmp_path)
    _one_line_error(rc, err, "--json-out", "is a directory")


def test_second_writer_on_the_same_out_is_refused(monkeypatch, tmp_path, tiny_tar_dataset, capsys):
    from dfqkern.outputs import OutputLock

    out = tmp_path / "q"
    args = ["quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"], "--num-calib", 2,
            "--weight-observer", "minmax", "--act-observer", "minmax", "--out", out]
    with OutputLock(out):  # another process writing the same checkpoint
        with monkeypatch.context() as m:
            _no_model_build(m)
            rc, _, err = run_cli(capsys, *args)
            _one_line_error(rc, err, "another dfqkern process", out)
            rc, _, err = run_cli(capsys, "generate", "--source", "bn-inversion", "--model", "cifar10_resnet20",
                                 "--num-images", 2, "--iters", 1, "--batch-size", 2, "--out", out)
            _one_line_error(rc, err, "another dfqkern process", out)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the lock file is gone


def test_generate_checks_options_before_the_model(monkeypatch, tmp_path, capsys):
    """``--ce-weight -1`` fails before the model is built and leaves nothing that blocks the corrected rerun."""
    syn = tmp_path / "syn"
    argv = ["generate", "--source", "bn-inversion", "--model", "cifar10_resnet20", "--num-images", 2, "--iters", 1,
            "--batch-size", 2, "--out", syn]
    with monkeypatch.context() as m:
        _no_model_build(m)
        rc, _, err = run_cli(capsys, *argv, "--ce-weight", -1)
        _one_line_error(rc, err, "ce_weight must be a number >= 0")
        rc, _, err = run_cli(capsys, *argv, "--num-images", 0)
        _one_line_error(rc, err, "num_images")
        (tmp_path / "a_file").write_text("x")
        rc, _, err = run_cli(capsys, *argv[:-1], tmp_path / "a_file")
        _one_line_error(rc, err, "is a file", tmp_path / "a_file")
        rc, _, err = run_cli(capsys, "generate", "--source", "diffusion", "--pipeline", "x", "--steps", 0,
                             "--out", syn)
        _one_line_error(rc, err, "steps must be >= 1")
    assert not syn.exists()
    rc, _, err = run_cli(capsys, *argv, "--ce-weight", 0.5)
    assert rc == 0, err
    assert json.loads((syn / "manifest.json").read_text())["config"]["options"]["ce_weight"] == 0.5


def _constant_model(arch, num_classes, answer, spec=None):
    """A stand-in classifier that always predicts class ``answer``."""
    from dfqkern.input_spec import CIFAR_SPEC

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), answer), num_classes).float() + self.w

    m = Constant()
    set_info(m, arch=arch, input_spec=spec or CIFAR_SPEC)
    return m


def test_eval_folder_with_some_classes_uses_the_model_class_names(tmp_path):
    """A folder holding only ``truck``: labelled 9 (CIFAR-10's truck), not re-indexed to 0."""
    from PIL import Image

    from dfqkern.pipeline import evaluate_on

    for i in range(2):
        (tmp_path / "d" / "truck").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / "d" / "truck" / f"{i}.png")
    res = evaluate_on(_constant_model("cifar10_resnet20", 10, 9), str(tmp_path / "d"))
    assert res["top1"] == 100.0 and res["n"] == 2
    (tmp_path / "d" / "emu").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "emu" / "0.png")
    with pytest.raises(ValueError, match=r"emu.*not .*class"):
        evaluate_on(_constant_model("cifar10_resnet20", 10, 9), str(tmp_path / "d"))
    # a model without class names: the sorted folders must be its whole class list
    for c in range(3):
        (tmp_path / "d" / f"c{c}").mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / "d" / f"c{c}" / "0.png")
    with pytest.raises(ValueError, match=r"5 class folders.*4 classes"):
        evaluate_on(_constant_model("my_net", 4, 0), str(tmp_path / "d"))


def test_eval_csv_labels_checked_against_the_model(tmp_path, tiny_tar_dataset, capsys):
    from dfqkern.pipeline import evaluate_on

    tar = tmp_path / "x_jpeg.tar.gz"
    tar.write_bytes(tiny_tar_dataset["tar"].read_bytes())
    csv_path = tmp_path / "x_labels.csv"
    csv_path.write_text("path,label_index\ntest/cat/0000.png,0\ntest/dog/0000.png,999\n")
    with pytest.raises(ValueError, match=r"x_labels\.csv.*line 3.*999.*10 classes"):
        evaluate_on(_constant_model("cifar10_resnet20", 10, 0), str(tar))
    rc, _, err = run_cli(capsys, "eval", "--model", "cifar10_resnet20", "--data", tar)
    _one_line_error(rc, err, "line 3", "999")


def test_synthetic_set_channels_must_match_the_model(tmp_path, capsys):
    from dfqkern.datagen import store as S

    writer = S.SyntheticSetWriter(tmp_path / "gray", entries=[{"classes": [0], "weights": [1.0]}] * 2, config={},
                                  meta={"num_classes": 10}, channels=1)
    S.fill_set(writer, lambda idx: [(idx, torch.zeros(len(idx), 1, 32, 32, dtype=torch.uint8))], progress=False)
    rc, _, err = run_cli(capsys, "quantize", "--model", "cifar10_resnet20", "--calib-data",
                         f"synthetic:{tmp_path / 'gray'}", "--out", tmp_path / "q")
    _one_line_error(rc, err, "1-channel", "3")


def test_quantize_resumes_after_a_kill(tiny_tar_dataset, tmp_path, capsys, caplog):
    """Killed mid-calibration, ``dfqkern quantize --method qdrop`` resumes after the finished units
    (from ``<out>.partial/``, removed on success) and writes the checkpoint an uninterrupted run writes."""
    import signal

    args = ["quantize", "--model", "cifar10_resnet20", "--calib-data", str(tiny_tar_dataset["tar"]), "--num-calib",
            "12", "--batch-size", "4", "--method", "qdrop", "--iters", "2", "--weight-observer", "minmax",
            "--act-observer", "minmax"]
    # SIGKILL right after the 4th of 11 units is saved: deterministic, and nothing gets to clean up
    killer = ("import os, signal, sys\n"
              "from dfqkern import cli\n"
              "from dfqkern.calib import reconstruct\n"
              "save = reconstruct._Checkpoint.save\n"
              "def save_then_die(self, index, unit):\n"
              "    save(self, index, unit)\n"
              "    if len(self.done) == 4:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "reconstruct._Checkpoint.save = save_then_die\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", killer, *args, "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    partial = tmp_path / "q.partial"
    assert len(json.loads((partial / "progress.json").read_text())["done"]) == 4 and not out.exists()
    rc, stdout, err = run_cli(capsys, *args, "--out", out)
    assert rc == 0, err
    assert "resuming" in caplog.text and json_block(stdout)["calibration"]["units_resumed"] == 4
    assert not partial.exists()
    rc, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "ref")
    assert rc == 0, err
    assert json_block(stdout)["calibration"]["units_resumed"] == 0
    assert (out / WEIGHTS_FILE).read_bytes() == (tmp_path / "ref" / WEIGHTS_FILE).read_bytes()
    assert (out / CONFIG_FILE).read_bytes() == (tmp_path / "ref" / CONFIG_FILE).read_bytes()


def test_stale_partial_calibration_starts_fresh(tiny_tar_dataset, tmp_path, capsys, caplog):
    """A ``<out>.partial/`` from another configuration is removed with a message, not an error."""
    args = ["quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"], "--num-calib", 4,
            "--batch-size", 2, "--method", "adaround", "--iters", 1, "--weight-observer", "minmax",
            "--act-observer", "minmax", "--out", tmp_path / "q"]
    partial = tmp_path / "q.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"version": 2, "fingerprint": "other", "done": ["conv1"]}))
    (partial / "unit_0000.safetensors").write_bytes(b"stale")
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert "starting fresh" in caplog.text and str(partial) in caplog.text
    assert json_block(stdout)["calibration"]["units_resumed"] == 0 and not partial.exists()
    partial.mkdir()
    (partial / "notes.txt").write_text("not ours")
    rc, _, err = run_cli(capsys, *args, "--overwrite")
    _one_line_error(rc, err, partial)
    assert (partial / "notes.txt").exists()


def test_backend_flag_reaches_quantize_and_eval(tiny_tar_dataset, tmp_path, capsys):
    """``--backend`` forces the kernel backend; a bad name is a usage error before any work."""
    base = ("quantize", "--model", "cifar10_resnet20", "--calib-data", tiny_tar_dataset["tar"], "--num-calib", 4,
            "--batch-size", 2)
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        run_cli(capsys, *base, "--out", tmp_path / "bad", "--backend", "tpu")
    assert exc.value.code == 2 and "backend must be one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    rc, stdout, err = run_cli(capsys, *base, "--out", tmp_path / "ref", "--backend", "reference")
    assert rc == 0, err
    rc, stdout, err = run_cli(capsys, "eval", "--quantized", tmp_path / "ref", "--data", tiny_tar_dataset["tar"],
                              "--backend", "reference")
    assert rc == 0, err
    # the cuda backend never serves CPU tensors (triton may, under TRITON_INTERPRET): forcing it must surface
    rc, _, err = run_cli(capsys, "eval", "--quantized", tmp_path / "ref", "--data", tiny_tar_dataset["tar"],
                         "--backend", "cuda")
    assert rc == 2 and "backend 'cuda'" in err
