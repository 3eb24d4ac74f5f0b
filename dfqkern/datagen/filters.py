"""Filters that keep the synthetic images most useful for calibration. Usable on any image set.

* Energy filter (GenQ, Jeon et al. 2024, after Liu et al. 2020 "Energy-based out-of-distribution
  detection"): ``E(x) = -T * logsumexp(f(x) / T)`` of the classifier's logits; low energy means
  in-distribution for the classifier, so the lowest-energy images are kept.
* BN-sensitivity filter: score each image by how far the activation statistics it induces on its
  own (per-image, per-channel mean and standard deviation over space at every BatchNorm2d input)
  are from the layers' running statistics, summed over layers as
  ``||mu_i - mu_BN||_2 + ||sigma_i - sigma_BN||_2``; the least deviating images are kept.

Both return the kept indices (ascending, ``torch.long``) so they compose with
``torch.utils.data.Subset``. Select with ``keep_fraction`` (keep the best ``ceil(f * N)``) or
``threshold`` (keep scores ``<= threshold``), exactly one of the two.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .bn_inversion import BNCapture, model_device


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
def bn_sensitivity_scores(model: nn.Module, data, *, batch_size: int = 128,
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


def _check_selection(keep_fraction, threshold) -> None:
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction (0 < f <= 1) or threshold")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")


def select_lowest(scores: torch.Tensor, keep_fraction: "float | None" = None,
                  threshold: "float | None" = None) -> torch.Tensor:
    """Indices (ascending) of the lowest scores: the best ``ceil(keep_fraction * N)`` or all
    ``<= threshold``. Ties at the cut are broken by index (stable)."""
    _check_selection(keep_fraction, threshold)
    if keep_fraction is not None:
        k = math.ceil(keep_fraction * len(scores) - 1e-9)
        order = torch.sort(scores, stable=True).indices
        return torch.sort(order[:k]).values.long()
    return torch.nonzero(scores <= threshold).flatten().long()


def energy_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                  threshold: "float | None" = None, temperature: float = 1.0, batch_size: int = 128,
                  transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """GenQ energy filter: indices of the lowest-energy (most in-distribution) images."""
    _check_selection(keep_fraction, threshold)
    scores = energy_scores(model, data, temperature=temperature, batch_size=batch_size, transform=transform)
    return select_lowest(scores, keep_fraction, threshold)


def bn_sensitivity_filter(model: nn.Module, data, *, keep_fraction: "float | None" = None,
                          threshold: "float | None" = None, batch_size: int = 128,
                          transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """Indices of the images whose BN statistics deviate least from the running statistics."""
    _check_selection(keep_fraction, threshold)
    scores = bn_sensitivity_scores(model, data, batch_size=batch_size, transform=transform)
    return select_lowest(scores, keep_fraction, threshold)
