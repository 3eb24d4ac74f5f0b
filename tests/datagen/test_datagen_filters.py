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


def test_bn_deviation_scores_and_filter():
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
    scores = F.bn_deviation_scores(model, x, batch_size=4)
    eps = model.bn.eps
    for i in range(6):
        m = x[i].mean(dim=(1, 2))
        s = (x[i].var(dim=(1, 2), unbiased=False) + eps).sqrt()
        expected = (m - model.bn.running_mean).norm() + (s - (model.bn.running_var + eps).sqrt()).norm()
        assert scores[i] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert scores[1] < 1e-3 and scores[4] < 1e-3
    assert F.bn_deviation_filter(model, x, keep_fraction=2 / 6).tolist() == [1, 4]
    assert F.bn_deviation_filter(model, x, threshold=1e-3).tolist() == [1, 4]
    assert 3 in F.bn_deviation_filter(model, x, keep_fraction=0.5).tolist()  # small shift: next best


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


def test_bn_sensitivity_is_the_leave_one_out_change_of_the_set_loss(make_tiny_bn_net):
    """GenQ's score: L(set without i) - L(set), computed from moments, equals recomputing the loss."""
    from dfqkern.datagen.bn_inversion import bn_statistics_loss

    net = make_tiny_bn_net()
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[2] = x[2] * 3 + 2  # far from the statistics: leaving it out lowers the loss
    scores = F.bn_sensitivity_scores(net, x, batch_size=3)
    full = bn_statistics_loss(net, x)
    for i in range(7):
        without = bn_statistics_loss(net, torch.cat([x[:i], x[i + 1:]]))
        assert float(scores[i]) == pytest.approx(without - full, rel=1e-4, abs=1e-5)
    assert scores.argmin() == 2
    kept = F.bn_sensitivity_filter(net, x, keep_fraction=6 / 7)
    assert 2 not in kept.tolist() and len(kept) == 6
    grouped = F.bn_sensitivity_scores(net, x, group_size=4)
    first = bn_statistics_loss(net, x[:4])
    assert float(grouped[0]) == pytest.approx(bn_statistics_loss(net, x[1:4]) - first, rel=1e-4, abs=1e-5)
    assert float(grouped[6]) != 0 and F.bn_sensitivity_scores(net, x, group_size=1).abs().sum() == 0
    assert F.bn_sensitivity_filter(net, x, threshold=float(scores.max())).tolist() == [int(scores.argmax())]


def test_filter_synthetic_set_chain_and_manifest(tmp_path, make_tiny_bn_net):
    from dfqkern.datagen import generate_bn_inversion_set
    from dfqkern.datagen.bn_inversion import bn_statistics_loss
    from dfqkern.datagen.config import FilterStep, pool_size

    net = make_tiny_bn_net()
    steps = [FilterStep("energy", 0.5), "bn:0.5"]
    n = pool_size(3, [FilterStep("energy", 0.5), FilterStep("bn", 0.5)])
    assert n == 12
    generate_bn_inversion_set(tmp_path / "pool", net, num_images=n, input_shape=(3, 8, 8), mean=[0.5] * 3,
                              std=[0.25] * 3, method="zeroq", iters=3, batch_size=4, progress=False)
    pool = load_synthetic(tmp_path / "pool")
    out = F.filter_synthetic_set(tmp_path / "pool", tmp_path / "kept", net, steps, num_images=3, progress=False)
    ds = load_synthetic(out)
    chain = ds.manifest["filter"]["chain"]
    assert [(c["kind"], c["candidates"], c["kept"]) for c in chain] == [("energy", 12, 6), ("bn", 6, 3)]
    energies = F.energy_scores(net, pool, transform=pool.normalize)
    first = sorted(torch.sort(energies, stable=True).indices[:6].tolist())
    src = [e["source_index"] for e in ds.entries]
    assert set(src) <= set(first) and src == sorted(src)
    assert all(set(e["filter_scores"]) == {"energy", "bn"} for e in ds.entries)
    assert chain[0]["kept_scores"]["max"] <= chain[0]["scores"]["max"]
    kept_loss = bn_statistics_loss(net, pool.normalize(pool.images(src)))
    assert chain[1]["set_bn_loss"]["kept"] == pytest.approx(kept_loss, rel=1e-3)
    for i, e in zip(src, ds.entries):  # copied losslessly, metadata kept
        assert torch.equal(ds.image_uint8(ds.entries.index(e)), pool.image_uint8(i))
        assert e["seed"] == pool.entries[i]["seed"]
    assert ds.manifest["normalization"] == pool.manifest["normalization"]
    assert ds.manifest["config"]["filter"] == [{"kind": "energy", "keep_fraction": 0.5},
                                               {"kind": "bn", "keep_fraction": 0.5}]
    F.filter_synthetic_set(tmp_path / "pool", tmp_path / "kept", net, steps, num_images=3, progress=False)  # resumes
    with pytest.raises(ValueError, match="cannot keep 7 images"):
        F.filter_synthetic_set(tmp_path / "pool", tmp_path / "k2", net, steps, num_images=7, progress=False)


def test_filter_specs():
    from dfqkern.datagen.config import FilterStep, parse_filters, pool_size

    assert parse_filters(["energy:0.5,bn:0.25", "bn:1"]) == [FilterStep("energy", 0.5), FilterStep("bn", 0.25),
                                                             FilterStep("bn", 1.0)]
    assert pool_size(100, parse_filters(["energy:0.3"])) == 334
    for bad, match in (("energy", "KIND:KEEP_FRACTION"), ("energy:x", "KIND:KEEP_FRACTION"),
                       ("ood:0.5", "filter must be one of"), ("bn:0", "keep fraction")):
        with pytest.raises(ValueError, match=match):
            parse_filters([bad])
