"""Synthetic calibration sets on disk: PNG shards plus ``manifest.json``.

Layout of a set directory::

    generation.json          run description: config + plan digest (written first; guards resume)
    shard_00000/00000000.png images, ``shard_size`` per folder, file name = global image index
    shard_00000/shard.json   per-image entries of a finished shard (file, sha256, labels, seed, ...)
    ...
    manifest.json            the finished set (written last): format, generator, config, entries
    samples.png              a grid of the first images, to eyeball the set

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written image or JSON behind. A re-run with the same config skips finished shards and the
images already present in unfinished ones; a different config in the same directory is refused
unless ``overwrite=True``. Images are stored as 8-bit PNG (RGB or grayscale): sets produced in a
normalized model-input space (BN inversion) are de-normalized to [0, 1] with the recorded
mean/std and *clamped* to [0, 1] before quantization to 8 bits; :meth:`SyntheticSet.normalize`
maps them back.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .._version import __version__

FORMAT = "dfqkern.synthetic"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUN_FILE = "generation.json"
SHARD_FILE = "shard.json"
GRID_FILE = "samples.png"
LABELS = ("soft", "index")

log = logging.getLogger(__name__)


class SyntheticSetError(ValueError):
    """A synthetic-set directory is missing, incomplete, corrupt, or belongs to another config."""


# ----------------------------------------------------------------------------- small helpers

def atomic_write_bytes(path: "str | Path", data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: "str | Path", obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_digest(obj) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be a uint8 tensor of shape [1 or 3, H, W], got {image.dtype} "
                         f"{tuple(image.shape)}")
    arr = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, channels: int, name: str = "image") -> torch.Tensor:
    """8-bit PNG bytes -> uint8 ``[channels, H, W]``; errors name ``name``. Only the 8-bit modes a
    set is written in are read: a 16-bit image would otherwise be clipped to white."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB"):
                raise SyntheticSetError(f"{name} is a {im.mode!r} image; synthetic sets store 8-bit grayscale "
                                        f"('L') or RGB PNGs")
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except SyntheticSetError:
        raise
    except Exception as e:  # PIL raises many types for a damaged file
        raise SyntheticSetError(f"{name} is unreadable or corrupt: {type(e).__name__}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def shard_dir_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def image_file_name(index: int) -> str:
    return f"{index:08d}.png"


def to_unit_range(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized model-input images -> [0, 1] (``x * std + mean``, clamped)."""
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (images.float().cpu() * s + m).clamp_(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (round to nearest, clamped)."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: "str | Path", nrow: int = 8) -> None:
    """Save float [0,1] or uint8 ``[N, C, H, W]`` images as one grid PNG (atomically)."""
    from torchvision.utils import make_grid

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    atomic_write_bytes(path, encode_png(grid.mul(255).round().clamp(0, 255).to(torch.uint8)))


# ----------------------------------------------------------------------------- writer

def recorded_run(root: "str | Path") -> "dict | None":
    """The run description a writer left in ``root`` (config, plan digest, ...): None where there is
    none, ``{"corrupt": True}`` where it cannot be read."""
    path = Path(root) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {"corrupt": True}


class SyntheticSetWriter:
    """Writes a set shard by shard, resumably.

    ``entries[i]`` is the metadata of image ``i`` known before it exists (prompt or target classes
    and weights, seed, ...); the writer adds ``index``, ``file`` and ``sha256``. ``config`` must
    hold everything that determines the images: a re-run resumes only if config and entries are
    identical. ``meta`` holds the manifest's other top-level fields (source, generator,
    class_names, normalization, ...).
    """

    def __init__(self, root: "str | Path", *, entries: Sequence[dict], config: dict, meta: dict,
                 channels: int = 3, shard_size: int = 256, overwrite: bool = False):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.root = Path(root)
        self.entries = [dict(e) for e in entries]
        self.config, self.meta, self.channels, self.shard_size = config, meta, channels, shard_size
        self.num_images = len(self.entries)
        self.num_shards = -(-self.num_images // shard_size)
        self.run = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config,
                    "plan_sha256": canonical_digest(self.entries), "num_images": self.num_images,
                    "shard_size": shard_size, "channels": channels}
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        run_path = self.root / RUN_FILE
        existing = recorded_run(self.root)
        if existing is None and ((self.root / MANIFEST).exists() or any(self.root.glob("shard_*"))):
            existing = {"foreign": True}
        if existing is not None and canonical_digest(existing) != canonical_digest(self.run):
            if not overwrite and not self._has_images():  # a run that failed before any image: nothing to keep
                log.warning("%s: replacing the run description of an earlier run that wrote no image "
                            "(%s)", self.root, _diff_summary(existing, self.run))
                overwrite = True
            if not overwrite:
                raise SyntheticSetError(
                    f"{str(self.root)!r} already holds a synthetic set made with a different configuration "
                    f"({_diff_summary(existing, self.run)}); pass overwrite=True to replace it or choose "
                    f"another directory")
            self._clear()
        atomic_write_json(run_path, self.run)

    def _has_images(self) -> bool:
        return (self.root / MANIFEST).exists() or any(self.root.glob("shard_*/*.png"))

    def _clear(self) -> None:
        # Only what a writer creates: never the user's other files.
        for p in self.root.glob("shard_*"):
            if p.is_dir():
                shutil.rmtree(p)
        for name in (MANIFEST, GRID_FILE, RUN_FILE):
            (self.root / name).unlink(missing_ok=True)

    # --- layout
    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def shard_indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def relpath(self, index: int) -> str:
        return f"{shard_dir_name(self.shard_of(index))}/{image_file_name(index)}"

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Shards are dealt round-robin: rank r owns shards r, r + world, ... (disjoint)."""
        return list(range(rank, self.num_shards, world_size))

    # --- progress state
    def shard_done(self, shard: int) -> bool:
        path = self.root / shard_dir_name(shard) / SHARD_FILE
        if not path.exists():
            return False
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return False
        return data.get("plan_sha256") == self.run["plan_sha256"] and len(data.get("images", ())) == len(
            self.shard_indices(shard))

    def missing(self, shard: int) -> list[int]:
        """Indices of ``shard`` whose PNG is not on disk yet (written files are always complete)."""
        if self.shard_done(shard):
            return []
        return [i for i in self.shard_indices(shard) if not (self.root / self.relpath(i)).exists()]

    def complete(self) -> bool:
        return all(self.shard_done(s) for s in range(self.num_shards))

    # --- writing
    def write_image(self, index: int, image: torch.Tensor) -> None:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range [0, {self.num_images})")
        if image.shape[0] != self.channels:
            raise ValueError(f"image {index} has {image.shape[0]} channels, the set has {self.channels}")
        path = self.root / self.relpath(index)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, encode_png(image))

    def finish_shard(self, shard: int) -> None:
        """Hash the shard's images and write its ``shard.json`` (the shard then counts as done)."""
        images = []
        for i in self.shard_indices(shard):
            path = self.root / self.relpath(i)
            if not path.exists():
                raise SyntheticSetError(f"cannot finish shard {shard}: image {self.relpath(i)} is missing")
            images.append({**self.entries[i], "index": i, "file": self.relpath(i),
                           "sha256": sha256_bytes(path.read_bytes())})
        atomic_write_json(self.root / shard_dir_name(shard) / SHARD_FILE,
                          {"plan_sha256": self.run["plan_sha256"], "images": images})

    def finalize(self, grid_size: int = 64) -> Path:
        """Assemble ``manifest.json`` from the shard files and save the sample grid."""
        images = []
        for s in range(self.num_shards):
            if not self.shard_done(s):
                raise SyntheticSetError(f"cannot finalize {str(self.root)!r}: shard {s} is not finished")
            images += json.loads((self.root / shard_dir_name(s) / SHARD_FILE).read_text("utf-8"))["images"]
        manifest = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION,
                    "dfqkern_version": __version__, "config": self.config, "num_images": self.num_images,
                    "shard_size": self.shard_size, "channels": self.channels, "images": images}
        if images:
            first = [decode_png((self.root / e["file"]).read_bytes(), self.channels, str(self.root / e["file"]))
                     for e in images[:grid_size]]
            if len({tuple(t.shape) for t in first}) == 1:
                save_grid(torch.stack(first), self.root / GRID_FILE)
            manifest["image_size"] = list(first[0].shape[1:])
        atomic_write_json(self.root / MANIFEST, manifest)
        return self.root


def _diff_summary(old: dict, new: dict) -> str:
    if old.get("corrupt"):
        return f"its {RUN_FILE} is unreadable"
    if old.get("foreign"):
        return f"no {RUN_FILE} describing it"
    keys = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k) != nc.get(k):
            keys.append(f"config.{k}: {oc.get(k)!r} -> {nc.get(k)!r}")
    for k in ("num_images", "shard_size", "channels", "format_version", "plan_sha256"):
        if old.get(k) != new.get(k) and not (k == "plan_sha256" and keys):
            keys.append(k)
    return "; ".join(keys[:6]) or "different run description"


def fill_set(writer: SyntheticSetWriter, produce: Callable[[list[int]], Iterable[tuple[list[int], torch.Tensor]]],
             *, rank: int = 0, world_size: int = 1, progress: bool = True, desc: str = "synthetic set",
             whole_shards: bool = False) -> bool:
    """Generate this rank's missing images and finish its shards; finalize when the set is complete.

    ``produce(indices)`` yields ``(indices_chunk, uint8 images [n, C, H, W])``. With
    ``whole_shards`` a shard with any image missing is produced entirely (for generators whose
    images depend on each other, e.g. BN inversion that optimizes a shard jointly). Returns True
    when the manifest was written (the set is complete).
    """
    from tqdm.auto import tqdm

    shards = writer.shards_for_rank(rank, world_size)
    total = sum(len(writer.shard_indices(s)) for s in shards)
    todo = {s: writer.missing(s) for s in shards}
    if whole_shards:
        todo = {s: (list(writer.shard_indices(s)) if m else []) for s, m in todo.items()}
    done = total - sum(len(m) for m in todo.values())
    with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress) as bar:
        for s in shards:
            if todo[s]:
                for idx, images in produce(todo[s]):
                    if len(idx) != len(images):
                        raise RuntimeError(f"producer returned {len(images)} images for {len(idx)} indices")
                    for i, img in zip(idx, images):
                        writer.write_image(int(i), img)
                    bar.update(len(idx))
            if not writer.shard_done(s):
                writer.finish_shard(s)
    return _finalize_when_complete(writer, rank)


def fill_set_split(writer: SyntheticSetWriter, produce: Callable[[list[int]], Iterable[tuple[list[int], torch.Tensor]]],
                   *, rank: int, progress: bool = True, desc: str = "synthetic set") -> bool:
    """Every rank of a running torch.distributed group works on every unfinished shard together:
    ``produce(all indices of the shard)`` yields this rank's part of it (disjoint from the other
    ranks'), which this rank writes; rank 0 finishes the shard once all parts are written, and writes
    the manifest once all shards are. Which shards are unfinished is decided from every rank's view
    before any rank writes, so all ranks run the same collectives in the same order."""
    from tqdm.auto import tqdm

    from .distributed import any_rank, barrier

    shards = range(writer.num_shards)
    todo = any_rank([bool(writer.missing(s)) for s in shards])
    with tqdm(total=writer.num_images, initial=writer.num_images - sum(len(writer.shard_indices(s)) for s in shards
                                                                        if todo[s]),
              desc=f"{desc} (rank {rank}, its part)", unit="img", disable=not progress) as bar:
        for s in shards:
            if todo[s]:
                for idx, images in produce(list(writer.shard_indices(s))):
                    if len(idx) != len(images):
                        raise RuntimeError(f"producer returned {len(images)} images for {len(idx)} indices")
                    for i, img in zip(idx, images):
                        writer.write_image(int(i), img)
                bar.update(len(writer.shard_indices(s)))
            barrier()  # every part of shard s is on disk
            if rank == 0 and not writer.shard_done(s):
                writer.finish_shard(s)
    return _finalize_when_complete(writer, rank)


def _finalize_when_complete(writer: SyntheticSetWriter, rank: int) -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's shards are finished before rank 0 assembles the manifest
        if rank == 0:
            writer.finalize()
        dist.barrier()
        return True
    # Independent processes: whoever sees all shards finished writes the (identical) manifest.
    if writer.complete():
        writer.finalize()
        return True
    return False


# ----------------------------------------------------------------------------- reader

class SyntheticSet(torch.utils.data.Dataset):
    """A finished synthetic set as a torch Dataset.

    Items are ``(image, label)``: ``image`` float32 ``[C, H, W]`` in [0, 1] (then ``transform``,
    if given: the classifier's normalization is the caller's to apply -- see :meth:`normalize` for
    sets stored from normalized model-input space); ``label`` the soft label ``[num_classes]``
    (``label="soft"``) or the highest-weight class index (``label="index"``).
    ``verify=True`` checks every file's sha256 against the manifest up front.
    """

    def __init__(self, root: "str | Path", *, label: str = "soft",
                 transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None, verify: bool = True):
        if label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
        self.root = Path(root)
        self.label, self.transform = label, transform
        self.manifest = _read_manifest(self.root)
        self.entries: list[dict] = self.manifest["images"]
        self.channels = int(self.manifest.get("channels", 3))
        names = self.manifest.get("class_names")
        self.class_names: "list[str] | None" = list(names) if names else None
        self.num_classes = int(self.manifest.get("num_classes") or (len(names) if names else 0)) or (
            1 + max((c for e in self.entries for c in e.get("classes", ())), default=-1))
        self._check_files(verify)

    def _check_files(self, verify: bool) -> None:
        root = self.root.resolve()
        for e in self.entries:
            path = self.root / e["file"]
            if not path.is_file():
                raise SyntheticSetError(f"synthetic set {str(self.root)!r}: image file {e['file']!r} is missing")
            if not path.resolve().is_relative_to(root):  # a link swapped in: never read files elsewhere
                raise SyntheticSetError(f"synthetic set {str(self.root)!r}: image file {e['file']!r} links to "
                                        f"{str(path.resolve())!r}, outside the set")
            if verify and sha256_bytes(path.read_bytes()) != e["sha256"]:
                raise SyntheticSetError(f"synthetic set {str(self.root)!r}: image file {e['file']!r} does not "
                                        f"match its sha256 in {MANIFEST} (modified or corrupt)")

    def __len__(self) -> int:
        return len(self.entries)

    def image_uint8(self, i: int) -> torch.Tensor:
        path = self.root / self.entries[i]["file"]
        return decode_png(path.read_bytes(), self.channels, f"synthetic set {str(self.root)!r}: image file "
                                                            f"{self.entries[i]['file']!r}")

    def soft_label(self, i: int) -> torch.Tensor:
        label = torch.zeros(self.num_classes, dtype=torch.float32)
        e = self.entries[i]
        for c, w in zip(e.get("classes", ()), e.get("weights", ())):
            label[int(c)] += float(w)
        return label

    def class_index(self, i: int) -> int:
        e = self.entries[i]
        if not e.get("classes"):
            raise SyntheticSetError(f"image {i} has no target classes")
        return int(e["classes"][int(np.argmax(e["weights"]))])

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a set of {len(self)} images")
        i = i % len(self)
        x = self.image_uint8(i).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, (self.soft_label(i) if self.label == "soft" else self.class_index(i))

    def soft_labels(self) -> torch.Tensor:
        return torch.stack([self.soft_label(i) for i in range(len(self))]) if len(self) else torch.empty(
            0, self.num_classes)

    def images(self, indices: "Sequence[int] | None" = None) -> torch.Tensor:
        """Float [0, 1] images ``[n, C, H, W]`` (no transform)."""
        idx = range(len(self)) if indices is None else indices
        return torch.stack([self.image_uint8(int(i)) for i in idx]).float().div_(255.0)

    @property
    def normalization(self) -> "dict | None":
        """``{"mean": [...], "std": [...]}`` for sets stored from normalized model-input space."""
        return self.manifest.get("normalization")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images back to the model-input space recorded in the manifest (identity if none)."""
        norm = self.normalization
        if not norm:
            return x
        shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
        m = torch.as_tensor(norm["mean"], dtype=x.dtype, device=x.device).reshape(shape)
        s = torch.as_tensor(norm["std"], dtype=x.dtype, device=x.device).reshape(shape)
        return (x - m) / s


def _read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise SyntheticSetError(f"synthetic set directory {str(root)!r} does not exist")
    path = root / MANIFEST
    if not path.exists():
        hint = ""
        if (root / RUN_FILE).exists():
            hint = ("; generation has not finished (re-run the same generate command to resume: finished "
                    "shards are kept)")
        raise SyntheticSetError(f"no {MANIFEST} in {str(root)!r}{hint}")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SyntheticSetError(f"{MANIFEST} in {str(root)!r} is corrupt: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SyntheticSetError(f"{MANIFEST} in {str(root)!r} is not a dfqkern synthetic-set manifest "
                                f"(format must be {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SyntheticSetError(f"{MANIFEST} in {str(root)!r} has format_version {version!r}; this dfqkern "
                                f"reads versions <= {FORMAT_VERSION}")
    images = manifest.get("images")
    if not isinstance(images, list) or any(not isinstance(e, dict) or "file" not in e or "sha256" not in e
                                           for e in images):
        raise SyntheticSetError(f"{MANIFEST} in {str(root)!r} is corrupt: 'images' must be a list of entries "
                                f"with 'file' and 'sha256'")
    for e in images:
        f = str(e["file"])
        if os.path.isabs(f) or ".." in Path(f).parts:
            raise SyntheticSetError(f"{MANIFEST} in {str(root)!r}: image path {f!r} leaves the set directory")
    return manifest


def load_synthetic(root: "str | Path", *, label: str = "soft",
                   transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None,
                   verify: bool = True) -> SyntheticSet:
    """Open a finished synthetic set (see :class:`SyntheticSet`); clear errors for a missing or
    corrupt manifest, missing files, or files whose sha256 does not match."""
    return SyntheticSet(root, label=label, transform=transform, verify=verify)


def iter_chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
