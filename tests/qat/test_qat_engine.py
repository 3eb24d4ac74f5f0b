"""The QAT engine: determinism, resume after a kill, schedules, the student's start and its packed result."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dfqkern.io import load_quantized, save_quantized
from dfqkern.qat import QATConfig, finetune
from dfqkern.qat.checkpoint import PROGRESS_FILE
from dfqkern.qat.student import prepare_student
from dfqkern.quantize import pack_model

IMAGE_SHAPE = (3, 8, 8)  # the tiny teacher's input (conftest)


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_result_other_seed_differs(teacher, make_student, tiny_qat):
    runs = []
    for seed in (0, 0, 1):
        q = make_student()
        finetune(q, teacher, tiny_qat(seed=seed), image_shape=IMAGE_SHAPE)
        runs.append(_weights(q))
    _assert_same(runs[0], runs[1])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_training_changes_the_student_and_records_losses(teacher, make_student, tiny_qat):
    q = make_student()
    before = _weights(q)
    finetune(q, teacher, tiny_qat(), image_shape=IMAGE_SHAPE)
    after = _weights(q)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    rep = q.dfqkern_qat_report
    assert [h["epoch"] for h in rep["history"]] == [1, 2]
    assert all(math.isfinite(h["s_loss"]) and math.isfinite(h["g_loss"]) for h in rep["history"])
    assert not any(p.requires_grad for p in q.parameters())  # frozen again for packing
    assert "dfqkern_qat_generator" not in dict(q.named_modules())  # the generator is not part of the student


@pytest.mark.parametrize("method", ["gdfq", "texq"])  # texq: method state (its centres) must resume too
def test_resume_after_kill_gives_the_same_weights(teacher, make_student, tiny_qat, tmp_path, method):
    opts = {"centre_iters": 2} if method == "texq" else {}
    cfg = tiny_qat(method, options=opts)
    straight = make_student()
    finetune(straight, teacher, cfg, image_shape=IMAGE_SHAPE)

    class Kill(Exception):
        pass

    def kill(epoch, student, record):
        raise Kill

    ck = tmp_path / "state"
    first = make_student()
    with pytest.raises(Kill):
        finetune(first, teacher, cfg, image_shape=IMAGE_SHAPE, checkpoint_dir=str(ck), on_epoch_end=kill)
    progress = json.loads((ck / PROGRESS_FILE).read_text())
    assert progress["epoch"] == 1 and (ck / progress["state_file"]).suffix == ".safetensors"
    assert sorted(p.name for p in ck.iterdir()) == sorted([PROGRESS_FILE, progress["state_file"]])
    resumed = make_student()  # a fresh process: the same start, rebuilt
    finetune(resumed, teacher, cfg, image_shape=IMAGE_SHAPE, checkpoint_dir=str(ck))
    assert resumed.dfqkern_qat_report["epochs_resumed"] == 1
    _assert_same(_weights(straight), _weights(resumed))
    assert straight.dfqkern_qat_report["history"] == resumed.dfqkern_qat_report["history"]


def test_a_checkpoint_of_another_run_is_not_resumed(teacher, make_student, tiny_qat, tmp_path):
    ck = str(tmp_path / "state")
    finetune(make_student(), teacher, tiny_qat(), image_shape=IMAGE_SHAPE, checkpoint_dir=ck)
    other = make_student()
    finetune(other, teacher, tiny_qat(student_lr=2e-4), image_shape=IMAGE_SHAPE, checkpoint_dir=ck)
    assert other.dfqkern_qat_report["epochs_resumed"] == 0
    again = make_student()
    finetune(again, teacher, tiny_qat(student_lr=2e-4), image_shape=IMAGE_SHAPE, checkpoint_dir=ck)
    assert again.dfqkern_qat_report["epochs_resumed"] == 2
    _assert_same(_weights(other), _weights(again))
    again2 = make_student()
    finetune(again2, teacher, tiny_qat(student_lr=2e-4), image_shape=IMAGE_SHAPE, checkpoint_dir=ck, resume=False)
    assert again2.dfqkern_qat_report["epochs_resumed"] == 0


def test_warmup_trains_only_the_generator(teacher, make_student, tiny_qat):
    q = make_student()
    before = _weights(q)
    finetune(q, teacher, tiny_qat(warmup_epochs=1, epochs=2), image_shape=IMAGE_SHAPE)
    hist = q.dfqkern_qat_report["history"]
    assert "s_loss" not in hist[0] and "s_loss" in hist[1]
    after_warmup = []
    finetune(make_student(), teacher, tiny_qat(warmup_epochs=1, epochs=2), image_shape=IMAGE_SHAPE,
             on_epoch_end=lambda e, s, r: after_warmup.append(_weights(s)) if e == 0 else None)
    _assert_same(before, after_warmup[0])


def test_schedules():
    cos = QATConfig(epochs=2, iters=5, schedule="cosine")
    assert [cos.lr_factor(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert cos.lr_factor(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))
    step = QATConfig(epochs=4, iters=5, schedule="step", step_epochs=(1, 3), step_gamma=0.5)
    assert [step.lr_factor(s) for s in (0, 4, 5, 14, 15, 19)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert QATConfig(schedule="constant").lr_factor(10**6) == 1.0


def test_schedule_reaches_the_optimizers(teacher, make_student, tiny_qat, monkeypatch):
    seen = []
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    cfg = tiny_qat(epochs=2, iters=2, student_lr=1e-3)
    finetune(make_student(), teacher, cfg, image_shape=IMAGE_SHAPE)
    assert seen == pytest.approx([1e-3 * cfg.lr_factor(s) for s in range(4)])


@pytest.mark.parametrize("bad, msg", [
    (dict(method="nope"), "method must be one of"),
    (dict(epochs=0), "epochs"),
    (dict(warmup_epochs=2, epochs=2), "warmup_epochs"),
    (dict(batch_size=1), "batch_size"),
    (dict(schedule="linear"), "schedule"),
    (dict(step_epochs=(5,), epochs=2), "step_epochs"),
    (dict(momentum=1.0), "momentum"),
    (dict(method="hast", options={"focal": 1}), "'focal' is not an option of method 'hast'"),
    (dict(method="hast", options={"focal_gamma": -1.0}), "focal_gamma"),
    (dict(method="hast", options={"focal_gamma": "x"}), "focal_gamma takes a float"),
    (dict(method="acq", batch_size=7), "acq pairs images: batch_size must be even"),
    (dict(generator_width=0), "generator_width"),
])
def test_config_errors_name_the_argument(bad, msg):
    with pytest.raises(ValueError, match=msg):
        QATConfig(**bad)


def test_options_from_strings_and_round_trip():
    cfg = QATConfig(method="hast", options={"focal_gamma": "3", "promotion": "false"})
    assert cfg.options == {"focal_gamma": 3.0, "promotion": False, "align_weight": 1.0}
    assert QATConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_student_must_be_calibrated_and_unpacked(teacher, make_student, tiny_qat):
    from dfqkern.config import QuantConfig
    from dfqkern.quantize import quantize_model

    raw = quantize_model(teacher, QuantConfig(weight_bits=4, act_bits=4))
    with pytest.raises(ValueError, match="not calibrated"):
        finetune(raw, teacher, tiny_qat(), image_shape=IMAGE_SHAPE)
    packed = pack_model(make_student(4, 8))
    with pytest.raises(ValueError, match="packed"):
        finetune(packed, teacher, tiny_qat(), image_shape=IMAGE_SHAPE)


def test_a_reconstruction_start_is_kept_exactly(teacher, make_student, images):
    """A QDrop start (hard AdaRound rounding) becomes grid weights: the model computes the same."""
    from dfqkern.calib import CalibConfig, calibrate

    q = make_student()
    calibrate(q, teacher, images, CalibConfig(method="qdrop", iters=4, batch_size=8, progress=False))
    assert any(getattr(m, "rounding", None) == "hard" for m in q.modules())
    with torch.no_grad():
        before = q(images)
    prepare_student(q)
    assert all(getattr(m, "rounding", "nearest") == "nearest" for m in q.modules())
    with torch.no_grad():
        after = q(images)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_trained_student_packs_saves_and_reloads(teacher, make_student, tiny_qat, tmp_path, images):
    q = make_student(4, 8)
    finetune(q, teacher, tiny_qat(), image_shape=IMAGE_SHAPE)
    with torch.no_grad():
        fake = q(images)
    pack_model(q)
    save_quantized(q, tmp_path / "ck", arch=None)
    loaded = load_quantized(tmp_path / "ck", factory=lambda: type(teacher)())
    with torch.no_grad():
        out = loaded(images)
    torch.testing.assert_close(out, fake, rtol=1e-3, atol=1e-3)


def _replay_kl(student, teacher, images) -> float:
    from dfqkern.qat.losses import kd_kl

    with torch.no_grad():
        return kd_kl(student(images), teacher(images)).item()


def test_replay_distils_on_the_start_images(teacher, make_student, tiny_qat, images):
    """Only the replay term trains the student here (no CE, no KD on generated images): its KL to the
    teacher on the replay images must fall, and the term is logged."""
    cfg = tiny_qat(ce_weight=0.0, kd_weight=0.0, replay_weight=1.0, student_lr=0.05, weight_decay=0.0,
                   act_scale_lr=0.0, weight_scale_lr=0.0, iters=15, schedule="constant")
    q = make_student(4, 4)
    before = _replay_kl(q, teacher, images)
    finetune(q, teacher, cfg, image_shape=IMAGE_SHAPE, replay=images)
    after = _replay_kl(q, teacher, images)
    assert after < 0.8 * before, (before, after)
    assert math.isfinite(q.dfqkern_qat_report["history"][-1]["replay_kl"])
    # the same run without the replay term leaves the student where it was (nothing else trains it)
    q0 = make_student(4, 4)
    finetune(q0, teacher, cfg.replace(replay_weight=0.0), image_shape=IMAGE_SHAPE, replay=images)
    assert _replay_kl(q0, teacher, images) == pytest.approx(before, rel=1e-4)


def test_replay_weight_zero_ignores_replay_images(teacher, make_student, tiny_qat, images):
    a, b = make_student(), make_student()
    finetune(a, teacher, tiny_qat(), image_shape=IMAGE_SHAPE)
    finetune(b, teacher, tiny_qat(), image_shape=IMAGE_SHAPE, replay=images)
    _assert_same(_weights(a), _weights(b))


def test_replay_errors_name_the_argument(teacher, make_student, tiny_qat, images):
    with pytest.raises(ValueError, match="replay_weight > 0 needs replay images"):
        finetune(make_student(), teacher, tiny_qat(replay_weight=1.0), image_shape=IMAGE_SHAPE)
    with pytest.raises(ValueError, match=r"replay images are \(3, 4, 4\), the teacher takes \(3, 8, 8\)"):
        finetune(make_student(), teacher, tiny_qat(replay_weight=1.0), image_shape=IMAGE_SHAPE,
                 replay=images[:, :, :4, :4])
    with pytest.raises(ValueError, match="replay must be a float"):
        finetune(make_student(), teacher, tiny_qat(replay_weight=1.0), image_shape=IMAGE_SHAPE,
                 replay=images[0])
    with pytest.raises(ValueError, match="replay_weight"):
        QATConfig(replay_weight=-1.0)
