"""Filters that keep the synthetic images most useful for calibration. Usable on any image set.

* Energy filter (GenQ, Jeon et al. 2024, after Liu et al. 2020 "Energy-based out-of-distribution
  detection"): ``E(x) = -T * logsumexp(f(x) / T)`` of the classifier's logits; low energy means
  in-distribution for the classifier, so the lowest-energy images are kept.
* BN-sensitivity filter (GenQ's leave-one-out batch score): with ``L(S)`` the BN loss of a set's
  statistics (the loss of :mod:`~dfqkern.datagen.bn_inversion`), image ``i`` of a group ``S`` (the
  whole candidate set by default) scores ``L(S without i) - L(S)``: how much the mismatch rises when
  it is left out. The images whose removal raises it most are kept.
* BN-deviation filter (per image, not GenQ's): how far the statistics one image induces on its own
  are from the running statistics; the least deviating images are kept.
* Patch-similarity filter (GenQ's filter for ViTs, which have no BN statistics): the PSAQ-ViT
  patch-similarity entropy of an image (:func:`~dfqkern.datagen.vit_inversion.patch_similarity_entropy`,
  mean over the attention modules' outputs); diverse patch tokens mean a real-looking image to the
  ViT, so the highest-entropy images are kept.

The ``*_filter`` functions return the kept indices (ascending, ``torch.long``) so they compose with
``torch.utils.data.Subset``. Select with ``keep_fraction`` (keep the best ``ceil(f * N)``) or
``threshold`` (keep scores ``<= threshold``; for the BN sensitivity ``>= threshold``), exactly one.
:func:`filter_synthetic_set` runs a chain of :class:`~dfqkern.datagen.config.FilterStep` over a
finished synthetic set and writes the kept images as a new set whose manifest records the chain.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .bn_inversion import BNCapture, bn_layers, bn_moment_loss, model_device
from .config import DEFAULT_SHARD_SIZE, FilterStep, parse_filters
from .vit_inversion import attention_modules, image_patch_entropy


def _batches(data, batch_size: int, transform) -> Iterator[torch.Tensor]:
    """Image batches from a tensor ``[N, C, H, W]`` or a Dataset whose items are images or
    (image, label) pairs; ``transform`` (e.g. the classifier's normalization) applied per batch."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(data.shape)}")
        chunks = (data[s:s + batch_size] for s in range(0, len(data), batch_size))
    else:
        def from_dataset():
            for s in range(0, len(data), batch_size):
                items = [data[i] for i in range(s, min(s + batch_size, len(data)))]
                yield torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
        chunks = from_dataset()
    for x in chunks:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        yield transform(x) if transform is not None else x


@torch.no_grad()
def energy_scores(model: nn.Module, data, *, temperature: float = 1.0, batch_size: int = 128,
                  transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """``E = -T * logsumexp(logits / T)`` per image (float32, CPU)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device, was_training = model_device(model), model.training
    model.eval()
    try:
        out = [(-temperature * torch.logsumexp(model(x.to(device)).float() / temperature, dim=1)).cpu()
               for x in _batches(data, batch_size, transform)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def bn_image_moments(model: nn.Module, data, *, batch_size: int = 128,
                     transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None):
    """Per image and BN layer: sums of x and x^2 per channel over space (float64, CPU) and the
    spatial count, in eval mode. Returns ``(layers, [(s1 [N, C], s2 [N, C], count), ...])``."""
    device, was_training = model_device(model), model.training
    model.eval()
    parts = None
    try:
        with BNCapture(model) as cap:
            for x in _batches(data, batch_size, transform):
                model(x.to(device))
                mom = [(a.double().sum(dim=(2, 3)).cpu(), a.double().pow(2).sum(dim=(2, 3)).cpu(),
                        a.shape[2] * a.shape[3]) for a in cap.inputs]
                parts = [[m] for m in mom] if parts is None else [p + [m] for p, m in zip(parts, mom)]
            layers = cap.layers
    finally:
        model.train(was_training)
    if parts is None:
        raise ValueError("no images to score")
    return layers, [(torch.cat([a for a, _, _ in p]), torch.cat([b for _, b, _ in p]), p[0][2]) for p in parts]


def set_bn_loss(layers, moments, indices: "Sequence[int] | None" = None) -> float:
    """BN loss of the statistics of the images ``indices`` (all if None) from :func:`bn_image_moments`."""
    sel = slice(None) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    n = len(moments[0][0][sel])
    return float(bn_moment_loss(layers, [(s1[sel].sum(0), s2[sel].sum(0), c * n) for s1, s2, c in moments]))


def bn_sensitivity_scores(model: nn.Module, data, *, batch_size: int = 128, group_size: "int | None" = None,
                          transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None,
                          moments=None) -> torch.Tensor:
    """GenQ's leave-one-out BN score per image (float32, CPU): ``L(S without i) - L(S)`` for the group
    ``S`` holding image ``i`` (the whole set, or consecutive groups of ``group_size``); higher = the
    image does more to bring the group's statistics to the running ones. A lone image scores 0.
    ``moments`` (from :func:`bn_image_moments`) skips the forward passes."""
    layers, mom = moments if moments is not None else bn_image_moments(model, data, batch_size=batch_size,
                                                                       transform=transform)
    total = len(mom[0][0])
    size = total if group_size is None else int(group_size)
    if size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size!r}")
    out = torch.zeros(total)
    for start in range(0, total, size):
        g = slice(start, min(start + size, total))
        n = g.stop - g.start
        if n < 2:
            continue
        full = bn_moment_loss(layers, [(s1[g].sum(0), s2[g].sum(0), c * n) for s1, s2, c in mom])
        without = bn_moment_loss(layers, [(s1[g].sum(0) - s1[g], s2[g].sum(0) - s2[g], c * (n - 1))
                                          for s1, s2, c in mom])
        out[g] = (without - full).float()
    return out


@torch.no_grad()
def bn_deviation_scores(model: nn.Module, data, *, batch_size: int = 128,
                        transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """Per-image BN-statistics deviation (float32, CPU); lower is closer to the training statistics."""
    device, was_training = model_device(model), model.training
    model.eval()
    out = []
    try:
        with BNCapture(model) as cap:
            for x in _batches(data, batch_size, transform):
                model(x.to(device))
                score = torch.zeros(x.shape[0], device=device)
                for layer, a in zip(cap.layers, cap.inputs):
                    a = a.float()
                    mean = a.mean(dim=(2, 3))
                    std = torch.sqrt(a.var(dim=(2, 3), unbiased=False) + layer.eps)
                    rm = layer.running_mean.float()
                    rs = torch.sqrt(layer.running_var.float() + layer.eps)
                    score += torch.linalg.vector_norm(mean - rm, dim=1) + torch.linalg.vector_norm(std - rs, dim=1)
                out.append(score.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def patch_similarity_scores(model: nn.Module, data, *, batch_size: int = 128, source: str = "attention",
                            transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """Patch-similarity entropy per image (float32, CPU; higher = more diverse patch tokens), in eval
    mode; a ValueError for a model without self-attention."""
    check_filter_model(model, [FilterStep("patchsim", 1.0)])
    device = model_device(model)
    out = [image_patch_entropy(model, x.to(device), source=source) for x in _batches(data, batch_size, transform)]
    return torch.cat(out) if out else torch.empty(0)


def patch_similarity_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                            threshold: "float | None" = None, batch_size: int = 128,
                            transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """GenQ's ViT filter: indices of the highest patch-similarity entropy images (``threshold``:
    those scoring ``>= threshold``)."""
    _check_selection(keep_fraction, threshold)
    scores = patch_similarity_scores(model, data, batch_size=batch_size, transform=transform)
    return select_lowest(-scores, keep_fraction, None if threshold is None else -threshold)


def check_filter_model(model: nn.Module, steps: Sequence["FilterStep | str"]) -> None:
    """A ValueError naming the filter when ``model`` lacks what a step of ``steps`` scores (``bn``:
    BatchNorm statistics, ``patchsim``: self-attention), so a chain fails before its pool is made."""
    kinds = {(s if isinstance(s, FilterStep) else parse_filters([s])[0]).kind for s in steps}
    if "bn" in kinds:
        try:
            bn_layers(model)
        except ValueError as err:
            raise ValueError(f"filter 'bn': {err}") from None
    if "patchsim" in kinds:
        attention_modules(model, "filter 'patchsim'")


def _check_selection(keep_fraction, threshold) -> None:
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction (0 < f <= 1) or threshold")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")


def keep_count(keep_fraction: float, n: int) -> int:
    return math.ceil(keep_fraction * n - 1e-9)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` lowest scores; ties at the cut broken by index (stable)."""
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[:k]).values.long()


def select_lowest(scores: torch.Tensor, keep_fraction: "float | None" = None,
                  threshold: "float | None" = None) -> torch.Tensor:
    """Indices (ascending) of the lowest scores: the best ``ceil(keep_fraction * N)`` or all
    ``<= threshold``. Ties at the cut are broken by index (stable)."""
    _check_selection(keep_fraction, threshold)
    if keep_fraction is not None:
        return lowest_k(scores, keep_count(keep_fraction, len(scores)))
    return torch.nonzero(scores <= threshold).flatten().long()


def energy_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                  threshold: "float | None" = None, temperature: float = 1.0, batch_size: int = 128,
                  transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """GenQ energy filter: indices of the lowest-energy (most in-distribution) images."""
    _check_selection(keep_fraction, threshold)
    scores = energy_scores(model, data, temperature=temperature, batch_size=batch_size, transform=transform)
    return select_lowest(scores, keep_fraction, threshold)


def bn_sensitivity_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                          threshold: "float | None" = None, batch_size: int = 128, group_size: "int | None" = None,
                          transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """GenQ BN-sensitivity filter: indices of the images whose removal raises the BN loss most
    (``threshold``: those whose leave-one-out score is ``>= threshold``)."""
    _check_selection(keep_fraction, threshold)
    scores = bn_sensitivity_scores(model, data, batch_size=batch_size, group_size=group_size, transform=transform)
    return select_lowest(-scores, keep_fraction, None if threshold is None else -threshold)


def bn_deviation_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                        threshold: "float | None" = None, batch_size: int = 128,
                        transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """Indices of the images whose own BN statistics deviate least from the running statistics."""
    _check_selection(keep_fraction, threshold)
    scores = bn_deviation_scores(model, data, batch_size=batch_size, transform=transform)
    return select_lowest(scores, keep_fraction, threshold)


# ----------------------------------------------------------------------------- filtered sets

def _summary(x: torch.Tensor) -> dict:
    return {"min": float(x.min()), "mean": float(x.mean()), "max": float(x.max())} if len(x) else {}


def filter_synthetic_set(source, out_dir, model: nn.Module, steps: Sequence["FilterStep | str"], *,
                         num_images: "int | None" = None, batch_size: int = 128,
                         transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None,
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Run the filter chain ``steps`` over the finished set ``source`` and write the kept images as a
    new set in ``out_dir``; returns ``out_dir``.

    Each step scores the images the previous one kept (``energy``: lowest energy kept; ``bn``: GenQ's
    leave-one-out score over the step's candidates, highest kept; ``patchsim``: patch-similarity
    entropy, highest kept) and keeps ``ceil(keep_fraction * n)``
    of them; with ``num_images`` the last step keeps exactly that many (generate a pool of
    :func:`~dfqkern.datagen.config.pool_size` images for it). ``transform`` maps the stored [0, 1]
    images to the model's input (default: the set's recorded normalization). Images are copied
    losslessly in their source order; each entry keeps its metadata plus ``source_index`` and its
    ``filter_scores``; the manifest's ``filter`` records the source, the chain and per step the
    candidates, the kept count and the score summaries (for ``bn`` also the BN loss of the set before
    and after). Resumable like any set (the writer's config is the source manifest's digest + chain).
    """
    from .store import MANIFEST, SyntheticSetWriter, fill_set, load_synthetic, sha256_bytes

    steps = [s if isinstance(s, FilterStep) else parse_filters([s])[0] for s in steps]
    if not steps:
        raise ValueError("filter_synthetic_set needs at least one filter step")
    check_filter_model(model, steps)
    src = load_synthetic(source)
    to_input = transform if transform is not None else (lambda x: src.normalize(x))  # noqa: E731
    data = torch.utils.data.Subset(src, [])
    kept = torch.arange(len(src))
    scores_of: dict = {}
    chain = []
    for j, step in enumerate(steps):
        data.indices = kept.tolist()
        k = keep_count(step.keep_fraction, len(kept))
        if j == len(steps) - 1 and num_images is not None:
            if not 1 <= num_images <= len(kept):
                raise ValueError(f"cannot keep {num_images} images: the filter chain has {len(kept)} candidates "
                                 f"at its last step (generate a larger pool)")
            k = num_images
        info = {**step.to_dict(), "candidates": len(kept), "kept": k}
        if step.kind == "energy":
            scores = energy_scores(model, data, batch_size=batch_size, transform=to_input)
            sel = lowest_k(scores, k)
            info["score"] = "energy = -logsumexp(logits), lowest kept"
        elif step.kind == "patchsim":
            scores = patch_similarity_scores(model, data, batch_size=batch_size, transform=to_input)
            sel = lowest_k(-scores, k)
            info["score"] = "patch-similarity entropy of the attention outputs (PSAQ-ViT), highest kept"
        else:
            moments = bn_image_moments(model, data, batch_size=batch_size, transform=to_input)
            scores = bn_sensitivity_scores(model, data, moments=moments)
            sel = lowest_k(-scores, k)
            info["score"] = "BN loss without the image - BN loss of the candidates, highest kept"
            info["set_bn_loss"] = {"candidates": set_bn_loss(*moments), "kept": set_bn_loss(*moments, sel.tolist())}
        info.update(scores=_summary(scores), kept_scores=_summary(scores[sel]))
        for i, sc in zip(kept.tolist(), scores.tolist()):
            scores_of.setdefault(i, {})[step.kind] = sc
        kept = kept[sel]
        chain.append(info)
    order = kept.tolist()
    manifest = src.manifest
    source_info = {"path": str(Path(source)), "num_images": len(src),
                   "manifest_sha256": sha256_bytes((Path(source) / MANIFEST).read_bytes())}
    entries = [{**{k: v for k, v in src.entries[i].items() if k not in ("index", "file", "sha256")},
                "source_index": i, "filter_scores": scores_of[i]} for i in order]
    meta = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "dfqkern_version", "config",
                                                          "num_images", "shard_size", "channels", "images",
                                                          "image_size", "filter")}
    meta["filter"] = {"source": source_info, "chain": chain}
    config = {"filter": [s.to_dict() for s in steps], "num_images": len(order),
              "source_manifest_sha256": source_info["manifest_sha256"], "source_config": manifest.get("config")}
    writer = SyntheticSetWriter(out_dir, entries=entries, config=config, meta=meta, channels=src.channels,
                                shard_size=DEFAULT_SHARD_SIZE, overwrite=overwrite)

    def produce(indices):
        yield indices, torch.stack([src.image_uint8(order[i]) for i in indices])

    fill_set(writer, produce, progress=progress, desc="filtered set")
    return Path(out_dir)
