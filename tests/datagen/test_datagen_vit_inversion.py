"""Data-free images for ViTs (dfqkern.datagen.vit_inversion): the patch-similarity entropy against its
formula, psaq / dfq-vit through invert_bn and the SyntheticSet machinery (store, resume, mixup labels),
the patchsim filter, and the errors for a model that does not suit the method."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen import filters as Fl
from dfqkern.datagen import vit_inversion as V
from dfqkern.datagen.store import MANIFEST, load_synthetic
from synthetic_writes import watch_writes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vit"))
from vit_models import build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def entropy_by_hand(tokens, h, grid_points):
    """The module docs' formula written out in plain Python, for one image [N, D]."""
    n = len(tokens)
    unit = [[v / math.sqrt(sum(c * c for c in t)) for v in t] for t in tokens]
    sims = [sum(a * b for a, b in zip(unit[i], unit[j])) for i in range(n) for j in range(i + 1, n)]
    step = 2 / (grid_points - 1)
    total = 0.0
    for g in range(grid_points):
        t = -1 + g * step
        p = sum(math.exp(-(t - s) ** 2 / (2 * h * h)) for s in sims) / (len(sims) * h * math.sqrt(2 * math.pi))
        total -= p * math.log(max(p, V.KDE_FLOOR)) * step
    return total


def test_entropy_matches_the_formula():
    tokens = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [-1, 0.5, 2]],
                           [[1.0, 2, 3], [1, 2, 3.5], [0.9, 2, 3], [1, 1.8, 3]]])
    got = V.patch_similarity_entropy(tokens, bandwidth=0.1, grid_points=41)
    want = [entropy_by_hand(t.tolist(), 0.1, 41) for t in tokens]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    assert got[0] > got[1]  # spread-out tokens: higher entropy than near-parallel ones
    # groups (windows) are averaged per image
    grouped = V.patch_similarity_entropy(tokens[None], bandwidth=0.1, grid_points=41)
    assert torch.allclose(grouped, got.mean()[None], atol=1e-6)


def test_entropy_of_identical_tokens_is_that_of_half_a_gaussian():
    # every similarity is 1: the density on [-1, 1] is half a N(1, h^2), whose entropy is half of
    # 0.5 log(2 pi e h^2) (the continuum limit of the grid sum)
    h = 0.05
    got = V.patch_similarity_entropy(torch.ones(1, 5, 8), bandwidth=h, grid_points=20001)
    assert got.item() == pytest.approx(0.25 * math.log(2 * math.pi * math.e * h * h), abs=1e-3)


def test_pair_subset_is_fixed_and_bounded():
    tokens = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(0))
    a = V.patch_similarity_entropy(tokens, max_pairs=100)
    assert torch.equal(a, V.patch_similarity_entropy(tokens, max_pairs=100))  # same pairs every call
    assert not torch.allclose(a, V.patch_similarity_entropy(tokens))  # 780 pairs: all of them by default


def test_capture_reads_every_attention_kind():
    for name in ("vit_qkv", "vit_mha", "torchvision_vit"):
        model, x = build(name)
        for source in ("attention", "block"):
            ent = V.image_patch_entropy(model, x[:3], source=source)
            assert ent.shape == (3,) and torch.isfinite(ent).all(), (name, source)


def test_a_module_that_did_not_run_is_reported():
    # (a fused fast path, e.g. nn.TransformerEncoderLayer's without gradients, would skip the hooked module)
    model, x = build("vit_mha")
    with V.PatchCapture(model, "attention") as cap:
        with pytest.raises(RuntimeError, match=r"module\(s\) \['blocks.layers.0.self_attn', .*did not run"):
            cap.tokens(2)
        model(x[:2])
        assert [t.shape for t in cap.tokens(2)] == [(2, 1, 65, 32)] * 2


@pytest.mark.parametrize("name", ["vit_qkv", "vit_mha"])
def test_psaq_raises_the_entropy_and_the_targets_are_reached(name):
    model, x = build(name)
    kw = dict(iters=25, batch_size=4, input_shape=x.shape[1:], progress=False, seed=0)
    res = B.invert_bn(model, 4, "psaq", "single", **kw)
    flat = B.invert_bn(model, 4, "psaq", "single", patch_weight=0.0, **kw)
    assert res.bn_loss_history[-1] > res.bn_loss_history[0] + 0.2
    final = V.image_patch_entropy(model, res.images).mean()
    assert final > V.image_patch_entropy(model, flat.images).mean() + 0.1  # the entropy term did it
    with torch.no_grad():  # the target term alone (a random ViT's entropy term outweighs it at weight 1)
        pred = model(flat.images).argmax(1)
    assert torch.equal(pred, torch.tensor([c[0] for c in flat.classes]))


def test_dfq_vit_ramps_the_focal_exponent():
    cfg = B.BNInversionConfig(method="dfq-vit", iters=5, focal_gamma=2.0)
    assert [V.difficulty_gamma(cfg, i) for i in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert V.difficulty_gamma(B.BNInversionConfig(method="psaq"), 3) is None
    model, x = build("vit_qkv")
    kw = dict(iters=6, batch_size=3, input_shape=x.shape[1:], progress=False, seed=2, label_mode="mixup")
    psaq = B.invert_bn(model, 3, "psaq", **kw).images
    # gamma 0 throughout is psaq; the ramp changes the images
    assert torch.equal(B.invert_bn(model, 3, "dfq-vit", focal_gamma=0.0, **kw).images, psaq)
    assert not torch.allclose(B.invert_bn(model, 3, "dfq-vit", **kw).images, psaq)


def test_vit_set_store_and_resume(tmp_path, monkeypatch):
    model, x = build("vit_qkv")
    kw = dict(num_images=4, input_shape=tuple(x.shape[1:]), mean=[0.5] * 3, std=[0.25] * 3, method="dfq-vit",
              label_mode="mixup", iters=3, batch_size=2, shard_size=2, seed=1, model_id="tiny-vit", progress=False)
    B.generate_bn_inversion_set(tmp_path / "ref", model, **kw)
    ds = load_synthetic(tmp_path / "ref")
    m = ds.manifest
    assert m["generator"]["id"] == "bn-inversion/dfq-vit" and m["label_type"] == "soft"
    assert m["config"]["method"] == "dfq-vit" and m["config"]["options"]["patch_source"] == "attention"
    assert all(len(e["classes"]) == 2 for e in m["images"])
    assert torch.isclose(ds[0][1].sum(), torch.tensor(1.0))

    watch_writes(monkeypatch, kill_when=lambda index, written: index == 3)  # dies in the second shard
    with pytest.raises(KeyboardInterrupt):
        B.generate_bn_inversion_set(tmp_path / "run", model, **kw)
    resumed = watch_writes(monkeypatch)
    B.generate_bn_inversion_set(tmp_path / "run", model, **kw)
    assert resumed == [2, 3]  # only the unfinished shard redone
    manifest = lambda name: json.loads((tmp_path / name / MANIFEST).read_text())  # noqa: E731
    assert manifest("run") == manifest("ref")
    with pytest.raises(ValueError, match="different configuration.*kde_bandwidth"):
        B.generate_bn_inversion_set(tmp_path / "run", model, **{**kw, "kde_bandwidth": 0.1})


def test_a_model_that_does_not_suit_the_method_fails_before_writing(tmp_path, make_tiny_bn_net):
    cnn = make_tiny_bn_net()
    base = dict(num_images=2, input_shape=(3, 8, 8), mean=[0.5] * 3, std=[0.25] * 3, iters=1, batch_size=2,
                progress=False)
    with pytest.raises(ValueError, match="method 'psaq' needs a vision transformer.*TinyBNNet"):
        B.generate_bn_inversion_set(tmp_path / "a", cnn, method="psaq", **base)
    vit, _ = build("vit_qkv")
    with pytest.raises(ValueError, match="no BatchNorm2d.*psaq or dfq-vit"):
        B.generate_bn_inversion_set(tmp_path / "b", vit, method="zeroq", **{**base, "input_shape": (3, 32, 32)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"kde_bandwidth": 0.0}, "kde_bandwidth must be > 0"),
    ({"patch_source": "mlp"}, "patch_source must be one of"),
    ({"patch_weight": -1.0}, "patch_weight must be a number >= 0"),
    ({"l2_weight": float("nan")}, "l2_weight must be a number >= 0"),
])
def test_bad_vit_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        B.BNInversionConfig(method="psaq", **kwargs)


def test_l2_prior_pulls_pixels_to_zero():
    model, x = build("timm_vit")
    kw = dict(iters=10, batch_size=2, input_shape=x.shape[1:], progress=False, label_mode="none")
    free = B.invert_bn(model, 2, "psaq", **kw).images
    held = B.invert_bn(model, 2, "psaq", l2_weight=50.0, **kw).images
    assert held.pow(2).mean() < 0.5 * free.pow(2).mean()


def test_patchsim_filter_keeps_the_most_diverse_images(tmp_path):
    model, x = build("vit_qkv")
    data = x[:6] * torch.linspace(0.1, 2.0, 6).reshape(-1, 1, 1, 1)  # from near-flat to contrasted images
    scores = Fl.patch_similarity_scores(model, data, batch_size=4)
    one_by_one = torch.cat([V.image_patch_entropy(model, data[i:i + 1]) for i in range(6)])
    assert torch.allclose(scores, one_by_one, atol=1e-5) and scores.unique().numel() == 6
    top = sorted(torch.argsort(one_by_one, descending=True)[:3].tolist())
    assert Fl.patch_similarity_filter(model, data, keep_fraction=0.5).tolist() == top

    B.generate_bn_inversion_set(tmp_path / "pool", model, num_images=4, input_shape=(3, 32, 32), mean=[0.5] * 3,
                                std=[0.25] * 3, method="psaq", iters=1, batch_size=2, progress=False)
    Fl.filter_synthetic_set(tmp_path / "pool", tmp_path / "kept", model, ["patchsim:0.5"], progress=False)
    kept = load_synthetic(tmp_path / "kept").manifest
    step = kept["filter"]["chain"][0]
    assert step["kind"] == "patchsim" and step["kept"] == 2 and "highest kept" in step["score"]
    pool = load_synthetic(tmp_path / "pool")
    all_scores = Fl.patch_similarity_scores(model, pool, transform=pool.normalize)
    best = sorted(torch.argsort(all_scores, descending=True)[:2].tolist())
    assert [e["source_index"] for e in kept["images"]] == best
    assert kept["images"][0]["filter_scores"]["patchsim"] == pytest.approx(all_scores[best[0]].item(), rel=1e-5)


def test_filters_check_the_model(make_tiny_bn_net):
    vit, _ = build("vit_qkv")
    with pytest.raises(ValueError, match="filter 'patchsim' needs a vision transformer"):
        Fl.check_filter_model(make_tiny_bn_net(), ["energy:0.5", "patchsim:0.5"])
    with pytest.raises(ValueError, match="filter 'bn': .*no BatchNorm2d"):
        Fl.check_filter_model(vit, ["bn:0.5"])
    Fl.check_filter_model(vit, ["energy:0.5", "patchsim:0.5"])
