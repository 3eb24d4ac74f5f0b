"""bench/train_cifar_vit.py without training: its schedule and its argument checks (the training itself is a
90-minute run; its smoke mode is measured by hand, see the script's docstring)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "train_cifar_vit.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_cifar_vit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_warmup_then_cosine(train):
    total, warmup, peak = 100, 10, 2e-3
    for step in range(total):
        want = peak * (step + 1) / warmup if step < warmup else \
            peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert train.lr_at(step, total, warmup, peak) == pytest.approx(want)


@pytest.mark.parametrize("argv,match", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "many"], "--epochs must be an int or 'auto'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--label-smoothing", "1.5"], "--label-smoothing in"),
    (["--train-limit", "10"], "--train-limit must be >= --batch-size"),
    (["--data-dir", "/nonexistent"], "--data-dir: /nonexistent/cifar10_train_jpeg.tar.gz does not exist"),
])
def test_bad_arguments_fail_before_work(train, argv, match, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert match in capsys.readouterr().err
