"""Method names (issue 17 item 3): zeroq and genie as their papers define them, genie-labels the
earlier conditional genie (older records' "genie"), dgh's whole-set shards and augmentation."""
import json

import pytest
import torch
import torch.nn as nn

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen.config import (DEFAULT_LABEL_MODE, DEFAULT_TV_WEIGHT, DGH_MEMORY_FRACTION, BNInversionConfig)
from dfqkern.datagen.store import MANIFEST, RUN_FILE, load_synthetic
from dfqkern.model_info import set_info

SHAPE = (3, 8, 8)


def test_per_method_defaults_and_records():
    assert {m: BNInversionConfig(method=m).effective_label_mode for m in B.METHODS} == DEFAULT_LABEL_MODE
    assert DEFAULT_LABEL_MODE["zeroq"] == DEFAULT_LABEL_MODE["genie"] == "none"
    zeroq = BNInversionConfig(method="zeroq").to_dict()
    assert zeroq["label_mode"] == "none" and zeroq["options"]["ce_weight"] == 0.0
    assert zeroq["options"]["input_prior_weight"] == 1.0
    assert BNInversionConfig(method="dgh").to_dict()["options"]["input_prior_weight"] == 0.0
    # The label mode default follows a method given after the base was built.
    assert BNInversionConfig.build(BNInversionConfig(), method="zeroq").effective_label_mode == "none"
    with pytest.raises(ValueError, match="needs targets"):
        BNInversionConfig(method="zeroq", ce_weight=1.0)
    with pytest.raises(ValueError, match="augment must be one of"):
        BNInversionConfig(augment="mixup")
    assert BNInversionConfig(jitter=2).effective_augment == "flip-shift"  # what jitter alone meant before


def test_vit_methods_default_to_a_tv_prior_that_the_record_states():
    """psaq / dfq-vit get DEFAULT_TV_WEIGHT unless given one; the BN methods none; a record says the value used,
    so a set made before the default (tv_weight 0 recorded) is not resumed under the new default."""
    assert set(DEFAULT_TV_WEIGHT) == {"psaq", "dfq-vit"} and all(w > 0 for w in DEFAULT_TV_WEIGHT.values())
    for method in B.METHODS:
        cfg = BNInversionConfig(method=method)
        assert cfg.effective_tv_weight == DEFAULT_TV_WEIGHT.get(method, 0.0), method
        assert cfg.to_dict()["options"]["tv_weight"] == cfg.effective_tv_weight
    explicit = BNInversionConfig(method="psaq", tv_weight=0.0)
    assert explicit.effective_tv_weight == 0.0 and explicit.to_dict()["options"]["tv_weight"] == 0.0
    assert not BNInversionConfig(method="psaq").same_record(explicit.to_dict())
    assert BNInversionConfig(method="psaq", tv_weight=2.0).same_record(BNInversionConfig(method="psaq").to_dict())
    with pytest.raises(ValueError, match="tv_weight must be a number >= 0"):
        BNInversionConfig(method="psaq", tv_weight=-1.0)
    rough = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert float(B.prior_loss(rough, BNInversionConfig(method="psaq"), 4)) > 0
    assert float(B.prior_loss(rough, BNInversionConfig(method="psaq", tv_weight=0.0), 4)) == 0
    assert float(B.prior_loss(rough, BNInversionConfig(method="dgh"), 4)) == 0


def test_older_genie_records_mean_genie_labels():
    old = {"method": "genie", "label_mode": "single", "mixup_k": None, "iters": 200, "batch_size": 32, "lr": None,
           "seed": 1, "weights": "dirichlet", "dirichlet_alpha": 1.0,
           "options": {"ce_weight": 0.5, "focal_gamma": 2.0, "stretch_weight": 1.0, "tv_weight": 0.0, "jitter": 0,
                       "latent_dim": 256}}
    cfg = BNInversionConfig.from_dict(old)
    assert cfg.method == "genie-labels" and cfg.effective_input_prior_weight == 0.0
    unrecorded = {**old, "method": "psaq", "options": {k: v for k, v in old["options"].items() if k != "tv_weight"}}
    assert BNInversionConfig.from_dict(unrecorded).effective_tv_weight == 0.0  # the default when it was written
    assert BNInversionConfig(method="genie-labels", label_mode="single", iters=200, seed=1,
                             ce_weight=0.5).same_record(old)
    assert not BNInversionConfig(method="genie", label_mode="single", iters=200, seed=1, ce_weight=0.5).same_record(old)
    new = BNInversionConfig(method="genie").to_dict()  # a record of today keeps its name
    assert BNInversionConfig.from_dict(json.loads(json.dumps(new))).method == "genie"


def test_old_genie_set_resumes_as_genie_labels(tmp_path, make_tiny_bn_net):
    """A set recorded by the earlier "genie" resumes under genie-labels (the benchmark's cached sets)."""
    net = make_tiny_bn_net(channels=1, num_classes=4)
    kw = dict(num_images=4, input_shape=(1, 8, 8), mean=[0.5], std=[0.25], label_mode="single", iters=2,
              batch_size=2, shard_size=2, progress=False)
    B.generate_bn_inversion_set(tmp_path, net, method="genie-labels", **kw)
    run = json.loads((tmp_path / RUN_FILE).read_text())
    for rec in (run["config"],):  # rewrite it as the earlier code recorded it
        rec["method"] = "genie"
        del rec["config_version"]
        for k in ("input_prior_weight", "augment"):
            del rec["options"][k]
    (tmp_path / RUN_FILE).write_text(json.dumps(run))
    shard = tmp_path / "shard_00001"
    for f in shard.iterdir():
        f.unlink()
    B.generate_bn_inversion_set(tmp_path, net, method="genie-labels", **kw)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["config"]["method"] == "genie" and len(load_synthetic(tmp_path)) == 4
    with pytest.raises(ValueError, match="different configuration"):
        B.generate_bn_inversion_set(tmp_path, net, method="genie", **kw)


def test_genie_swings_the_models_strided_convs(tiny_bn_net, monkeypatch):
    """genie: unconditional generator, swing hooks on the model's strided convs while optimizing
    (removed after); genie-labels: swing inside the generator, model untouched."""
    strided = [m for m in tiny_bn_net.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strided) == 1
    seen = []
    original = B.ModelSwing._hook

    def spy(self, module, args):
        seen.append(module)
        return original(self, module, args)

    monkeypatch.setattr(B.ModelSwing, "_hook", spy)
    made = []
    real_gen = B.GenieGenerator

    def record_gen(*a, **k):
        made.append(k)
        return real_gen(*a, **k)

    monkeypatch.setattr(B, "GenieGenerator", record_gen)
    res = B.invert_bn(tiny_bn_net, 4, "genie", iters=3, batch_size=4, input_shape=SHAPE, progress=False)
    assert res.label_mode == "none" and res.classes == [()] * 4 and float(res.labels.sum()) == 0
    assert seen and all(m is strided[0] for m in seen) and len(seen) == 3
    assert made[-1]["num_classes"] is None and made[-1]["swing"] == 0
    assert all(len(m._forward_pre_hooks) == 0 for m in tiny_bn_net.modules())
    seen.clear()
    B.invert_bn(tiny_bn_net, 4, "genie-labels", iters=3, batch_size=4, input_shape=SHAPE, progress=False)
    assert not seen and made[-1]["num_classes"] == 6 and made[-1]["swing"] == 1


def test_swing_is_a_reflect_padded_shift():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    rng = torch.Generator().manual_seed(0)
    outs = {tuple(B._swing(x, 1, rng).flatten().tolist()) for _ in range(40)}
    assert len(outs) == 9  # 3 x 3 offsets
    assert tuple(x.flatten().tolist()) in outs
    assert torch.equal(B._swing(x[..., :1, :1], 1, rng), x[..., :1, :1])  # too small to pad: unchanged


def test_zeroq_input_prior(tiny_bn_net):
    """zeroq's input prior pulls each image's per-channel statistics toward those of normalized data."""
    kw = dict(iters=60, batch_size=8, input_shape=SHAPE, seed=0, progress=False)
    with_prior = B.invert_bn(tiny_bn_net, 8, "zeroq", **kw)
    without = B.invert_bn(tiny_bn_net, 8, "zeroq", input_prior_weight=0.0, **kw)
    assert with_prior.label_mode == "none"
    assert B.input_prior(with_prior.images) < B.input_prior(without.images)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert float(B.input_prior(x)) < 0.1 and float(B.input_prior(2 * x + 1)) > 2


@pytest.mark.parametrize("augment", ["dgh", "flip-shift"])
def test_dgh_augmentation_is_switchable_and_seeded(tiny_bn_net, augment):
    kw = dict(iters=10, batch_size=4, input_shape=SHAPE, progress=False, seed=0, stretch_weight=0.1)
    a = B.invert_bn(tiny_bn_net, 4, "dgh", augment=augment, jitter=2, **kw)
    assert torch.equal(a.images, B.invert_bn(tiny_bn_net, 4, "dgh", augment=augment, jitter=2, **kw).images)
    assert not torch.equal(a.images, B.invert_bn(tiny_bn_net, 4, "dgh", **kw).images)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = B._augment(x, torch.Generator().manual_seed(0), augment, 2)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None


def test_dgh_shards_default_to_the_whole_set_when_it_fits(tmp_path):
    per_image = 4 * 4 * 3 * 8 * 8
    plan = B.plan_shards(num_images=1000, input_shape=SHAPE, free_bytes=10**9)
    assert plan.shard_size == 1000 and plan.unit_bytes == 1000 * per_image and "whole set" in plan.describe()
    tight = B.plan_shards(num_images=1000, input_shape=SHAPE, batch_size=32,
                          free_bytes=int(300 * per_image / DGH_MEMORY_FRACTION))
    assert tight.shard_size == 288 and "does not fit" in tight.reason  # largest multiple of the batch size
    assert B.plan_shards(method="genie", num_images=1000, input_shape=SHAPE).shard_size == B.DEFAULT_SHARD_SIZE
    assert B.plan_shards(num_images=1000, input_shape=SHAPE, shard_size=100).shard_size == 100
    (tmp_path / RUN_FILE).write_text(json.dumps({"num_images": 1000, "shard_size": 250}))
    assert B.plan_shards(num_images=1000, input_shape=SHAPE, out_dir=tmp_path).shard_size == 250  # resume


def test_cli_generate_flags(monkeypatch, tmp_path, make_tiny_bn_net, capsys):
    """--shard-size / --augment / --filter reach the library; the dgh plan is printed; a filtered
    set is generated from a pool of N / keep images."""
    from dfqkern import cli, models
    from dfqkern.input_spec import InputSpec

    net = make_tiny_bn_net()
    set_info(net, input_spec=InputSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=SHAPE))
    monkeypatch.setattr(models, "create_model", lambda *a, **k: net)
    out = tmp_path / "set"
    rc = cli.main(["generate", "--source", "bn-inversion", "--model", "tiny", "--out", str(out), "--num-images", "6",
                   "--iters", "2", "--batch-size", "2", "--augment", "dgh", "--jitter", "1",
                   "--filter", "energy:0.5", "--filter", "bn:0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "whole set" in text and "MiB" in text and "pool of 24 images" in text
    pool = load_synthetic(f"{out}.pool")
    assert len(pool) == 24 and pool.manifest["shard_size"] == 24  # dgh: the whole pool is one unit
    assert pool.manifest["config"]["options"]["augment"] == "dgh"
    ds = load_synthetic(out)
    assert len(ds) == 6 and [s["kind"] for s in ds.manifest["filter"]["chain"]] == ["energy", "bn"]
    assert ds.manifest["filter"]["chain"][0]["candidates"] == 24 and ds.manifest["filter"]["chain"][1]["kept"] == 6
    bad = ["generate", "--source", "bn-inversion", "--model", "tiny", "--out", str(out), "--filter", "x:2"]
    assert cli.main(bad) == 2 and "KIND:KEEP_FRACTION" in capsys.readouterr().err
