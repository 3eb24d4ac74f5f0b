"""PD-Quant's prediction-difference term (CalibConfig.pd_weight): the formula, the gradient path, calibration."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfqkern.calib import CalibConfig, calibrate
from dfqkern.calib.capture import quantization_disabled
from dfqkern.calib.prediction_difference import PredictionDifference, prediction_kl
from dfqkern.model_info import model_info

FAST = dict(method="qdrop", iters=40, batch_size=16, progress=False)


def test_prediction_kl_is_the_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    logits, fp = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen) * 3
    p, q = fp.softmax(1), logits.softmax(1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(prediction_kl(logits, fp), want)
    assert prediction_kl(fp, fp).abs().item() < 1e-6
    assert prediction_kl(fp + 11.0, fp).abs().item() < 1e-6  # a shift of every logit predicts the same


def test_term_feeds_the_unit_output_through_the_float_rest(tiny_cnn, images, quantize):
    q = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(method="observer", progress=False))
    unit = q.layer[1]  # the last block: the float rest is pool + fc
    with torch.no_grad(), quantization_disabled(q):
        fp_logits = q(images)
    idx = torch.tensor([3, 0, 9])
    unit_out = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads_before = [p.requires_grad for p in q.parameters()]
    assert any(grads_before)
    pd = PredictionDifference(q, images, fp_logits).bind(unit)
    try:
        assert not any(p.requires_grad for p in q.fc.parameters())
        term = pd(idx, unit_out)
        with torch.no_grad(), quantization_disabled(q):  # the fc's weights are its float ones: quantization off
            want = prediction_kl(q.fc(torch.flatten(q.pool(unit_out), 1)), fp_logits[idx])
        torch.testing.assert_close(term, want)
        term.backward()
        assert unit_out.grad is not None and unit_out.grad.abs().sum() > 0
        assert all(p.grad is None for p in q.fc.parameters())
        assert "forward" not in unit.__dict__  # the class's forward is back
        with torch.no_grad():  # and the model runs its own unit again
            assert q(images[:2]).shape == (2, 10)
    finally:
        pd.release()
    assert [p.requires_grad for p in q.parameters()] == grads_before


def test_calibration_with_the_term_learns_and_differs(tiny_cnn, images, quantize):
    plain = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(**FAST))
    a = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(pd_weight=1.0, **FAST))
    b = calibrate(quantize(tiny_cnn), tiny_cnn, images, CalibConfig(pd_weight=1.0, **FAST))
    for k, v in a.state_dict().items():  # same seed, same model
        assert torch.equal(v, b.state_dict()[k]), k
    with torch.no_grad():
        assert not torch.equal(a(images), plain(images))
    report = model_info(a).calib_report
    assert report.config["pd_weight"] == 1.0
    assert all(math.isfinite(u.loss_hard) for u in report.units)
    def grads(m):  # the term leaves no parameter's requires_grad changed
        return {n: p.requires_grad for n, p in m.named_parameters() if not n.endswith("alpha")}
    assert grads(a) == grads(plain)


class _TwoOutputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).unsqueeze(-1)  # [B, classes, 1]: not class logits


def test_a_model_without_class_logits_is_refused_before_reconstruction(tiny_cnn, images, quantize):
    model = _TwoOutputs(tiny_cnn).eval()
    with pytest.raises(ValueError, match=r"pd_weight > 0 needs .*logits.*\(64, 10, 1\)"):
        calibrate(quantize(model), model, images, CalibConfig(pd_weight=0.5, **FAST))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), True, "1"])
def test_config_refuses_a_bad_weight(bad):
    with pytest.raises(ValueError, match="pd_weight"):
        CalibConfig(pd_weight=bad)
