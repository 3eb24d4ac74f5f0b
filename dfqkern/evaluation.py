"""Top-1 accuracy of a (float, fake-quant or packed) classifier on a labelled dataset."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["evaluate_top1"]


def evaluate_top1(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
                  num_workers: int = 0, progress: bool = True, limit: int | None = None) -> dict:
    """Return ``{"top1": percent, "n": images, "correct": count}`` over the first ``limit`` items.

    The model is moved to ``device`` and run in eval mode under ``torch.inference_mode``; its
    train/eval mode is restored afterwards. Items with label -1 (unlabeled) or a label the model has
    no output for are an error.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to evaluate")
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.to(device).eval()
    correct = seen = 0
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress):
                labels = torch.as_tensor(labels).to(device)
                if (labels < 0).any():
                    raise ValueError("dataset has unlabeled images (label -1): top-1 needs labels "
                                     "(class subfolders or a labels csv)")
                logits = model(images.to(device))
                if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
                    raise ValueError(f"model output must be [batch, classes] logits, got shape "
                                     f"{tuple(logits.shape)} for a batch of {labels.shape[0]}")
                if (labels >= logits.shape[1]).any():  # it could never be right: the data is labelled for another head
                    raise ValueError(f"dataset has label {int(labels.max())} but the model has {logits.shape[1]} "
                                     f"outputs (classes 0-{logits.shape[1] - 1})")
                correct += (logits.argmax(dim=1) == labels).sum().item()
                seen += labels.shape[0]
    finally:
        model.train(was_training)
    return {"top1": 100.0 * correct / seen, "n": seen, "correct": correct}
