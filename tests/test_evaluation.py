"""Top-1 evaluation: exact counts on constructed data, error cases, the real ResNet-20."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from dfqkern.data import ImageFolderDataset, TarImageDataset, build_transform
from dfqkern.evaluation import evaluate_top1
from dfqkern.models import create_model, input_spec


class ArgmaxOfInput(nn.Module):
    """Logits = the (one-hot) input: the test controls exactly which items are right."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # so .to(device) / train() have something to act on

    def forward(self, x):
        return x.flatten(1) * self.scale


def _dataset(preds: list[int], labels: list[int], classes: int = 4) -> TensorDataset:
    x = torch.nn.functional.one_hot(torch.tensor(preds), classes).float()
    return TensorDataset(x, torch.tensor(labels))


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40),
       batch_size=st.integers(1, 50), limit=st.one_of(st.none(), st.integers(1, 60)))
def test_top1_counts_exactly(data, batch_size, limit):
    preds, labels = map(list, zip(*data))
    result = evaluate_top1(ArgmaxOfInput(), _dataset(preds, labels), batch_size=batch_size,
                           progress=False, limit=limit)
    k = len(data) if limit is None else min(limit, len(data))
    correct = sum(p == t for p, t in zip(preds[:k], labels[:k]))
    assert result == {"top1": pytest.approx(100.0 * correct / k), "n": k, "correct": correct}


def test_restores_mode_and_runs_without_grad():
    model = ArgmaxOfInput().train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    evaluate_top1(model, _dataset([0, 1], [0, 0]), progress=False)
    assert seen == [(False, False)] and model.training


def test_errors():
    model, ds = ArgmaxOfInput(), _dataset([0, 1], [0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_top1(model, ds, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="limit"):
        evaluate_top1(model, ds, limit=0, progress=False)
    with pytest.raises(ValueError, match="dataset is empty"):
        evaluate_top1(model, TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(ValueError, match="unlabeled"):
        evaluate_top1(model, _dataset([0, 1], [0, -1]), progress=False)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        evaluate_top1(nn.Flatten(0), ds, progress=False)


def test_image_folder_end_to_end(tiny_image_folder):
    # A model that always says class 1 ("dog") is right on exactly the dog images.
    class AlwaysDog(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3)

    spec = input_spec("cifar10_resnet20")
    ds = ImageFolderDataset(tiny_image_folder, build_transform(spec))
    result = evaluate_top1(AlwaysDog(), ds, batch_size=2, progress=False)
    assert result["n"] == len(ds) and result["correct"] == ds.targets.count(1)


def _dev(cifar10_dir, **kw):
    spec = input_spec("cifar10_resnet20")
    return TarImageDataset(cifar10_dir / "cifar10_test_dev_jpeg.tar.gz", cifar10_dir / "cifar10_test_dev_labels.csv",
                           build_transform(spec), **kw)


def test_resnet20_real_checkpoint_top1(cifar10_dir):
    # 1000 dev images, every 5th in csv order: 100 per class. (The csv is sorted by class, so its
    # first 1000 rows are only airplanes and cars: 76.7 %, not representative of the whole set.)
    model = create_model("cifar10_resnet20", checkpoint=cifar10_dir / "resnet20-12fca82f.th")
    result = evaluate_top1(model, _dev(cifar10_dir, indices=range(0, 5000, 5)), progress=False)
    assert result["n"] == 1000
    assert result["top1"] >= 78.0, result


@pytest.mark.slow
def test_resnet20_full_dev_matches_readme(cifar10_dir):
    # shared/data/cifar10/README.md: measured FP top-1 on the 5,000 dev images is 81.02 %.
    model = create_model("cifar10_resnet20", checkpoint=cifar10_dir / "resnet20-12fca82f.th")
    result = evaluate_top1(model, _dev(cifar10_dir), progress=False)
    assert result["n"] == 5000 and result["correct"] == 4051
