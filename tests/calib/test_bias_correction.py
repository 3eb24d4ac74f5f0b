"""Bias correction (dfqkern.calib.bias_correction): the shift removed is the formula's, and after
empirical correction every layer's mean output error on the calibration images is zero."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkern.calib.bias_correction import clipped_gaussian_mean, correct_bias
from dfqkern.calib.capture import quantization_disabled
from dfqkern.config import QuantConfig
from dfqkern.nn import QuantLayer
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model

CFG = QuantConfig(weight_bits=2, act_bits=4, first_last_bits=None, weight_observer="minmax", act_observer="minmax")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu6(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 1), 1))


def _net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net()
    for bn in (model.bn1, model.bn2):
        bn.momentum = None
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.5, 1.0, generator=gen)
    x = torch.randn(24, 3, 8, 8, generator=gen)
    with torch.no_grad():
        model.train()(x)  # BatchNorm statistics of these inputs
    return model.eval(), x


def _quantized(model, x):
    q = quantize_model(model, CFG)
    calibrate_activations(q, x, batch_size=8, progress=False)
    return q


def _outputs(model, x) -> dict[str, torch.Tensor]:
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.detach()))
               for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def _mean_errors(q, reference, x) -> dict[str, torch.Tensor]:
    """Per layer, the per-channel mean of (output of ``q`` - output of ``reference`` with quantization
    off, i.e. the float model with BatchNorm folded and the original biases) on ``x``."""
    quant = _outputs(q, x)
    with quantization_disabled(reference):
        ref = _outputs(reference, x)
    dims = lambda t: (0, 2, 3) if t.dim() == 4 else (0,)  # noqa: E731
    return {n: (quant[n] - ref[n]).double().mean(dims(quant[n])) for n in quant}


def test_empirical_removes_the_measured_shift_and_zeroes_every_mean_error():
    model, x = _net()
    q = _quantized(model, x)
    reference = copy.deepcopy(q)
    before = _mean_errors(q, reference, x)
    assert max(float(e.abs().max()) for e in before.values()) > 1e-2  # W2A4: there is a shift to remove
    bias0 = {n: m.bias.detach().clone() for n, m in q.named_modules() if isinstance(m, QuantLayer)}

    # the first layer's shift written out: E[conv(Q(x), Q(W))] - E[conv(x, W)] over the images
    c1 = q.conv1
    with torch.no_grad():
        quant_out = F.conv2d(c1.a_quant(x), c1.w_quant(c1.weight), None, 1, 1)
        float_out = F.conv2d(x, c1.weight, None, 1, 1)
    expected = (quant_out - float_out).double().mean((0, 2, 3)).float()

    report = correct_bias(q, "empirical", data=x, batch_size=8)
    assert set(report.corrected) == set(bias0) and report.skipped == {}
    torch.testing.assert_close(bias0["conv1"] - q.conv1.bias.detach(), expected, rtol=1e-4, atol=1e-6)
    after = _mean_errors(q, reference, x)
    for name, err in after.items():
        assert float(err.abs().max()) < 1e-4, name


def test_analytic_shift_is_weight_error_times_the_batchnorm_mean():
    model, x = _net(1)
    q = _quantized(model, x)
    bias0 = {n: m.bias.detach().clone() for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    report = correct_bias(q, "analytic", float_model=model, data=x)
    assert set(report.corrected) == {"conv2", "conv3"}
    assert "placeholder" in report.skipped["conv1"] and "conv3" not in report.skipped
    assert "conv3" in report.skipped["fc"] and "not from a BatchNorm" in report.skipped["fc"]

    # conv3 (1x1, no padding) reads relu6(bn2(.)): E[x] of a Gaussian clipped to [0, 6]
    beta, gamma = model.bn2.bias.detach().double(), model.bn2.weight.detach().double()
    n = torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double())
    a, b = (0 - beta) / gamma, (6 - beta) / gamma
    pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = beta * (n.cdf(b) - n.cdf(a)) + gamma * (pdf(a) - pdf(b)) + 6 * (1 - n.cdf(b))
    with torch.no_grad():
        eps = (q.conv3.w_quant(q.conv3.weight) - q.conv3.weight).double()
    torch.testing.assert_close((bias0["conv3"] - q.conv3.bias.detach()).double(), eps.sum((2, 3)) @ mean,
                               rtol=1e-4, atol=1e-7)

    # conv2 (depthwise 3x3, zero padding at 8x8): the shift averages over positions, borders included
    beta1, gamma1 = model.bn1.bias.detach().double(), model.bn1.weight.detach().double()
    relu_mean = beta1 * n.cdf(beta1 / gamma1) + gamma1 * pdf(beta1 / gamma1)  # E[relu(N(beta, gamma^2))]
    with torch.no_grad():
        eps2 = (q.conv2.w_quant(q.conv2.weight) - q.conv2.weight).double()
    # per channel: sum over taps of eps * (fraction of positions where that tap reads inside the image)
    tap_cover = torch.stack([F.pad(torch.ones(8, 8), (1, 1, 1, 1))[i:i + 8, j:j + 8].mean()
                             for i in range(3) for j in range(3)]).double().reshape(3, 3)
    expected2 = (eps2[:, 0] * tap_cover).sum((1, 2)) * relu_mean
    torch.testing.assert_close((bias0["conv2"] - q.conv2.bias.detach()).double(), expected2, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(tap_cover, torch.ones(3, 3).double())  # the border matters at 8x8


@pytest.mark.parametrize("lo,hi", [(0.0, math.inf), (0.0, 6.0), (-math.inf, math.inf), (0.0, 1.0)])
def test_clipped_gaussian_mean_matches_sampling(lo, hi):
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([-1.0, 0.0, 0.7, 5.5, 2.0])
    sigma = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0])
    z = torch.randn(400_000, 1, generator=gen, dtype=torch.float64)
    samples = (mu.double() + sigma.double() * z).clamp(lo, hi)
    torch.testing.assert_close(clipped_gaussian_mean(mu, sigma, lo, hi), samples.mean(0), rtol=0, atol=1e-2)


def test_errors_before_work():
    model, x = _net()
    q = quantize_model(model, CFG)
    with pytest.raises(ValueError, match="mode must be one of"):
        correct_bias(q, "magic", data=x)
    with pytest.raises(ValueError, match="not calibrated"):
        correct_bias(q, "empirical", data=x)
    calibrate_activations(q, x, progress=False)
    with pytest.raises(ValueError, match="needs data"):
        correct_bias(q, "empirical")
    with pytest.raises(ValueError, match="float_model"):
        correct_bias(q, "analytic", data=x)
    assert correct_bias(q, "none").corrected == {}
    with pytest.raises(ValueError, match="packed"):
        correct_bias(pack_model(copy.deepcopy(q)), "empirical", data=x)
