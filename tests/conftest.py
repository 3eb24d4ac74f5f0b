"""Shared fixtures: the real CIFAR-10 data (by path, skipped when absent) and tiny image sets."""
from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest
import torch

CIFAR10_FILES = ("resnet20-12fca82f.th", "cifar10_test_dev_jpeg.tar.gz", "cifar10_test_dev_labels.csv")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """``shared/data/cifar10`` (override with $DFQKERN_CIFAR10_DIR); skips when it is absent."""
    from dfqkern.data import CIFAR10_ENV, default_cifar10_dir

    d = default_cifar10_dir()
    absent = [f for f in CIFAR10_FILES if not (d / f).is_file()]
    if absent:
        pytest.skip(f"real CIFAR-10 data not found: {absent} missing under {d} (set ${CIFAR10_ENV})")
    return d


def _png(path: Path, color, size=(10, 12), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


TINY_CLASSES = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


@pytest.fixture
def tiny_image_folder(tmp_path) -> Path:
    """root/{cat,dog,emu}/{0,1}.png, solid colors of odd sizes (so the resize path runs), plus a
    grayscale image and a non-image file that must be ignored."""
    root = tmp_path / "folder"
    for name, color in TINY_CLASSES.items():
        for i in range(2):
            _png(root / name / f"{i}.png", color, size=(10 + i, 12))
    _png(root / "dog" / "nested" / "2.png", 128, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tiny_tar_dataset(tmp_path) -> dict:
    """``tiny_test_jpeg.tar.gz`` holding ``test/<class>/NNNN.png`` (32x32) in the CIFAR format, and
    the sibling ``tiny_test_labels.csv`` (path,label_index,label_name) listing it in csv order."""
    src = tmp_path / "src"
    rows = []
    for label, (name, color) in enumerate(sorted(TINY_CLASSES.items())):
        for i in range(3):
            rel = f"test/{name}/{i:04d}.png"
            _png(src / rel, tuple((c + 10 * i) % 256 for c in color), size=(32, 32))
            rows.append((rel, label, name))
    rows = rows[::-1]  # csv order differs from the tar's and from sorted order: it must win
    tar_path = tmp_path / "tiny_test_jpeg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src / "test", arcname="test")
    csv_path = tmp_path / "tiny_test_labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label_index", "label_name"])
        w.writerows(rows)
    return {"tar": tar_path, "csv": csv_path, "rows": rows, "classes": sorted(TINY_CLASSES)}


@pytest.fixture
def one_thread():
    """Tiny tensors: with two OpenMP threads on a busy shared CPU, spinning threads made tests 10x slower
    than one thread (measured). Restored afterwards. Folders opt in with ``usefixtures``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
