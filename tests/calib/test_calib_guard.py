"""Reconstruction never makes a model worse: BN-folded targets, the per-unit and whole-model guard,
held-out images, and edge blocks (ShuffleNetV2 / MobileNetV2 style) found by structure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfqkern.calib import CalibConfig, calibrate
from dfqkern.calib import reconstruct as RC
from dfqkern.calib.guard import QuantizerState, heldout_count
from dfqkern.calib.units import find_units
from dfqkern.edge_nets import CifarMobileNetV2, CifarShuffleNetV2, InvertedResidual, ShuffleUnit
from dfqkern.nn import ActQuantizer, QuantLayer
from dfqkern.model_info import model_info


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _output_mse(q, fp, x):
    with torch.no_grad():
        return ((q(x) - fp(x)) ** 2).sum(1).mean().item()


@pytest.fixture
def tiny_shufflenet(randomize_bn) -> nn.Module:
    torch.manual_seed(0)
    model = CifarShuffleNetV2(widths=(8, 16, 32, 64, 64), repeats=(2, 2, 1)).eval()
    with torch.no_grad():
        randomize_bn(model, torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def images16() -> torch.Tensor:
    return torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(2))


class _ConvBNStack(nn.Module):
    """Lone conv-BN-ReLU layers (no block anywhere): every BatchNorm is folded into a lone unit."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_targets_of_bn_folded_layers_are_post_batchnorm(images, quantize, randomize_bn):
    """The cause of the ShuffleNetV2 collapse: a lone conv's target was the float model's namesake conv,
    which outputs the tensor *before* the BatchNorm folded into the quantized conv."""
    torch.manual_seed(0)
    model = _ConvBNStack().eval()
    with torch.no_grad():
        randomize_bn(model, torch.Generator().manual_seed(1))
    cfg = CalibConfig(method="adaround", iters=40, batch_size=16, progress=False)
    with_fp = calibrate(quantize(model), model, images, cfg)
    without_fp = calibrate(quantize(model), None, images, cfg)
    assert _same_state(_state(with_fp), _state(without_fp))
    first = model_info(with_fp).calib_report.units[0]
    # the start's held-out error is a quantization error, not a BatchNorm-sized offset
    assert first.name == "features.0" and first.loss_nearest < 0.05


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_shufflenet_reconstruction_beats_its_observer_start(tiny_shufflenet, images16, quantize, method):
    """Before the fix, each method left this net's output error on unseen images 25-40x above the observer's."""
    fresh = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    observer = calibrate(quantize(tiny_shufflenet), tiny_shufflenet, images16,
                         CalibConfig(method="observer", progress=False))
    q = calibrate(quantize(tiny_shufflenet), tiny_shufflenet, images16,
                  CalibConfig(method=method, iters=100, batch_size=16, progress=False))
    report = model_info(q).calib_report
    assert report.model_loss_final <= report.model_loss_observer
    assert _output_mse(q, tiny_shufflenet, fresh) < 0.5 * _output_mse(observer, tiny_shufflenet, fresh)


def test_fp_model_of_another_function_is_refused(tiny_cnn, images, quantize):
    other = type(tiny_cnn)().eval()  # same architecture, other weights
    with pytest.raises(ValueError, match="fp_model does not compute"):
        calibrate(quantize(tiny_cnn), other, images, CalibConfig(iters=2, progress=False))


# ----------------------------------------------------------------------------- the guard

def test_heldout_images_are_never_training_batches(tiny_cnn, images, quantize, monkeypatch):
    n_held = heldout_count(len(images))
    assert n_held == len(images) // 8 and heldout_count(10) == 0 and heldout_count(10_000) == 256
    seen = []
    real_rows = RC.ActivationStore.rows

    def rows(self, name, idx):
        if name == "fp_in":  # only read for QDrop's input mix, i.e. only by training steps
            seen.append(idx.clone())
        return real_rows(self, name, idx)

    monkeypatch.setattr(RC.ActivationStore, "rows", rows)
    q = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="qdrop", iters=30, batch_size=16,
                                                                    progress=False))
    assert model_info(q).calib_report.heldout_images == n_held
    drawn = torch.cat(seen)
    assert drawn.min() >= n_held and drawn.max() == len(images) - 1


def test_a_unit_that_gets_worse_keeps_its_start(tiny_cnn, images, quantize):
    observed = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="observer", progress=False))
    # an absurd step-size learning rate throws the activation ranges far off
    q = calibrate(quantize(tiny_cnn), tiny_cnn, images,
                  CalibConfig(method="brecq", iters=30, batch_size=16, act_lr=1.0, progress=False))
    report = model_info(q).calib_report
    kept = [u for u in report.units if u.kept_start]
    assert kept, [(u.name, u.loss_nearest, u.loss_hard) for u in report.units]
    for u in kept:
        assert u.loss_hard > u.loss_nearest
        unit = q.get_submodule(u.name)
        for name, m in unit.named_modules():
            if isinstance(m, QuantLayer):
                assert m.w_quant.rounding == "nearest" and m.w_quant.alpha is None
            if isinstance(m, ActQuantizer):  # back to the observed step size
                assert torch.equal(m.scale, observed.get_submodule(f"{u.name}.{name}").scale)
    assert report.units_kept_start == [u.name for u in kept]
    assert report.model_loss_final <= report.model_loss_observer


def test_a_worse_model_is_returned_to_its_observer_start(tiny_cnn, images, quantize, monkeypatch):
    observed = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="observer", progress=False))
    real = RC._reconstruct_unit

    def sabotaged(unit, *args, **kwargs):  # a unit that passes its own check, then damages the model
        rep = real(unit, *args, **kwargs)
        with torch.no_grad():
            for layer in unit.quant_layers():
                layer.w_quant.scale.mul_(1.7)
        return rep

    monkeypatch.setattr(RC, "_reconstruct_unit", sabotaged)
    q = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="qdrop", iters=20, batch_size=16,
                                                                    progress=False))
    report = model_info(q).calib_report
    assert report.reverted_to_observer and report.model_loss_final == report.model_loss_observer
    with torch.no_grad():
        assert torch.equal(q(images), observed(images))
    assert all(m.w_quant.rounding == "nearest" for m in q.modules() if isinstance(m, QuantLayer))


def test_quantizer_state_restores_learned_rounding(tiny_cnn, images, quantize):
    q = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="genie", iters=20, batch_size=16,
                                                                    progress=False))
    before = _state(q)
    snap = QuantizerState(q)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, QuantLayer):
                m.w_quant.scale.mul_(2)
                m.w_quant.reset_rounding()
                m.a_quant.scale.mul_(3)
    snap.restore()
    assert _same_state(_state(q), before)


# ----------------------------------------------------------------------------- edge blocks by structure

@pytest.mark.parametrize("make, block_type", [
    (lambda: CifarShuffleNetV2(widths=(8, 16, 32, 64, 64), repeats=(2, 2, 1)), ShuffleUnit),
    (lambda: CifarMobileNetV2(width_mult=0.25, last_channels=64), InvertedResidual)])
def test_unregistered_edge_blocks_are_units(make, block_type, quantize):
    model = make().eval()
    q = quantize(model)
    units = find_units(q)
    blocks = {n for n, m in q.named_modules() if isinstance(m, block_type)}
    assert {u.name for u in units if u.kind == "block"} == blocks
    # MobileNetV2 blocks without their residual are blocks too (the same class as the residual ones)
    assert len(blocks) == sum(isinstance(m, block_type) for m in model.modules())
    assert not find_units(q, blockwise=False)[1].kind == "block"


def test_merging_sequential_is_a_block_alone_and_plain_modules_are_not(quantize):
    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return x + self.fn(x)

    class AddsBias(nn.Module):  # a parameter added to the input is not a merge of two paths
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

        def forward(self, x):
            return self.b(self.a(x) + self.bias)

    torch.manual_seed(0)
    mixer = nn.Sequential(Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU())),
                          nn.Conv2d(4, 4, 1), nn.GELU())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), mixer, AddsBias(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)))
    q = quantize(model, first_last_bits=None)
    assert [(u.name, u.kind) for u in find_units(q)] == [
        ("0", "layer"), ("1", "block"), ("2.a", "layer"), ("2.b", "layer"), ("3.0", "layer"), ("3.1", "layer")]
