import pytest
import torch
import torch.nn as nn

from dfqkern.datagen import filters as F
from dfqkern.datagen.store import SyntheticSetWriter, fill_set, load_synthetic


class LogitsAreTheImage(nn.Module):
    """The 'image' [N, C, 1, 1] is the logit vector: energies are known in closed form."""

    def forward(self, x):
        return x.flatten(1)


def _logits_as_images(logits):
    return logits.reshape(*logits.shape, 1, 1)


def test_energy_scores_closed_form():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, -5.0, 0.0], [3.0, 3.0, -1.0]])
    model = LogitsAreTheImage()
    for t in (1.0, 2.5):
        expected = -t * torch.logsumexp(logits / t, dim=1)
        torch.testing.assert_close(F.energy_scores(model, _logits_as_images(logits), temperature=t, batch_size=3),
                                   expected)


def test_energy_filter_keeps_lowest_energy():
    # Confident (large max logit) = low energy = in-distribution; flat/low logits = high energy.
    logits = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.1, 0.1, 0.1], [0.0, 7.0, 0.0], [-3.0, -3.0, -3.0]])
    x = _logits_as_images(logits)
    model = LogitsAreTheImage()
    assert F.energy_filter(model, x, keep_fraction=0.4).tolist() == [1, 3]
    assert F.energy_filter(model, x, keep_fraction=0.5).tolist() == [1, 2, 3]  # ceil(2.5) = 3
    assert F.energy_filter(model, x, keep_fraction=1.0).tolist() == [0, 1, 2, 3, 4]
    energies = F.energy_scores(model, x)
    assert F.energy_filter(model, x, threshold=float(energies[2])).tolist() == [1, 2, 3]
    assert F.energy_filter(model, x, threshold=-100.0).tolist() == []


class BNOnInput(nn.Module):
    """A BN layer directly on the input: per-image deviation is computable by hand."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        self.bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.bn(x).mean(dim=(2, 3)))


def test_bn_sensitivity_scores_and_filter():
    g = torch.Generator().manual_seed(0)
    model = BNOnInput().eval()
    z = torch.randn(6, 2, 16, 16, generator=g)
    z = (z - z.mean(dim=(2, 3), keepdim=True)) / z.std(dim=(2, 3), keepdim=True, unbiased=False)
    mean = torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1)
    std = torch.tensor([2.0, 0.5]).reshape(1, 2, 1, 1)
    # Images 1 and 4 match the running statistics exactly; the others are shifted or rescaled.
    shift = torch.tensor([3.0, 0.0, 1.0, 0.5, 0.0, 2.0]).reshape(6, 1, 1, 1)
    scale = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 0.3]).reshape(6, 1, 1, 1)
    x = z * std * scale + mean + shift
    scores = F.bn_sensitivity_scores(model, x, batch_size=4)
    eps = model.bn.eps
    for i in range(6):
        m = x[i].mean(dim=(1, 2))
        s = (x[i].var(dim=(1, 2), unbiased=False) + eps).sqrt()
        expected = (m - model.bn.running_mean).norm() + (s - (model.bn.running_var + eps).sqrt()).norm()
        assert scores[i] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert scores[1] < 1e-3 and scores[4] < 1e-3
    assert F.bn_sensitivity_filter(model, x, keep_fraction=2 / 6).tolist() == [1, 4]
    assert F.bn_sensitivity_filter(model, x, threshold=1e-3).tolist() == [1, 4]
    assert 3 in F.bn_sensitivity_filter(model, x, keep_fraction=0.5).tolist()  # small shift: next best


def test_filters_on_a_synthetic_set_with_transform(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
    images[2] = 128  # flat grey image
    writer = SyntheticSetWriter(tmp_path, entries=[{"classes": [0], "weights": [1.0]}] * 4, config={}, meta={})
    fill_set(writer, lambda idx: [(idx, images[idx])], progress=False)
    ds = load_synthetic(tmp_path)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5)).eval()
    seen = []

    def normalize(x):
        seen.append(x.shape)
        return (x - 0.5) / 0.25

    from_set = F.energy_scores(model, ds, transform=normalize, batch_size=3)
    from_tensor = F.energy_scores(model, (images.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(from_set, from_tensor)
    assert seen == [(3, 3, 4, 4), (1, 3, 4, 4)]
    kept = F.bn_sensitivity_filter(model, ds, keep_fraction=0.5, transform=normalize)
    assert kept.dtype == torch.long and len(kept) == 2
    assert torch.utils.data.Subset(ds, kept.tolist())[0][0].shape == (3, 4, 4)


def test_selection_errors():
    model = LogitsAreTheImage()
    x = _logits_as_images(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="exactly one of keep_fraction"):
        F.energy_filter(model, x)
    with pytest.raises(ValueError, match="exactly one of keep_fraction"):
        F.energy_filter(model, x, keep_fraction=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        F.energy_filter(model, x, keep_fraction=1.5)
    with pytest.raises(ValueError, match="temperature"):
        F.energy_scores(model, x, temperature=0)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        F.bn_sensitivity_scores(model, x)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        F.energy_scores(model, torch.zeros(3, 2))
