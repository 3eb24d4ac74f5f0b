"""The generators' options as config records: one default each, the manifest record, older records."""
import dataclasses
import json

import pytest

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen.config import LEGACY_CE_WEIGHT, BNInversionConfig, DiffusionConfig
from dfqkern.datagen.store import MANIFEST, RUN_FILE, SyntheticSetWriter, load_synthetic


def test_bn_record_roundtrip_and_older_records():
    cfg = BNInversionConfig(method="hast", label_mode="single", iters=7, focal_gamma=3.0)
    rec = cfg.to_dict()
    assert rec["mixup_k"] is None and rec["options"]["ce_weight"] == 1.0 and rec["options"]["focal_gamma"] == 3.0
    assert "focal_gamma" not in rec and rec["lr"] is None  # loss options only under "options"; lr as given
    assert BNInversionConfig.from_dict(json.loads(json.dumps(rec))).to_dict() == rec
    # Records written before the options were a config object: only the options the caller passed.
    old = {"method": "dgh", "label_mode": "mixup", "mixup_k": 2, "iters": 500, "options": {"ce_weight": 0.5}}
    assert BNInversionConfig().same_record(old)
    assert not BNInversionConfig(stretch_weight=0.5).same_record(old)
    # ... and before the per-mode default, no ce_weight at all: those sets were made with weight 1.
    assert BNInversionConfig.from_dict({**old, "options": {}}).ce_weight == LEGACY_CE_WEIGHT == 1.0
    assert not BNInversionConfig().same_record({"options": {"no_such_option": 1}})


def test_options_are_checked_where_they_are_built():
    with pytest.raises(TypeError, match="unknown invert_bn option.*temperature"):
        BNInversionConfig.build(temperature=3)
    with pytest.raises(TypeError, match="unknown diffusion option.*sampler"):
        DiffusionConfig.build(sampler="ddim")
    with pytest.raises(ValueError, match="method must be one of"):
        BNInversionConfig(method="deepinv")
    with pytest.raises(ValueError, match="weights must be one of"):
        BNInversionConfig(weights="soft")
    with pytest.raises(ValueError, match="steps must be"):
        DiffusionConfig(steps=0)
    base = BNInversionConfig(iters=9)
    assert BNInversionConfig.build(base, seed=4) == dataclasses.replace(base, seed=4)


def test_diffusion_record_roundtrip():
    cfg = DiffusionConfig(prompt_mode="single", output_size=12, steps=3)
    rec = cfg.to_dict()
    assert rec["output_size"] == [12, 12] and rec["mixup_k"] is None and rec["steps"] == 3
    assert DiffusionConfig.from_dict(json.loads(json.dumps(rec))) == cfg
    assert DiffusionConfig(output_size=12) == DiffusionConfig(output_size=[12, 12])


def test_one_label_mode_default(tiny_bn_net):
    """Library, pipeline and CLI share BNInversionConfig's default: dgh with mixup labels (the label
    mode's default is the method's: DEFAULT_LABEL_MODE)."""
    from dfqkern import cli

    assert (BNInversionConfig().method, BNInversionConfig().effective_label_mode) == ("dgh", "mixup")
    res = B.invert_bn(tiny_bn_net, 4, iters=1, batch_size=4, input_shape=(3, 8, 8), progress=False)
    assert (res.method, res.label_mode) == ("dgh", "mixup") and all(len(c) == 2 for c in res.classes)
    args = cli.build_parser().parse_args(["generate", "--source", "bn-inversion", "--out", "x", "--model", "m"])
    assert cli._given(args, ("method", "label_mode", "mixup_k", "iters", "batch_size", "seed", "ce_weight")) == {}


def test_set_recorded_in_the_older_form_resumes(tmp_path, monkeypatch, make_tiny_bn_net):
    """An unfinished set whose run description has the older record (only the options its caller
    passed) resumes, and its manifest keeps that record."""
    net = make_tiny_bn_net(channels=1, num_classes=4)
    # zeroq as it was before it got ZeroQ's defaults (no labels, input prior): mixup labels, no prior.
    kw = dict(num_images=4, input_shape=(1, 8, 8), mean=[0.5], std=[0.25], method="zeroq", label_mode="mixup",
              input_prior_weight=0.0, iters=3, batch_size=2, shard_size=2, progress=False)
    B.generate_bn_inversion_set(tmp_path / "ref", net, **kw)
    original = SyntheticSetWriter.write_image

    def die_in_second_shard(self, index, image):
        if index == 3:
            raise KeyboardInterrupt("simulated kill")
        original(self, index, image)

    monkeypatch.setattr(SyntheticSetWriter, "write_image", die_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        B.generate_bn_inversion_set(tmp_path / "run", net, **kw)
    monkeypatch.setattr(SyntheticSetWriter, "write_image", original)
    run_file = tmp_path / "run" / RUN_FILE
    run = json.loads(run_file.read_text())
    run["config"]["options"] = {"ce_weight": 0.5, "tv_weight": 0.0}  # the older form
    del run["config"]["config_version"]
    run_file.write_text(json.dumps(run))
    B.generate_bn_inversion_set(tmp_path / "run", net, **kw)
    got, ref = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("run", "ref"))
    assert got["config"]["options"] == {"ce_weight": 0.5, "tv_weight": 0.0}
    assert [e["sha256"] for e in got["images"]] == [e["sha256"] for e in ref["images"]]
    assert len(load_synthetic(tmp_path / "run")) == 4
    with pytest.raises(ValueError, match="different configuration"):  # a different run is still refused
        B.generate_bn_inversion_set(tmp_path / "run", net, **{**kw, "tv_weight": 0.1})
