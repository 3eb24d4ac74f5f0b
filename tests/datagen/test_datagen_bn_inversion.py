import json

import pytest
import torch

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen.store import MANIFEST, load_synthetic
from synthetic_writes import watch_writes

SHAPE = (3, 8, 8)


def _random_images(n, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", B.BN_METHODS)
@pytest.mark.parametrize("label_mode", B.LABEL_MODES)
def test_inversion_lowers_bn_loss(tiny_bn_net, method, label_mode):
    before = B.bn_statistics_loss(tiny_bn_net, _random_images(16))
    # The tiny random net's logit range is ~1, where DGH's 1/range stretch term would dominate the BN
    # term at its default weight (real models have ranges ~10); the stretch has its own test below.
    extra = {"stretch_weight": 0.1} if method == "dgh" else {}
    # genie's generator rate (0.01; higher rates saturate its tanh on ResNet-20) needs ~150
    # iterations here to fall as far as pixels do in 60 (0.44 of the start after 60, 0.15 after 150).
    iters = 150 if method in B.GENIE_METHODS else 60
    res = B.invert_bn(tiny_bn_net, 12, method, label_mode, iters=iters, batch_size=6, input_shape=SHAPE, seed=1,
                      progress=False, **extra)
    after = B.bn_statistics_loss(tiny_bn_net, res.images)
    assert after < 0.25 * before, (before, after)
    assert res.bn_loss_history[-1] < 0.5 * res.bn_loss_history[0]
    assert len(res.bn_loss_history) == iters
    assert res.images.shape == (12, *SHAPE) and torch.isfinite(res.images).all()
    k = {"none": 0, "single": 1, "mixup": 2}[label_mode]
    assert res.labels.shape == (12, 6) and torch.allclose(res.labels.sum(1), torch.full((12,), float(k > 0)))
    assert all(len(c) == k == len(set(c)) for c in res.classes)
    assert ((res.labels > 0).sum(1) == k).all()


def test_targets_are_learned(tiny_bn_net):
    def hit_rate(ce_weight):
        res = B.invert_bn(tiny_bn_net, 12, "zeroq", "single", iters=150, batch_size=12, input_shape=SHAPE,
                          seed=2, progress=False, ce_weight=ce_weight)
        return (tiny_bn_net(res.images).argmax(1) == res.labels.argmax(1)).float().mean()

    # The tiny random net's logits move little, so the target term needs a large weight here.
    with_target, without = hit_rate(10.0), hit_rate(0.0)
    assert with_target >= 0.75 and with_target > without + 0.3  # chance is 1/6


def test_genie_reaches_targets_with_diverse_images(make_tiny_bn_net):
    # 16x16 inputs give the generator two upsampling stages with room; the head is scaled x10 so the
    # logit range is ~10 as in trained models (the random head's ~1 caps what any image can reach).
    net = make_tiny_bn_net(size=16)
    with torch.no_grad():
        net.head.weight.mul_(10)
        net.head.bias.mul_(10)
    res = B.invert_bn(net, 12, "genie-labels", "single", iters=100, batch_size=12, input_shape=(3, 16, 16), seed=3,
                      progress=False)
    with torch.no_grad():
        hit = (net(res.images).argmax(1) == res.labels.argmax(1)).float().mean().item()
    dist = torch.cdist(res.images.flatten(1), res.images.flatten(1))[~torch.eye(12, dtype=torch.bool)]
    # Before the generator/latent rates were split (one rate, 0.05, for both; width 64) this gave
    # hit 0.5 (chance 1/6) and a pair of near-identical images (min/mean distance 0.002); now 0.83, 0.14.
    assert hit >= 0.75, hit
    assert dist.min() > 0.05 * dist.mean(), (dist.min(), dist.mean())
    assert res.bn_loss_history[-1] < 0.6 * res.bn_loss_history[0]


def test_model_left_untouched(tiny_bn_net):
    tiny_bn_net.train()
    tiny_bn_net.head.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in tiny_bn_net.state_dict().items()}
    B.invert_bn(tiny_bn_net, 4, "genie", iters=3, batch_size=4, input_shape=SHAPE, progress=False)
    assert tiny_bn_net.training
    assert not tiny_bn_net.head.weight.requires_grad and tiny_bn_net.head.bias.requires_grad
    for k, v in tiny_bn_net.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running stats included: the model runs in eval mode
    assert all(len(m._forward_pre_hooks) == 0 for m in tiny_bn_net.modules())


def test_deterministic_given_seed(tiny_bn_net):
    kw = dict(iters=5, batch_size=4, input_shape=SHAPE, progress=False)
    for method in B.BN_METHODS:
        a = B.invert_bn(tiny_bn_net, 6, method, "mixup", seed=3, **kw)
        b = B.invert_bn(tiny_bn_net, 6, method, "mixup", seed=3, **kw)
        c = B.invert_bn(tiny_bn_net, 6, method, "mixup", seed=4, **kw)
        assert torch.equal(a.images, b.images) and a.classes == b.classes, method
        assert not torch.equal(a.images, c.images), method


def test_set_statistics_are_those_of_the_whole_set(tiny_bn_net):
    # DGH's loss for one batch is the BN loss of the whole set (other batches from the cache).
    batches = [_random_images(4, seed=s) * (1 + s) for s in range(3)]
    with B.BNCapture(tiny_bn_net) as cap:
        with torch.no_grad():
            moments = []
            for x in batches:
                tiny_bn_net(x)
                moments.append(cap.moments())
        stats = B.SetStatistics(cap, moments)
        assert stats.loss() == pytest.approx(B.bn_statistics_loss(tiny_bn_net, torch.cat(batches)), rel=1e-6)
        new = (batches[1] * 0.5 + 0.1).requires_grad_(True)
        tiny_bn_net(new)
        live = cap.moments()
        own = cap.batch_loss().item()
        loss = stats.loss_with(1, live)
        assert float(loss) != pytest.approx(own, rel=1e-2)  # not the batch's own loss ...
        whole = torch.cat([batches[0], new.detach(), batches[2]])
        assert float(loss) == pytest.approx(B.bn_statistics_loss(tiny_bn_net, whole), rel=1e-5)  # ... the set's
        loss.backward()
        assert new.grad is not None and new.grad.abs().sum() > 0
        stats.update(1, live)
        assert stats.loss() == pytest.approx(B.bn_statistics_loss(tiny_bn_net, whole), rel=1e-5)


def test_jitter_augmentation_is_seeded(tiny_bn_net):
    kw = dict(iters=20, batch_size=4, input_shape=SHAPE, progress=False, jitter=2)
    a = B.invert_bn(tiny_bn_net, 4, "zeroq", seed=0, **kw)
    assert torch.equal(a.images, B.invert_bn(tiny_bn_net, 4, "zeroq", seed=0, **kw).images)
    plain = B.invert_bn(tiny_bn_net, 4, "zeroq", seed=0, **{**kw, "jitter": 0})
    assert not torch.equal(a.images, plain.images)
    assert a.bn_loss_history[-1] < a.bn_loss_history[0]
    with pytest.raises(ValueError, match="jitter must be"):
        B.invert_bn(tiny_bn_net, 4, "zeroq", seed=0, **{**kw, "jitter": -1})


def test_dgh_history_is_the_set_loss(tiny_bn_net):
    res = B.invert_bn(tiny_bn_net, 16, "dgh", iters=80, batch_size=4, input_shape=SHAPE, seed=0,
                      stretch_weight=0.0, ce_weight=0.0, progress=False)
    set_loss = B.bn_statistics_loss(tiny_bn_net, res.images)
    assert res.bn_loss_history[-1] == pytest.approx(set_loss, rel=0.5, abs=5e-3)
    assert set_loss < 0.05 * B.bn_statistics_loss(tiny_bn_net, _random_images(16))


def test_dgh_stretches_the_output_distribution(tiny_bn_net):
    kw = dict(iters=60, batch_size=8, input_shape=SHAPE, seed=0, progress=False)
    plain = B.invert_bn(tiny_bn_net, 8, "dgh", stretch_weight=0.0, **kw)
    # The tiny random net's logits barely move, so the stretch term needs a large weight here.
    stretched = B.invert_bn(tiny_bn_net, 8, "dgh", stretch_weight=20.0, **kw)

    def logit_range(x):
        z = tiny_bn_net(x)
        return (z.max(1).values - z.min(1).values).mean()

    assert logit_range(stretched.images) > 1.4 * logit_range(plain.images)


def test_losses_match_their_definitions(make_tiny_bn_net):
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    target = torch.softmax(torch.randn(5, 4), dim=1)
    p = torch.softmax(logits, dim=1)
    torch.testing.assert_close(B._target_loss(logits, target, None), -(target * p.log()).sum(1).mean())
    torch.testing.assert_close(B._target_loss(logits, target, 2.0),
                               -(target * (1 - p) ** 2 * p.log()).sum(1).mean())
    rng = (logits.max(1).values - logits.min(1).values).mean()
    torch.testing.assert_close(B._stretch_loss(logits), 1 / (rng + 1e-6))
    # BN loss: ZeroQ/Genie form, sum over layers of L2 norms of mean and std differences.
    net = make_tiny_bn_net()
    x = _random_images(10, seed=5)
    acts = []
    hooks = [m.register_forward_pre_hook(lambda m, a: acts.append((m, a[0]))) for m in B.bn_layers(net)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    manual = sum(torch.linalg.vector_norm(a.mean((0, 2, 3)) - m.running_mean)
                 + torch.linalg.vector_norm((a.var((0, 2, 3), unbiased=False) + m.eps).sqrt()
                                            - (m.running_var + m.eps).sqrt()) for m, a in acts)
    assert B.bn_statistics_loss(net, x) == pytest.approx(float(manual), rel=1e-5)
    assert B.bn_statistics_loss(net, x, batch_size=3) == pytest.approx(float(manual), rel=1e-5)  # set-level


def test_make_targets_balanced():
    classes, weights = B.make_targets(30, 6, "mixup", 3, seed=0)
    counts = torch.bincount(torch.tensor([c for cs in classes for c in cs]), minlength=6)
    assert counts.tolist() == [15] * 6
    assert all(abs(sum(w) - 1) < 1e-9 and len(set(w)) > 1 for w in weights)  # Dirichlet: unequal
    _, uniform = B.make_targets(4, 6, "mixup", 2, weights="uniform")
    assert all(w == (0.5, 0.5) for w in uniform)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="deepinv"), "method must be one of"),
    (dict(label_mode="soft"), "label_mode must be one of"),
    (dict(label_mode="mixup", mixup_k=7), "mixup_k must be"),
    (dict(batch_size=1), "batch_size must be"),
    (dict(iters=0), "iters must be"),
    (dict(input_shape=(8, 8)), "input_shape must be"),
])
def test_invert_bn_errors(tiny_bn_net, kwargs, match):
    args = dict(method="zeroq", label_mode="single", iters=1, batch_size=2, input_shape=SHAPE, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        B.invert_bn(tiny_bn_net, 4, **args)


def test_model_without_bn_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        B.invert_bn(net, 2, "zeroq", iters=1, batch_size=2, input_shape=SHAPE, progress=False)


def test_bn_inversion_set_store_and_resume(tmp_path, monkeypatch, make_tiny_bn_net):
    net = make_tiny_bn_net(channels=1, num_classes=4)
    shape, mean, std = (1, 8, 8), [0.5], [0.25]
    kw = dict(num_images=6, input_shape=shape, mean=mean, std=std, method="zeroq", label_mode="mixup", iters=10,
              batch_size=3, shard_size=3, seed=1, class_names=["a", "b", "c", "d"], model_id="tiny", progress=False)
    B.generate_bn_inversion_set(tmp_path / "ref", net, **kw)
    ds = load_synthetic(tmp_path / "ref")
    m = ds.manifest
    assert m["source"] == "bn-inversion" and m["normalization"] == {"mean": mean, "std": std, "clamped": True}
    assert m["config"]["model_sha256"] == B.model_fingerprint(net) and m["generator"]["id"] == "bn-inversion/zeroq"
    assert all(len(e["classes"]) == 2 and len(e["class_names"]) == 2 for e in m["images"])
    assert m["config"]["options"]["ce_weight"] == B.DEFAULT_CE_WEIGHT["mixup"]  # the default, recorded resolved
    x, y = ds[0]
    assert x.shape == shape and torch.isclose(y.sum(), torch.tensor(1.0))
    # Stored [0,1] images map back onto the optimized model-input images (8-bit quantization only:
    # the optimization kept pixels inside [0, 1], so nothing was clamped away).
    res = B.invert_bn(net, 3, "zeroq", "mixup", iters=10, batch_size=3, input_shape=shape,
                      seed=m["images"][0]["seed"], targets=([e["classes"] for e in m["images"][:3]],
                                                            [e["weights"] for e in m["images"][:3]]),
                      clamp_range=(mean, std), progress=False)
    assert (ds.normalize(ds.images([0, 1, 2])) - res.images).abs().max() <= 0.5 / 255 / 0.25 + 1e-5

    watch_writes(monkeypatch, kill_when=lambda index, written: index == 4)  # dies in the second shard
    with pytest.raises(KeyboardInterrupt):
        B.generate_bn_inversion_set(tmp_path / "run", net, **kw)
    resumed = watch_writes(monkeypatch)
    B.generate_bn_inversion_set(tmp_path / "run", net, **kw)
    assert resumed == [3, 4, 5]  # only the unfinished shard redone
    ref = json.loads((tmp_path / "ref" / MANIFEST).read_text())
    assert json.loads((tmp_path / "run" / MANIFEST).read_text()) == ref
    with pytest.raises(ValueError, match="different configuration.*method"):
        B.generate_bn_inversion_set(tmp_path / "run", net, **{**kw, "method": "hast"})


def test_bn_inversion_set_argument_errors(tmp_path, make_tiny_bn_net):
    net = make_tiny_bn_net()
    base = dict(num_images=2, input_shape=SHAPE, mean=[0.5] * 3, std=[0.25] * 3, iters=1, batch_size=2,
                progress=False)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        B.generate_bn_inversion_set(tmp_path, net, **{**base, "mean": [0.5]})
    with pytest.raises(ValueError, match="class_names has 2 names"):
        B.generate_bn_inversion_set(tmp_path, net, **base, class_names=["a", "b"])
    with pytest.raises(TypeError, match="unknown invert_bn option"):
        B.generate_bn_inversion_set(tmp_path, net, **base, temperature=3)


def test_dgh_bn_weight_does_not_depend_on_the_number_of_batches(tiny_bn_net):
    # Each batch moves only its share of the set-level moments; the BN term is scaled back so that,
    # against the per-batch target term, it weighs the same whether the set is one batch or eight.
    kw = dict(iters=60, input_shape=SHAPE, seed=0, progress=False, ce_weight=5.0, stretch_weight=0.0)
    one = B.invert_bn(tiny_bn_net, 32, "dgh", batch_size=32, **kw)
    eight = B.invert_bn(tiny_bn_net, 32, "dgh", batch_size=4, **kw)
    loss_one = B.bn_statistics_loss(tiny_bn_net, one.images)
    loss_eight = B.bn_statistics_loss(tiny_bn_net, eight.images)
    assert loss_eight < 2.0 * loss_one, (loss_one, loss_eight)

@pytest.mark.parametrize("name,value", [("ce_weight", -0.5), ("stretch_weight", float("nan")), ("tv_weight", -1.0)])
def test_loss_weights_must_be_non_negative(tiny_bn_net, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
        B.invert_bn(tiny_bn_net, 4, "dgh", iters=1, batch_size=4, input_shape=SHAPE, progress=False, **{name: value})


def test_lower_ce_weight_trades_target_fit_for_bn_fit(tiny_bn_net):
    """ce_weight moves the balance between the BN term and the target term: less weight on the
    targets ends at a lower BN loss (the knob the data-free benchmark sweeps for mixup labels)."""
    kw = dict(iters=60, batch_size=8, input_shape=SHAPE, progress=False, seed=0, label_mode="mixup")
    strong = B.invert_bn(tiny_bn_net, 8, "dgh", ce_weight=4.0, **kw)
    weak = B.invert_bn(tiny_bn_net, 8, "dgh", ce_weight=0.1, **kw)
    assert B.bn_statistics_loss(tiny_bn_net, weak.images) < B.bn_statistics_loss(tiny_bn_net, strong.images)


def test_ce_weight_default_follows_the_label_mode(tiny_bn_net):
    kw = dict(iters=5, batch_size=4, input_shape=SHAPE, progress=False, seed=3)
    assert B.DEFAULT_CE_WEIGHT == {"single": 1.0, "mixup": 0.5, "none": 0.0}
    for mode in ("single", "mixup"):
        weight = B.DEFAULT_CE_WEIGHT[mode]
        default = B.invert_bn(tiny_bn_net, 4, "dgh", mode, **kw).images
        assert torch.equal(default, B.invert_bn(tiny_bn_net, 4, "dgh", mode, ce_weight=weight, **kw).images)
        assert not torch.equal(default, B.invert_bn(tiny_bn_net, 4, "dgh", mode, ce_weight=2 * weight, **kw).images)
