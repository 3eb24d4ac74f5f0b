"""``dfqkern finetune`` end to end on a tiny model: packed checkpoint out, resume after a kill, errors before work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dfqkern import cli
from dfqkern.io import load_quantized


@pytest.fixture
def digits_folder(tmp_path) -> Path:
    """10 class folders (digits_cnn has 10 outputs and no class names) of 2 small solid images each."""
    from PIL import Image

    root = tmp_path / "digits"
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for j in range(2):
            Image.new("L", (8, 8), 20 * c + 7 * j).save(root / str(c) / f"{j}.png")
    return root


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _summary(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def finetune_args(data, out, *extra):
    return ["finetune", "--model", "digits_cnn", "--calib-data", data, "--num-calib", 8, "--epochs", 1,
            "--warmup-epochs", 0, "--iters", 2, "--batch-size", 4, "--wbits", 4, "--abits", 8,
            "--weight-observer", "minmax", "--act-observer", "minmax", "--out", out, *extra]


def test_finetune_writes_a_packed_checkpoint_that_loads(digits_folder, tmp_path, capsys):
    from dfqkern.datagen import load_synthetic

    out = tmp_path / "ck"
    rc, stdout, err = run(capsys, *finetune_args(digits_folder, out, "--method", "gdfq", "--eval-data", digits_folder,
                                                 "--json-out", tmp_path / "s.json", "--samples-out",
                                                 tmp_path / "samples", "--num-samples", 5))
    assert rc == 0, err
    s = _summary(stdout)
    assert s == json.loads((tmp_path / "s.json").read_text())
    assert s["method"] == "qat:gdfq" and s["scheme"] == "w4a8" and s["start"] == "observer"
    assert [h["epoch"] for h in s["history"]] == [1] and {"g_loss", "s_loss", "bns", "kl"} <= set(s["history"][0])
    assert {"fp_top1", "start_top1", "quant_top1", "drop"} <= set(s)
    model = load_quantized(out)
    assert all(m.is_packed for m in model.modules() if hasattr(m, "is_packed"))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert not Path(f"{out}.qat").exists()  # training state removed on success
    samples = load_synthetic(tmp_path / "samples")
    assert len(samples) == 5 and samples.channels == 1 and samples.num_classes == 10


def test_finetune_resumes_after_a_kill(digits_folder, tmp_path, capsys, monkeypatch):
    import dfqkern.qat.engine as engine

    args = ["--method", "qimera", "--epochs", 2]
    straight = tmp_path / "straight"
    assert run(capsys, *finetune_args(digits_folder, straight, *args))[0] == 0

    saved = engine._checkpoint

    def save_then_die(*a, **k):
        saved(*a, **k)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(engine, "_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in finetune_args(digits_folder, killed, *args)])
    capsys.readouterr()
    assert (Path(f"{killed}.qat") / "progress.json").is_file()
    monkeypatch.setattr(engine, "_checkpoint", saved)
    rc, stdout, err = run(capsys, *finetune_args(digits_folder, killed, *args))
    assert rc == 0, err
    assert _summary(stdout)["epochs_resumed"] == 1
    a, b = load_quantized(straight).state_dict(), load_quantized(killed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, msg", [
    (["--method", "hast", "--set", "focus=2"], "'focus' is not an option of method 'hast'"),
    (["--method", "hast", "--set", "focal_gamma"], "--set takes KEY=VALUE"),
    (["--epochs", 0], "epochs must be"),
    (["--warmup-epochs", 1], "warmup_epochs (1) must be below epochs (1)"),
    (["--abits", 3], "act_bits 3 has no packed kernel"),
    (["--start", "qdrop", "--start-iters", 0], "iters must be"),
    (["--replay-weight", -1], "replay_weight must be"),
])
def test_finetune_checks_arguments_before_work(digits_folder, tmp_path, capsys, monkeypatch, extra, msg):
    import dfqkern.models

    def never(*a, **k):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(dfqkern.models, "create_model", never)
    rc, _, err = run(capsys, *finetune_args(digits_folder, tmp_path / "ck", *extra))  # a later flag wins
    assert rc == 2 and msg in err and not (tmp_path / "ck").exists()


def test_finetune_refuses_an_existing_out(digits_folder, tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "x").write_text("not ours")
    rc, _, err = run(capsys, *finetune_args(digits_folder, tmp_path / "ck"))
    assert rc == 2 and "exists; pass --overwrite" in err


def test_finetune_replay_weight_reaches_the_training(digits_folder, tmp_path, capsys):
    rc, stdout, err = run(capsys, *finetune_args(digits_folder, tmp_path / "ck", "--replay-weight", 0.5))
    assert rc == 0, err
    assert "replay_kl" in _summary(stdout)["history"][0]  # the replay term ran on the calibration images
