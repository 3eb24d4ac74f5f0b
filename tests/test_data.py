"""Image folders, tar + csv datasets, transforms and calibration subsets."""
from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dfqkern.data import (ImageFolderDataset, _scaled, TarImageDataset, build_transform, calibration_tensor,
                          default_cifar10_dir, digits_dataset, find_labels_csv, open_dataset, random_subset)
from dfqkern.models import InputSpec, input_spec

RGB4 = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 4, 4))
GRAY4 = InputSpec(mean=(0.5,), std=(0.5,), input_size=(1, 4, 4))


# ----------------------------------------------------------------------------- transforms

def test_transform_normalizes_exactly():
    img = Image.new("RGB", (4, 4), (255, 0, 51))
    x = build_transform(RGB4)(img)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.2]) - 0.5) / 0.25
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)


def test_transform_passes_matching_size_untouched():
    # A pixel pattern that any resampling would blur: it must come through bit-exact.
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    img = Image.fromarray(pixels.numpy())
    spec = input_spec("cifar10_resnet20")
    x = build_transform(spec)(img)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    assert torch.allclose(x * std + mean, pixels.permute(2, 0, 1).float() / 255, atol=1e-6)


def test_transform_resizes_center_crops_and_converts_channels():
    # 20x10 (W x H) image: left half black, right half white. Resize shorter side to 8/0.5 = 16,
    # center crop 8x8 -> only the middle of the image, half black, half white.
    img = Image.new("RGB", (20, 10))
    img.paste((255, 255, 255), (10, 0, 20, 10))
    spec = InputSpec(mean=(0.0,), std=(1.0,), input_size=(1, 8, 8), crop_pct=0.5, interpolation="nearest")
    x = build_transform(spec)(img)
    assert x.shape == (1, 8, 8)
    assert torch.equal(x[0, :, :4], torch.zeros(8, 4)) and torch.equal(x[0, :, 4:], torch.ones(8, 4))
    # grayscale -> RGB
    assert build_transform(RGB4)(Image.new("L", (6, 6), 255)).shape == (3, 4, 4)


def test_transform_non_square_target():
    spec = InputSpec(mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(3, 6, 10))
    assert build_transform(spec)(Image.new("RGB", (7, 13))).shape == (3, 6, 10)


@given(crop=st.integers(1, 1024), extra=st.integers(0, 512))
def test_resize_size_recovered_from_crop_pct(crop, extra):
    # torchvision specs store crop_pct = crop / resize; the resize size must come back exactly.
    assert _scaled(crop, crop / (crop + extra)) == crop + extra


def test_torchvision_resize_then_crop():
    spec = input_spec("torchvision:mobilenet_v2")  # resize 232, crop 224
    img = Image.new("RGB", (464, 300))
    img.paste((255, 255, 255), (0, 0, 464, 16))  # a white band: 16/300*232 = 12.4 rows after resize,
    x = build_transform(spec)(img)  # of which (232 - 224) / 2 = 4 are cropped away
    white = (x[0] > 0).float().mean(dim=1)
    assert x.shape == (3, 224, 224) and 7 <= int(white.sum()) <= 9


def test_build_transform_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        build_transform(InputSpec(mean=(0.0,) * 2, std=(1.0,) * 2, input_size=(2, 4, 4)))
    with pytest.raises(TypeError, match="spec"):
        build_transform({"mean": (0.5,)})


# ----------------------------------------------------------------------------- image folders

def test_image_folder_classes_and_labels(tiny_image_folder):
    ds = ImageFolderDataset(tiny_image_folder, build_transform(RGB4))
    assert ds.classes == ["cat", "dog", "emu"]
    assert len(ds) == 7  # notes.txt ignored, nested/2.png included
    assert ds.targets == [0, 0, 1, 1, 1, 2, 2]
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 4, 4)
        if Path(ds.samples[i][0]).parent.name != "nested":  # solid colors survive resize exactly
            color = torch.tensor(Image.open(ds.samples[i][0]).getpixel((0, 0))) / 255
            assert torch.allclose(x[:, 2, 2], (color - 0.5) / 0.25, atol=1e-5)


def test_image_folder_flat_is_unlabeled(tmp_path):
    for i in range(3):
        Image.new("L", (5, 5), i * 50).save(tmp_path / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, build_transform(GRAY4))
    assert len(ds) == 3 and ds.targets == [-1, -1, -1] and ds.classes == []
    x, label = ds[1]
    assert label == -1 and torch.allclose(x, torch.full((1, 4, 4), (50 / 255 - 0.5) / 0.5), atol=1e-6)


def test_image_folder_without_transform_returns_pil(tiny_image_folder):
    img, label = ImageFolderDataset(tiny_image_folder)[0]
    assert isinstance(img, Image.Image) and img.size == (10, 12) and label == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"root .*missing_dir.* not an existing directory"):
        ImageFolderDataset(tmp_path / "missing_dir")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"root .*empty.* contains no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_corrupt_image_names_the_file(tiny_image_folder):
    bad = tiny_image_folder / "emu" / "9_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolderDataset(tiny_image_folder, build_transform(RGB4))
    i = [str(p) for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ValueError, match=r"corrupt image .*9_broken\.png"):
        ds[i]
    # a truncated JPEG (header fine, data cut) is caught at decode time too
    buf = tiny_image_folder / "emu" / "8_cut.jpg"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[:200])
    ds = ImageFolderDataset(tiny_image_folder, build_transform(RGB4))
    i = [str(p) for p, _ in ds.samples].index(str(buf))
    with pytest.raises(ValueError, match=r"8_cut\.jpg"):
        ds[i]


# ----------------------------------------------------------------------------- tar datasets

def test_tar_with_csv_follows_csv_order(tiny_tar_dataset):
    t = tiny_tar_dataset
    ds = TarImageDataset(t["tar"], t["csv"], build_transform(RGB4))
    assert [s[0] for s in ds.samples] == [r[0] for r in t["rows"]]
    assert ds.targets == [r[1] for r in t["rows"]]
    assert ds.classes == t["classes"]
    x, label = ds[0]
    assert x.shape == (3, 4, 4) and label == t["rows"][0][1]


def test_tar_without_csv_labels_from_folders(tiny_tar_dataset):
    ds = TarImageDataset(tiny_tar_dataset["tar"])
    assert ds.classes == ["cat", "dog", "emu"]
    assert [s[0] for s in ds.samples] == sorted(r[0] for r in tiny_tar_dataset["rows"])
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img, _ = ds[4]
    assert isinstance(img, Image.Image) and img.getpixel((0, 0)) == (40, 210, 40)  # dog, i=1


def test_tar_indices_and_limit_keep_only_picked_bytes(tiny_tar_dataset):
    full = TarImageDataset(tiny_tar_dataset["tar"], tiny_tar_dataset["csv"])
    sub = TarImageDataset(tiny_tar_dataset["tar"], tiny_tar_dataset["csv"], indices=[7, 2, 5], limit=2)
    assert sub.samples == [full.samples[7], full.samples[2]]
    assert set(sub._blobs) == {full.samples[7][0], full.samples[2][0]}
    assert sub[1][0].tobytes() == full[2][0].tobytes()
    with pytest.raises(ValueError, match="indices"):
        TarImageDataset(tiny_tar_dataset["tar"], indices=[9])
    with pytest.raises(ValueError, match="limit"):
        TarImageDataset(tiny_tar_dataset["tar"], limit=0)


def test_tar_top_level_files_unlabeled(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with tarfile.open(tmp_path / "flat.tar", "w") as tar:
        tar.add(tmp_path / "a.png", arcname="a.png")
    ds = open_dataset(tmp_path / "flat.tar")
    assert ds.targets == [-1] and ds.classes == []


def test_tar_errors(tmp_path, tiny_tar_dataset):
    t = tiny_tar_dataset
    with pytest.raises(ValueError, match=r"tar_path .*absent\.tar"):
        TarImageDataset(tmp_path / "absent.tar")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(t["tar"].read_bytes()[:300])
    with pytest.raises(ValueError, match=r"tar_path .*cut\.tar\.gz.*truncated or corrupt"):
        TarImageDataset(cut)
    empty = tmp_path / "empty.tar"
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(empty, "w") as tar:
        tar.add(tmp_path / "x.txt", arcname="x.txt")
    with pytest.raises(ValueError, match=r"empty\.tar.*no images"):
        TarImageDataset(empty)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,label\na.png,0\n")
    with pytest.raises(ValueError, match=r"labels_csv .*bad\.csv.*label_index"):
        TarImageDataset(t["tar"], bad_csv)
    stray = tmp_path / "stray.csv"
    stray.write_text("path,label_index\ntest/cat/0000.png,0\ntest/cat/9999.png,0\n")
    with pytest.raises(ValueError, match=r"stray\.csv.*test/cat/9999\.png"):
        TarImageDataset(t["tar"], stray)
    nonint = tmp_path / "nonint.csv"
    nonint.write_text("path,label_index\ntest/cat/0000.png,cat\n")
    with pytest.raises(ValueError, match=r"nonint\.csv.*line 2"):
        TarImageDataset(t["tar"], nonint)
    with pytest.raises(ValueError, match=r"labels_csv .*nothere\.csv"):
        TarImageDataset(t["tar"], tmp_path / "nothere.csv")


def test_tar_corrupt_member_names_it(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "c" / "bad.jpg", arcname="c/bad.jpg")
    ds = TarImageDataset(tmp_path / "b.tar.gz")
    with pytest.raises(ValueError, match=r"b\.tar\.gz:c/bad\.jpg"):
        ds[0]


# ----------------------------------------------------------------------------- open_dataset

def test_open_dataset_dispatch_and_sibling_csv(tiny_image_folder, tiny_tar_dataset):
    assert isinstance(open_dataset(tiny_image_folder), ImageFolderDataset)
    # tiny_test_jpeg.tar.gz -> tiny_test_labels.csv (the "_jpeg" rule, as for CIFAR)
    assert find_labels_csv(tiny_tar_dataset["tar"]) == tiny_tar_dataset["csv"]
    ds = open_dataset(tiny_tar_dataset["tar"], transform=build_transform(RGB4))
    assert ds.labels_csv == tiny_tar_dataset["csv"]
    assert ds.targets == [r[1] for r in tiny_tar_dataset["rows"]]
    assert len(open_dataset(tiny_tar_dataset["tar"], limit=4)) == 4
    assert len(open_dataset(tiny_image_folder, limit=3)) == 3


def test_open_dataset_stem_csv(tmp_path, tiny_tar_dataset):
    tar = tmp_path / "other.tgz"
    tar.write_bytes(tiny_tar_dataset["tar"].read_bytes())
    with open(tmp_path / "other_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label_index"])
        w.writerow(["test/emu/0002.png", 5])
    ds = open_dataset(tar)
    assert ds.targets == [5] and ds.classes == ["0", "1", "2", "3", "4", "5"]


def test_open_dataset_errors(tmp_path, tiny_image_folder):
    with pytest.raises(ValueError, match=r"spec .*nowhere.* does not exist"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"spec .*file\.zip"):
        open_dataset(tmp_path / "file.zip")
    with pytest.raises(ValueError, match="labels_csv"):
        open_dataset(tiny_image_folder, labels_csv=tmp_path / "x.csv")


# ----------------------------------------------------------------------------- subsets

@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 200), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_random_subset_is_distinct_and_deterministic(size, frac, seed):
    data = list(range(size))
    n = max(1, int(size * frac))
    a, b = random_subset(data, n, seed), random_subset(data, n, seed)
    assert a.indices == b.indices and len(a) == n and len(set(a.indices)) == n
    assert all(0 <= i < size for i in a.indices)


def test_random_subset_seed_changes_choice():
    data = list(range(1000))
    assert random_subset(data, 50, 0).indices != random_subset(data, 50, 1).indices


def test_subset_errors():
    with pytest.raises(ValueError, match=r"n=11 exceeds.*10"):
        random_subset(list(range(10)), 11, 0)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must be a positive int"):
            calibration_tensor(list(range(10)), bad, 0)


def test_calibration_tensor(tiny_image_folder):
    ds = ImageFolderDataset(tiny_image_folder, build_transform(RGB4))
    x = calibration_tensor(ds, 5, seed=3, batch_size=2)
    assert x.shape == (5, 3, 4, 4) and x.dtype == torch.float32
    subset = random_subset(ds, 5, 3)
    assert torch.equal(x, torch.stack([subset[i][0] for i in range(5)]))
    assert torch.equal(x, calibration_tensor(ds, 5, seed=3, batch_size=4))
    with pytest.raises(TypeError, match="transform"):
        calibration_tensor(ImageFolderDataset(tiny_image_folder), 2, 0)


# ----------------------------------------------------------------------------- misc

def test_default_cifar10_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DFQKERN_CIFAR10_DIR", str(tmp_path))
    assert default_cifar10_dir() == tmp_path
    monkeypatch.delenv("DFQKERN_CIFAR10_DIR")
    assert default_cifar10_dir().parts[-3:] == ("shared", "data", "cifar10")


def test_digits_split():
    train, test = digits_dataset("train", seed=0), digits_dataset("test", seed=0)
    assert len(train) + len(test) == 1797
    x, y = train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))
    # the seed picks the split
    assert not torch.equal(digits_dataset("test", seed=1).tensors[0], test.tensors[0])
    with pytest.raises(ValueError, match="split"):
        digits_dataset("val")


# ----------------------------------------------------------------------------- real data

def test_cifar10_dev_and_train_tars(cifar10_dir):
    spec = input_spec("cifar10_resnet20")
    dev = open_dataset(cifar10_dir / "cifar10_test_dev_jpeg.tar.gz", transform=build_transform(spec))
    assert len(dev) == 5000 and dev.classes[0] == "airplane" and dev.classes[9] == "truck"
    assert [dev.targets.count(c) for c in range(10)] == [500] * 10
    x, label = dev[0]
    assert x.shape == (3, 32, 32) and label == 0
    train = cifar10_dir / "cifar10_train_jpeg.tar.gz"
    if train.is_file():
        sub = TarImageDataset(train, transform=build_transform(spec), indices=range(0, 50000, 5000))
        assert len(sub) == 10 and sub.targets == list(range(10)) and len(sub._blobs) == 10


# ----------------------------------------------------------------------------- label checks (issue 15)

def test_folder_classes_follow_the_model_class_list(tmp_path, caplog):
    for name in ("truck", "cat"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "0.png")
    full = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ds = ImageFolderDataset(tmp_path, classes=full)
    assert ds.classes == full and sorted(ds.targets) == [3, 9]
    # no class names: the sorted folders are the whole class list; any other count is an error
    # (a partial folder would be scored as the model's first classes)
    for n in (1, 10):
        with pytest.raises(ValueError, match=rf"2 class folders.*{n} classes.*labels csv"):
            ImageFolderDataset(tmp_path, num_classes=n)
    assert ImageFolderDataset(tmp_path, num_classes=2).targets == [0, 1] and not caplog.records  # cat, truck
    with pytest.raises(ValueError, match=r"'truck'.*not .*class"):
        ImageFolderDataset(tmp_path, classes=["cat", "dog"])


def test_tar_folder_labels_follow_the_model_class_list(tiny_tar_dataset):
    ds = TarImageDataset(tiny_tar_dataset["tar"], classes=["ant", "cat", "dog", "emu"])
    assert ds.targets == [1, 1, 1, 2, 2, 2, 3, 3, 3]


CSV_PROBLEMS = {  # csv text after the header, the model's class count, what the error says
    "dup": ("test/cat/0000.png,0\ntest/dog/0000.png,1\ntest/cat/0000.png,0\n", None,
            r"line 4.*test/cat/0000\.png.*line 2"),
    "neg": ("test/cat/0000.png,-3\n", None, r"line 2.*-3"),
    "big": ("test/cat/0000.png,0\ntest/dog/0000.png,999\n", 10, r"line 3.*999.*10 classes"),
}


@pytest.mark.parametrize("name", sorted(CSV_PROBLEMS))
def test_csv_labels_checked(tmp_path, tiny_tar_dataset, name):
    rows, num_classes, match = CSV_PROBLEMS[name]
    path = tmp_path / f"{name}.csv"
    path.write_text("path,label_index\n" + rows)
    for open_it in (lambda: TarImageDataset(tiny_tar_dataset["tar"], path, num_classes=num_classes),
                    lambda: open_dataset(tiny_tar_dataset["tar"], labels_csv=path, num_classes=num_classes)):
        with pytest.raises(ValueError, match=rf"{name}\.csv.*{match}"):
            open_it()
    if num_classes is not None:  # no model to check against: any label >= 0 goes
        assert TarImageDataset(tiny_tar_dataset["tar"], path).targets == [0, 999]


def test_label_beyond_the_model_outputs_is_an_error():
    from torch.utils.data import TensorDataset

    from dfqkern.evaluation import evaluate_top1

    class Three(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValueError, match=r"label 7.*3 outputs"):
        evaluate_top1(Three(), TensorDataset(torch.zeros(2, 1), torch.tensor([0, 7])), progress=False)
