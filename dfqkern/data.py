"""Image data for calibration and evaluation: image folders and tars of images + labels csv.

Every dataset yields ``(image, label)`` with ``label = -1`` for unlabeled images. Images are
decoded lazily, one at a time, so picking a calibration subset decodes only that subset.
"""
from __future__ import annotations

import csv
import io
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import Dataset, Subset

from .assets import CIFAR10_ENV, default_cifar10_dir  # noqa: F401  (re-exported)
from .input_spec import DIGITS_SPEC, InputSpec

__all__ = [
    "IMAGE_EXTENSIONS", "build_transform", "ResizeCenterCrop", "ImageFolderDataset", "TarImageDataset",
    "open_dataset", "index_classes", "random_subset", "calibration_tensor", "default_cifar10_dir", "digits_dataset",
]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CSV_COLUMNS = ("path", "label_index")  # label_name is optional: it only names the classes


# ----------------------------------------------------------------------------- transforms

def _scaled(size: int, crop_pct: float) -> int:
    """floor(size / crop_pct) as timm computes it; the epsilon keeps crop_pct = crop / resize
    (torchvision's specs) from landing one pixel short through rounding (224 / (224/232) -> 232)."""
    return math.floor(size / crop_pct + 1e-6)


class ResizeCenterCrop:
    """Resize to ``size / crop_pct`` then center-crop to ``size`` (timm's eval transform).

    Images already at the target size pass through untouched (CIFAR at 32x32 is not resampled).
    """

    def __init__(self, height: int, width: int, crop_pct: float = 1.0, interpolation: str = "bilinear"):
        self.height, self.width, self.crop_pct, self.interpolation = height, width, crop_pct, interpolation

    def __call__(self, img):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if img.size == (self.width, self.height):
            return img
        mode = InterpolationMode(self.interpolation)
        if self.height == self.width:  # shorter side, aspect kept
            img = TF.resize(img, _scaled(self.height, self.crop_pct), interpolation=mode)
        else:
            img = TF.resize(img, [_scaled(self.height, self.crop_pct), _scaled(self.width, self.crop_pct)],
                            interpolation=mode)
        return TF.center_crop(img, [self.height, self.width])

    def __repr__(self):
        return (f"{type(self).__name__}(size=({self.height}, {self.width}), crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation})")


class _ConvertMode:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self):
        return f"{type(self).__name__}({self.mode!r})"


def build_transform(spec: InputSpec):
    """PIL image -> normalized float tensor [C, H, W] as ``spec`` prescribes."""
    from torchvision import transforms as T

    if not isinstance(spec, InputSpec):
        raise TypeError(f"spec must be an InputSpec, got {type(spec).__name__}")
    channels, height, width = spec.input_size
    if channels not in (1, 3):
        raise ValueError(f"spec.input_size channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return T.Compose([
        _ConvertMode("L" if channels == 1 else "RGB"),
        ResizeCenterCrop(height, width, spec.crop_pct, spec.interpolation),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


# ----------------------------------------------------------------------------- datasets

def _decode(source, name: str):
    """Open and fully decode one image (bytes or a path); errors name the file."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()  # force the decode here, where the file name is known
    except Exception as e:
        raise ValueError(f"unreadable or corrupt image {name!r}: {type(e).__name__}: {e}") from e
    return img


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith(".")


def _class_key(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def index_classes(found: Sequence[str], source: str, classes: Sequence[str] | None = None,
                  num_classes: int | None = None) -> list[str]:
    """The class list that folder-named labels index into.

    With ``classes`` (the model's class names, in output order) every folder must name one of them
    (case, ``_`` and ``-`` aside), so a folder holding only some classes keeps the model's indices.
    Otherwise the sorted folder names are taken as the whole list, and a count that differs from the
    model's ``num_classes`` outputs is an error: a partial folder would otherwise be re-indexed 0, 1,
    ... and scored against the wrong outputs (a labels csv states the indices instead)."""
    found = sorted(found)
    if classes is not None:
        index = {_class_key(c): i for i, c in enumerate(classes)}
        unknown = [c for c in found if _class_key(c) not in index]
        if unknown:
            shown = ", ".join(list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
            raise ValueError(f"{source}: class folder(s) {unknown[:5]} are not classes of the model "
                             f"({len(classes)} classes: {shown})")
        names = list(classes)
        for c in found:  # keep the folder's spelling for the classes present
            names[index[_class_key(c)]] = c
        return names
    if num_classes is not None and len(found) != num_classes:
        raise ValueError(f"{source} has {len(found)} class folders ({', '.join(found[:5])}"
                         f"{', ...' if len(found) > 5 else ''}) but the model has {num_classes} classes and no "
                         f"class names to match them to; give a labels csv (image,label index) instead")
    return found


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` with classes = sorted subfolder names, or a flat folder of
    images (label -1). Subfolders without images are ignored. ``classes`` / ``num_classes``: the
    model's class names / output count the folder names are matched to (see :func:`index_classes`)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, num_classes: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {str(self.root)!r} is not an existing directory")
        self.transform = transform
        per_class = {}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(p for p in sub.rglob("*") if p.is_file() and _is_image(p.name))
            if files:
                per_class[sub.name] = files
        if per_class:
            self.classes = index_classes(per_class, f"image folder {str(self.root)!r}", classes, num_classes)
            self.samples = [(f, i) for i, c in enumerate(self.classes) if c in per_class for f in per_class[c]]
        else:
            self.classes = []
            self.samples = [(p, -1) for p in sorted(self.root.iterdir()) if p.is_file() and _is_image(p.name)]
        if not self.samples:
            raise ValueError(f"root {str(self.root)!r} contains no images "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = _decode(path, str(path))
        return (self.transform(img) if self.transform is not None else img), label


def _norm_member(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _read_labels_csv(labels_csv: Path) -> tuple[list[tuple[str, int, int]], dict[int, str]]:
    """Rows ``(path, label, csv line)``; a negative label or a path listed twice is an error naming the line."""
    if not labels_csv.is_file():
        raise ValueError(f"labels_csv {str(labels_csv)!r} does not exist")
    where = f"labels_csv {str(labels_csv)!r}"
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{where} lacks column(s) {missing}; it needs "
                             f"{list(CSV_COLUMNS)} (label_name optional), found {columns}")
        rows, names, first_line = [], {}, {}
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label_index"])
            except (TypeError, ValueError):
                raise ValueError(f"{where} line {line}: label_index "
                                 f"{row['label_index']!r} is not an integer") from None
            if label < 0:
                raise ValueError(f"{where} line {line}: label_index {label} is negative")
            path = _norm_member(row["path"])
            if path in first_line:  # it would be scored twice
                raise ValueError(f"{where} line {line}: {path!r} is listed again (first on line {first_line[path]})")
            first_line[path] = line
            rows.append((path, label, line))
            if row.get("label_name"):
                names.setdefault(label, row["label_name"])
    if not rows:
        raise ValueError(f"{where} has no rows")
    return rows, names


def _select(n: int, indices: Sequence[int] | None, limit: int | None) -> list[int]:
    chosen = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices must lie in [0, {n}), got {bad[:5]}")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be a positive int or None, got {limit}")
        chosen = chosen[:limit]
    return chosen


class TarImageDataset(Dataset):
    """Images in a (gzipped) tar, read in one pass and decoded lazily from memory.

    With ``labels_csv`` (columns ``path,label_index[,label_name]``) the samples are the csv rows
    in csv order. Without it, they are the tar's images sorted by path, labelled by their parent
    folder (``train/<class>/NNNN.jpg``; classes = sorted folder names; top-level files get -1).
    ``classes`` / ``num_classes``: the model's class names / output count, which folder names are
    matched to (:func:`index_classes`) and csv labels must lie below.
    ``indices`` (into that full order) and then ``limit`` pick a subset: only the picked images'
    bytes are kept, so choosing 1024 of 50,000 costs one decompression pass and 1024 decodes.
    """

    def __init__(self, tar_path: str | os.PathLike, labels_csv: str | os.PathLike | None = None,
                 transform: Callable | None = None, limit: int | None = None,
                 indices: Sequence[int] | None = None, classes: Sequence[str] | None = None,
                 num_classes: int | None = None):
        self.tar_path = Path(tar_path)
        if not self.tar_path.is_file():
            raise ValueError(f"tar_path {str(self.tar_path)!r} does not exist")
        self.transform = transform
        self.labels_csv = Path(labels_csv) if labels_csv is not None else None
        if self.labels_csv is not None:
            rows, names = _read_labels_csv(self.labels_csv)
            n_model = len(classes) if classes is not None else num_classes
            bad = next((r for r in rows if n_model is not None and r[1] >= n_model), None)
            if bad is not None:
                raise ValueError(f"labels_csv {str(self.labels_csv)!r} line {bad[2]}: label_index {bad[1]} is out of "
                                 f"range for a model with {n_model} classes")
            rows = [(p, label) for p, label, _ in rows]
            wanted = {rows[i][0] for i in _select(len(rows), indices, limit)}
            blobs = self._read(lambda name: name in wanted)
            absent = [p for p in wanted if p not in blobs]
            if absent:
                raise ValueError(f"labels_csv {str(self.labels_csv)!r} lists {len(absent)} path(s) not in "
                                 f"tar_path {str(self.tar_path)!r}, e.g. {sorted(absent)[:3]}")
            full = rows
            n_classes = max(label for _, label in rows) + 1
            self.classes = [names.get(i, str(i)) for i in range(n_classes)]
        else:
            blobs = self._read(_is_image)  # the order is only known once every name is seen
            if not blobs:
                raise ValueError(f"tar_path {str(self.tar_path)!r} contains no images "
                                 f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            paths = sorted(blobs)
            parents = [PurePosixPath(p).parent.name for p in paths]
            self.classes = index_classes({p for p in parents if p}, f"tar_path {str(self.tar_path)!r}", classes,
                                         num_classes) if any(parents) else []
            idx = {c: i for i, c in enumerate(self.classes)}
            full = [(p, idx[c] if c else -1) for p, c in zip(paths, parents)]
        self.samples = [full[i] for i in _select(len(full), indices, limit)]
        self._blobs = {p: blobs[p] for p, _ in self.samples}  # drop what was not picked
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]

    def _read(self, keep: Callable[[str], bool]) -> dict[str, bytes]:
        blobs = {}
        try:
            with tarfile.open(self.tar_path, "r:*") as tar:
                for member in tar:
                    name = _norm_member(member.name)
                    if member.isfile() and keep(name):
                        blobs[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"tar_path {str(self.tar_path)!r} is not a readable tar archive "
                             f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
        return blobs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        name, label = self.samples[index]
        img = _decode(self._blobs[name], f"{self.tar_path}:{name}")
        return (self.transform(img) if self.transform is not None else img), label


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def _tar_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_labels_csv(tar_path: str | os.PathLike) -> Path | None:
    """Sibling ``<stem>_labels.csv``, or with a trailing ``_jpeg``/``_png`` dropped from the stem
    (``cifar10_test_dev_jpeg.tar.gz`` -> ``cifar10_test_dev_labels.csv``)."""
    tar_path = Path(tar_path)
    stem = _tar_stem(tar_path)
    candidates = [stem]
    for tag in ("_jpeg", "_jpg", "_png"):
        if stem.endswith(tag):
            candidates.append(stem[: -len(tag)])
    for c in candidates:
        csv_path = tar_path.with_name(f"{c}_labels.csv")
        if csv_path.is_file():
            return csv_path
    return None


def open_dataset(spec: str | os.PathLike, transform: Callable | None = None,
                 labels_csv: str | os.PathLike | None = None, limit: int | None = None,
                 classes: Sequence[str] | None = None, num_classes: int | None = None) -> Dataset:
    """A directory -> :class:`ImageFolderDataset`; a ``.tar``/``.tar.gz``/``.tgz`` ->
    :class:`TarImageDataset` with ``labels_csv`` or its auto-found sibling csv (see
    :func:`find_labels_csv`); without one, labels come from the tar's folder names. ``classes`` /
    ``num_classes`` (the model's) check the labels (see :func:`index_classes`)."""
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"spec {str(path)!r} does not exist (expected an image folder or a "
                         f"{'/'.join(TAR_SUFFIXES)} archive)")
    if path.is_dir():
        if labels_csv is not None:
            raise ValueError(f"labels_csv is only used with a tar archive; spec {str(path)!r} is a folder")
        ds = ImageFolderDataset(path, transform, classes, num_classes)
        return ds if limit is None else Subset(ds, _select(len(ds), None, limit))
    if _is_tar(path):
        csv_path = labels_csv if labels_csv is not None else find_labels_csv(path)
        return TarImageDataset(path, csv_path, transform, limit=limit, classes=classes, num_classes=num_classes)
    raise ValueError(f"spec {str(path)!r} is neither a folder nor a tar archive "
                     f"({', '.join(TAR_SUFFIXES)})")


# ----------------------------------------------------------------------------- subsets

def _check_n(dataset, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n > len(dataset):
        raise ValueError(f"n={n} exceeds the dataset size ({len(dataset)} images)")


def random_subset(dataset: Dataset, n: int, seed: int) -> Subset:
    """``n`` distinct items chosen uniformly at random; the same ``seed`` gives the same items."""
    _check_n(dataset, n)
    g = torch.Generator().manual_seed(int(seed))
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].tolist())


def _images_only(batch):
    items = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    if not all(isinstance(x, torch.Tensor) for x in items):
        raise TypeError("dataset items must be tensors (or (tensor, label) pairs); "
                        "pass transform=build_transform(spec) when opening the dataset")
    return torch.stack(items)


def calibration_tensor(dataset: Dataset, n: int, seed: int, batch_size: int = 64,
                       num_workers: int = 0) -> torch.Tensor:
    """Images of :func:`random_subset` stacked into one float tensor ``[n, C, H, W]``."""
    from torch.utils.data import DataLoader

    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    subset = random_subset(dataset, n, seed)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_images_only)
    return torch.cat(list(loader))


# ----------------------------------------------------------------------------- digits (demo data)

DIGITS_TEST_FRACTION = 0.25


def digits_dataset(split: str = "train", seed: int = 0, test_fraction: float = DIGITS_TEST_FRACTION):
    """scikit-learn's bundled 8x8 digits (no download) as a TensorDataset of normalized
    ``[N, 1, 8, 8]`` images (pixels /16, then the ``digits_cnn`` spec's mean/std) and labels.

    ``train`` and ``test`` are a disjoint, seeded, stratified split of the 1,797 images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.utils.data import TensorDataset

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    train_idx, test_idx = train_test_split(range(len(digits.target)), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    idx = train_idx if split == "train" else test_idx
    x = torch.tensor(digits.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - DIGITS_SPEC.mean[0]) / DIGITS_SPEC.std[0]
    return TensorDataset(x, torch.tensor(digits.target[idx], dtype=torch.long))
