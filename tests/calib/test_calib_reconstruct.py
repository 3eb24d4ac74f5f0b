"""calibrate() end to end on tiny random-init models: every method, determinism, resume, spill, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from dfqkern.calib import CalibConfig, QuantAttention, calibrate
from dfqkern.calib import reconstruct as RC
from dfqkern.nn.attention import SoftmaxQuantizer
from dfqkern.nn import ActQuantizer, QuantLayer
from dfqkern.quantize import pack_model
from dfqkern.model_info import model_info

FAST = dict(iters=60, batch_size=16, progress=False)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def _act_scales(model):
    return {n: m.scale.detach().clone() for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def _weight_scales(model):
    return {n: m.w_quant.scale.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_rounding_follows_guard(q, report):
    """Units the guard kept at their start (all, when the model was reverted to the observer start) are back
    to nearest rounding; the others hold hard AdaRound."""
    for u in report.units:
        for layer in _layers(q.get_submodule(u.name)):
            if u.kept_start or report.reverted_to_observer:
                assert layer.w_quant.rounding == "nearest" and layer.w_quant.alpha is None, u.name
            else:
                assert layer.w_quant.rounding == "hard" and layer.w_quant.alpha is not None, u.name


def _assert_learned(report, min_better=0.6):
    """Hardened learned rounding beats round-to-nearest on the held-out images on most units (60 steps on
    noise images are too few for all), and in total."""
    units = [u for u in report.units if not u.resumed]
    assert units
    better = [u.loss_hard < u.loss_nearest for u in units]
    assert sum(better) >= min_better * len(units), [(u.name, u.loss_nearest, u.loss_hard) for u in units]
    assert sum(u.loss_hard for u in units) < sum(u.loss_nearest for u in units)


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop", "genie"])
def test_tiny_cnn_every_method_learns_and_hardens(tiny_cnn, images, quantize, method):
    observed = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="observer", progress=False))
    act0, w0 = _act_scales(observed), _weight_scales(observed)
    q = quantize(tiny_cnn)
    out = calibrate(q, tiny_cnn, images, CalibConfig(method=method, **FAST))
    assert out is q
    report = model_info(q).calib_report
    kinds = [(u.name, u.kind) for u in report.units]
    if method == "adaround":  # layer-wise: every quantized layer is its own unit
        assert kinds == [(n, "layer") for n in ("conv1", "layer.0.conv1", "layer.0.conv2", "layer.1.conv1",
                                                "layer.1.conv2", "fc")]
    else:
        assert kinds == [("conv1", "layer"), ("layer.0", "block"), ("layer.1", "block"), ("fc", "layer")]
    _assert_rounding_follows_guard(q, report)
    for layer in _layers(q):
        assert layer.w_quant.alpha is None or not layer.w_quant.alpha.requires_grad
        assert not layer.w_quant.scale.requires_grad
        assert layer.a_quant.drop_prob == 0.0 and not layer.a_quant.training
    _assert_learned(report)
    act1, w1 = _act_scales(q), _weight_scales(q)
    acts_moved = any(not torch.equal(act0[k], act1[k]) for k in act0)
    weights_moved = any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert acts_moved == (method in ("brecq", "qdrop", "genie"))  # LSQ step sizes learned
    assert weights_moved == (method == "genie")
    with torch.no_grad():  # still a working model, and it packs
        ref = q(images[:8])
        pack_model(q)
        torch.testing.assert_close(q(images[:8]), ref, rtol=1e-3, atol=1e-3)


def test_training_loss_falls(tiny_cnn, images, quantize):
    q = quantize(tiny_cnn, wbits=2)
    calibrate(q, tiny_cnn, images, CalibConfig(method="brecq", iters=150, batch_size=16, progress=False))
    units = model_info(q).calib_report.units
    assert sum(u.loss_end for u in units) < sum(u.loss_start for u in units)


def test_observer_only_sets_ranges(tiny_cnn, images, quantize):
    q = quantize(tiny_cnn)
    calibrate(q, tiny_cnn, images, CalibConfig(method="observer", progress=False))
    for layer in _layers(q):
        assert layer.w_quant.rounding == "nearest" and bool(layer.a_quant.calibrated)
    assert model_info(q).calib_report.units == []


def test_same_seed_same_model_other_seed_differs(tiny_cnn, images, quantize):
    cfg = CalibConfig(method="qdrop", **FAST)
    a = calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg)
    b = calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg)
    _assert_same_state(a, b)
    c = calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg.replace(seed=1))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("mask", ["kernel", "torch"])
def test_both_qdrop_masks_are_deterministic(tiny_cnn, images, quantize, mask):
    cfg = CalibConfig(method="qdrop", qdrop_mask=mask, iters=20, batch_size=16, progress=False)
    _assert_same_state(calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg),
                       calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg))


def test_resume_after_interrupt_gives_the_uninterrupted_model(tiny_cnn, images, quantize, tmp_path, monkeypatch):
    cfg = CalibConfig(method="genie", **FAST)
    reference = calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg)

    real = RC._reconstruct_unit
    calls = []

    def dies_in_third_unit(unit, index, *args, **kwargs):
        calls.append(unit.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third unit trains
        return real(unit, index, *args, **kwargs)

    ckpt = cfg.replace(checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(RC, "_reconstruct_unit", dies_in_third_unit)
    with pytest.raises(KeyboardInterrupt):
        calibrate(quantize(tiny_cnn), tiny_cnn, images, ckpt)
    monkeypatch.setattr(RC, "_reconstruct_unit", real)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "progress.json", "unit_0000.safetensors", "unit_0001.safetensors"]

    resumed = calibrate(quantize(tiny_cnn), tiny_cnn, images, ckpt)
    assert [u.resumed for u in model_info(resumed).calib_report.units] == [True, True, False, False]
    _assert_same_state(resumed, reference)
    with torch.no_grad():
        assert torch.equal(resumed(images), reference(images))


def test_resume_refuses_a_different_run(tiny_cnn, images, quantize, tmp_path):
    cfg = CalibConfig(method="brecq", iters=5, progress=False, checkpoint_dir=str(tmp_path))
    calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg.replace(seed=3))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        calibrate(quantize(tiny_cnn), tiny_cnn, images + 1, cfg)


def test_spilled_activations_give_the_in_memory_result(tiny_cnn, images, quantize, tmp_path):
    cfg = CalibConfig(method="qdrop", iters=20, batch_size=16, progress=False)
    in_memory = calibrate(quantize(tiny_cnn), tiny_cnn, images, cfg)
    spilled = calibrate(quantize(tiny_cnn), tiny_cnn, images,
                        cfg.replace(memory_budget_mb=1e-6, spill_dir=str(tmp_path / "spill")))
    _assert_same_state(in_memory, spilled)
    assert list((tmp_path / "spill").iterdir()) == []  # spill files are removed after each unit


def test_without_fp_model_uses_the_disabled_quantized_model(tiny_cnn, images, quantize):
    q = quantize(tiny_cnn)
    calibrate(q, None, images, CalibConfig(method="qdrop", **FAST))
    _assert_rounding_follows_guard(q, model_info(q).calib_report)
    _assert_learned(model_info(q).calib_report)


def test_data_forms(tiny_cnn, images, quantize):
    ds = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    cfg = CalibConfig(method="qdrop", iters=10, progress=False)
    results = [calibrate(quantize(tiny_cnn), tiny_cnn, d, cfg) for d in (images, ds, loader)]
    _assert_same_state(results[0], results[1])
    _assert_same_state(results[0], results[2])


def test_errors(tiny_cnn, images, quantize):
    q = quantize(tiny_cnn)
    with pytest.raises(ValueError, match="quantized layers"):
        calibrate(tiny_cnn, None, images)
    with pytest.raises(TypeError, match="config"):
        calibrate(q, None, images, {"method": "qdrop"})
    with pytest.raises(ValueError, match="empty"):
        calibrate(q, None, images[:0], CalibConfig(progress=False))
    with pytest.raises(TypeError, match="data"):
        calibrate(q, None, 3, CalibConfig(progress=False))
    with pytest.raises(ValueError, match="fp_model does not compute"):
        calibrate(q, torch.nn.Sequential(torch.nn.Identity()), images, CalibConfig(iters=2, progress=False))
    q2 = calibrate(quantize(tiny_cnn), None, images, CalibConfig(method="observer", progress=False))
    pack_model(q2)
    with pytest.raises(ValueError, match="packed"):
        calibrate(q2, None, images)


# ----------------------------------------------------------------------------- ViT

def test_tiny_vit_learns_with_matmul_quantizers(tiny_vit, vit_images, quantize):
    q = quantize(tiny_vit)
    calibrate(q, tiny_vit, vit_images, CalibConfig(method="qdrop", **FAST))
    report = model_info(q).calib_report
    assert [(u.name, u.kind) for u in report.units] == [
        ("patch_embed.proj", "layer"), ("blocks.0", "block"), ("blocks.1", "block"), ("head", "layer")]
    attns = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert len(attns) == 2
    for attn in attns:
        for name in ("q_quant", "k_quant", "v_quant"):
            quant = getattr(attn, name)
            assert bool(quant.calibrated) and quant.bits == 4 and quant.mode == "quant"
        soft = attn.attn_quant  # post-softmax: two-range 4-bit grid (coarse step 1/7, fine 1/(7 * 2**shift))
        assert isinstance(soft, SoftmaxQuantizer) and soft.bits == 4
        assert soft.scale.item() == pytest.approx(1 / (7 * 2 ** int(soft.shift))) and soft.zero_point.item() == 0
    _assert_rounding_follows_guard(q, report)
    _assert_learned(report)
    with torch.no_grad():
        assert torch.isfinite(q(vit_images[:4])).all()


def test_quant_attention_matches_timm_in_float(tiny_vit, vit_images, quantize):
    from dfqkern.calib import quantize_attention
    from dfqkern.calib.capture import quantization_disabled

    q = quantize(tiny_vit)  # quantize_model swaps the attention; quantize_attention has nothing left to do
    assert sum(isinstance(m, QuantAttention) for m in q.modules()) == 2 and quantize_attention(q) == 0
    with torch.no_grad(), quantization_disabled(q):
        torch.testing.assert_close(q(vit_images), tiny_vit(vit_images), rtol=1e-4, atol=1e-4)


def test_vit_same_seed_same_model(tiny_vit, vit_images, quantize):
    cfg = CalibConfig(method="genie", iters=15, batch_size=16, progress=False)
    _assert_same_state(calibrate(quantize(tiny_vit), tiny_vit, vit_images, cfg),
                       calibrate(quantize(copy.deepcopy(tiny_vit)), tiny_vit, vit_images, cfg))


@pytest.mark.parametrize("arch", ["resnet", "mobilenet_v2"])
def test_torchvision_blocks_are_units(arch, quantize):
    tvm = pytest.importorskip("torchvision.models")
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)  # one BasicBlock per stage (strided ones with a conv-BN downsample) keeps it quick
    model = (ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10) if arch == "resnet" else
             tvm.mobilenet_v2(num_classes=10, width_mult=0.25)).eval()
    block_type = BasicBlock if arch == "resnet" else InvertedResidual
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    q = calibrate(quantize(model), model, x, CalibConfig(method="qdrop", iters=3, batch_size=8, progress=False))
    units = model_info(q).calib_report.units
    blocks = {n for n, m in model.named_modules() if isinstance(m, block_type)}
    assert {u.name for u in units if u.kind == "block"} == blocks
    inside = tuple(f"{b}." for b in blocks)
    lone = {n for n, m in q.named_modules() if isinstance(m, QuantLayer) and not n.startswith(inside)}
    assert {u.name for u in units if u.kind == "layer"} == lone
    _assert_rounding_follows_guard(q, model_info(q).calib_report)
