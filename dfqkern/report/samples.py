"""Synthetic-set facts for the report: what generated it, and its first images with their (mixup) labels."""
from __future__ import annotations

from pathlib import Path

import torch

from ..datagen.store import MANIFEST


def find_synthetic(run: Path, checkpoints: list[Path]) -> Path | None:
    """The synthetic set that belongs to a run, when one is where dfqkern writes it: ``quantize
    --calib-data bn-inversion:...`` generates into ``<checkpoint>.calib-data``; a directory of several
    checkpoints (``dfqkern demo --out``) holds the set in a subdirectory."""
    candidates = [Path(f"{c}.calib-data") for c in checkpoints]
    if run.is_dir() and run not in checkpoints:
        candidates += sorted(p for p in run.iterdir() if p.is_dir())
    return next((p for p in candidates if (p / MANIFEST).is_file()), None)


def label_text(entry: dict, class_names: list[str] | None) -> list[tuple[str, float]]:
    """``[(class name, weight)]`` of one manifest entry, heaviest first (mixup entries have several)."""
    own = entry.get("class_names") or []  # names recorded per image (BN inversion given class names)
    pairs = []
    for j, (c, w) in enumerate(zip(entry.get("classes", ()), entry.get("weights", ()))):
        c = int(c)
        name = class_names[c] if class_names and 0 <= c < len(class_names) else (
            own[j] if j < len(own) else f"class {c}")
        pairs.append((str(name), float(w)))
    return sorted(pairs, key=lambda p: -p[1])


def synthetic_facts(root: str | Path, num_samples: int) -> tuple[dict, torch.Tensor]:
    """(facts for the report, float [0, 1] images ``[n, C, H, W]`` of the first ``num_samples``)."""
    from ..datagen.store import load_synthetic

    ds = load_synthetic(root, verify=False)  # files and paths are checked; hashes would read every image
    m = ds.manifest
    n = min(num_samples, len(ds))
    samples = [{"index": i, "file": ds.entries[i]["file"], "labels": label_text(ds.entries[i], ds.class_names)}
               for i in range(n)]
    config = m.get("config", {})
    facts = {"path": str(root), "num_images": len(ds), "source": m.get("source"), "generator": m.get("generator"),
             "label_mode": config.get("label_mode") or config.get("prompt_mode"), "label_type": m.get("label_type"),
             "image_size": m.get("image_size"), "channels": ds.channels, "num_classes": ds.num_classes,
             "samples": samples}
    return facts, (ds.images(range(n)) if n else torch.empty(0))
