"""Cross-layer equalization and high-bias absorption (dfqkern.equalize): the float function is kept,
the pair ranges follow the paper's formula, unsafe pairs are refused, and the CLI path runs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dfqkern import cli
from dfqkern.equalize import EqualizeConfig, equalize_model
from dfqkern.io import load_quantized
from dfqkern.quantize import fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")




def _spread_rows(conv: nn.Module, gen: torch.Generator, decades: float = 1.5) -> None:
    """Very different per-output-channel ranges (what CLE is for)."""
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-decades, decades, conv.weight.shape[0])[torch.randperm(conv.weight.shape[0],
                                                                                           generator=gen)]
                         .reshape(-1, *([1] * (conv.weight.dim() - 1))))


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator, gamma=(0.05, 0.3), beta=(-0.3, 0.3)) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.empty(c).uniform_(*gamma, generator=gen) * torch.where(
            torch.rand(c, generator=gen) < 0.2, -1.0, 1.0))  # some negative gammas: folding flips signs
        bn.bias.copy_(torch.empty(c).uniform_(*beta, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        bn.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=gen))


def _in_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    """max |w| per input channel, written out per group (depthwise: the channel's own filter)."""
    cout, cin_g = w.shape[:2]
    cout_g = cout // groups
    out = []
    for g in range(groups):
        for j in range(cin_g):
            out.append(w[g * cout_g:(g + 1) * cout_g, j].abs().max())
    return torch.stack(out)


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).abs().amax(1)


# ----------------------------------------------------------------------------- plain chain: the formula

def test_conv_relu_conv_follows_the_formula_and_keeps_the_function():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)).eval()
    _spread_rows(model[0], gen)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    eq = equalize_model(model)
    rep = eq.dfqkern_equalize_report
    assert rep.equalized == ["0 -> 2"]

    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    r1 = w1.reshape(6, -1).abs().max(1).values
    r2 = torch.stack([w2[:, i].abs().max() for i in range(6)])
    s = torch.sqrt(r1 * r2) / r2  # Nagel et al. 2019, eq. (11)
    torch.testing.assert_close(eq[0].weight, w1 / s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(eq[0].bias, b1 / s)
    torch.testing.assert_close(eq[2].weight, w2 * s.reshape(1, -1, 1, 1))
    torch.testing.assert_close(_out_ranges(eq[0].weight), _in_ranges(eq[2].weight, 1))  # both sqrt(r1 * r2)
    torch.testing.assert_close(_out_ranges(eq[0].weight), torch.sqrt(r1 * r2))
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eq[0].weight, w1)  # it did something


def test_linear_chain_and_model_left_untouched():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    _spread_rows(model[0], gen)
    before = copy.deepcopy(model.state_dict())
    eq = equalize_model(model)
    assert eq.dfqkern_equalize_report.equalized == ["0 -> 2"]
    torch.testing.assert_close(_out_ranges(eq[0].weight), eq[2].weight.abs().amax(0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy by default
    x = torch.randn(5, 4, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- MobileNetV2-style stack

class InvertedStack(nn.Module):
    """Two blocks conv1x1-BN-ReLU6 -> dw3x3-BN-ReLU6 -> conv1x1-BN (no residual), then pool and fc."""

    def __init__(self):
        super().__init__()

        def block(cin, hidden, cout):
            return nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                 nn.BatchNorm2d(hidden), nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False),
                                 nn.BatchNorm2d(cout))

        self.blocks = nn.Sequential(block(3, 12, 8), block(8, 16, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def _stack(seed=0):
    """Random weights with spread ranges; BatchNorm statistics measured on the returned inputs (as a
    trained net's are on its data) and small gammas, so no ReLU6 clip is ever reached."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = InvertedStack()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _spread_rows(m, gen)
        elif isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, gen, gamma=(0.02, 0.1), beta=(-0.1, 0.1))
            m.momentum = None  # cumulative: the statistics of exactly the batch below
            m.reset_running_stats()
    x = torch.randn(8, 3, 8, 8, generator=gen)
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def test_mobilenetv2_style_stack_equalizes_every_pair_and_keeps_the_function():
    model, x = _stack()
    eq = equalize_model(model, data=x)  # the pre-activations of x stay under the ReLU6 bound
    rep = eq.dfqkern_equalize_report
    pairs = ["blocks.0.0 -> blocks.0.3", "blocks.0.3 -> blocks.0.6", "blocks.0.6 -> blocks.1.0",
             "blocks.1.0 -> blocks.1.3", "blocks.1.3 -> blocks.1.6"]
    assert rep.equalized == pairs
    assert "blocks.1.6" in rep.skipped and "fc" in rep.skipped  # into pool / flatten; the output
    assert rep.clipped_channels and not any(rep.clipped_channels.values())  # the bound never bound here
    assert rep.sweeps > 1  # the dw conv couples its two pairs: iterated to convergence
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(eq(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())

    # ranges of the BatchNorm-folded weights (what quantize_model quantizes) are equal per pair
    folded = copy.deepcopy(eq)
    fold_batchnorm(folded)
    before = copy.deepcopy(model)
    fold_batchnorm(before)
    for pair in pairs:
        a, b = (folded.get_submodule(n) for n in pair.split(" -> "))
        r1, r2 = _out_ranges(a.weight.detach()), _in_ranges(b.weight.detach(), b.groups)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
        a0, b0 = (before.get_submodule(n) for n in pair.split(" -> "))
        assert not torch.allclose(_out_ranges(a0.weight.detach()), _in_ranges(b0.weight.detach(), b0.groups),
                                  rtol=1e-2)  # they were not equal before


def test_relu6_channel_that_may_saturate_keeps_its_scale():
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1)).eval()
    _spread_rows(model[0], gen)
    _randomize_bn(model[1], gen)
    with torch.no_grad():
        model[1].bias[0] = 7.0  # channel 0 sits above 6: the clip binds, no scale is exact
    x = torch.randn(16, 3, 4, 4, generator=gen)
    eq = equalize_model(model, data=x)
    rep = eq.dfqkern_equalize_report
    assert rep.equalized == ["0 -> 3"] and rep.clipped_channels["0 -> 3"] >= 1
    assert eq[1].weight[0] == model[1].weight[0] and torch.equal(eq[3].weight[:, 0], model[3].weight[:, 0])
    assert not torch.allclose(eq[1].weight[1:], model[1].weight[1:])
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)

    skip = equalize_model(model, EqualizeConfig(relu6="skip"))
    assert skip.dfqkern_equalize_report.equalized == [] and "relu6='skip'" in skip.dfqkern_equalize_report.skipped["0"]


# ----------------------------------------------------------------------------- refusals

class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.gelu_in, self.gelu_out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.fork, self.left, self.right = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.res_in, self.res_out = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.silu_in, self.silu_out = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.act, self.gelu, self.silu = nn.ReLU(), nn.GELU(), nn.SiLU()

    def forward(self, x):
        x = self.gelu_out(self.gelu(self.gelu_in(x)))
        y = self.act(self.fork(x))
        x = self.left(y) + self.right(y)            # fork feeds two consumers
        x = x + self.res_in(x)                      # res_in feeds a residual add
        return self.silu_out(self.silu(self.silu_in(self.res_out(x))))


def test_refuses_gelu_silu_forks_and_residuals_and_changes_nothing():
    model = Branches().eval()
    eq = equalize_model(model, EqualizeConfig(absorb_bias=True))
    rep = eq.dfqkern_equalize_report
    # conv -> conv directly is a pair (nothing between them); every other start is refused
    assert rep.equalized == ["gelu_out -> fork", "res_out -> silu_in"] and rep.absorbed == {}
    assert "GELU" in rep.skipped["gelu_in"] and "SiLU" in rep.skipped["silu_in"]
    assert "2 consumers" in rep.skipped["fork"]
    assert "add" in rep.skipped["res_in"] and "add" in rep.skipped["left"]
    touched = ("gelu_out.", "fork.", "res_out.", "silu_in.")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in eq.state_dict().items() if not k.startswith(touched))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_after_the_activation_and_untraceable_models_are_refused():
    after = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    assert "not folded" in equalize_model(after).dfqkern_equalize_report.skipped["0"]

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    rep = equalize_model(Dynamic()).dfqkern_equalize_report
    assert rep.equalized == [] and "could not trace" in rep.skipped["<model>"]


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="relu6"):
        EqualizeConfig(relu6="relu")
    with pytest.raises(ValueError, match="bound_sigmas"):
        EqualizeConfig(bound_sigmas=0)
    with pytest.raises(ValueError, match="sweeps"):
        EqualizeConfig(sweeps=0)
    with pytest.raises(TypeError, match="model"):
        equalize_model("not a model")


# ----------------------------------------------------------------------------- high-bias absorption

def _absorb_chain(padding: int):
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 3 if padding else 1, padding=padding)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([1.0, -0.5, 2.0]))
        model[1].bias.copy_(torch.tensor([4.0, 3.0, 1.0]))  # c = max(0, beta - 3|gamma|) = 1, 1.5, 0
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
    return model


def test_high_bias_absorption_moves_c_through_relu_exactly():
    model = _absorb_chain(padding=0)
    eq = equalize_model(model, EqualizeConfig(equalize=False, absorb_bias=True))
    rep = eq.dfqkern_equalize_report
    beta, gamma = model[1].bias.detach(), model[1].weight.detach()
    c = torch.clamp(beta - 3 * gamma.abs(), min=0)
    assert rep.absorbed == {"0 -> 3": int((c > 0).sum())} == {"0 -> 3": 2}
    torch.testing.assert_close(eq[1].bias, beta - c)
    w2 = model[3].weight.detach()
    torch.testing.assert_close(eq[3].bias, model[3].bias + (w2.sum((2, 3)) * c).sum(1))
    # the BatchNorm output stays within beta +- |gamma| here (inputs in [-1, 1]): above c, so exact
    x = torch.rand(6, 3, 5, 5) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)


def test_absorption_refused_into_a_zero_padded_conv():
    model = _absorb_chain(padding=1)
    rep = equalize_model(model, EqualizeConfig(equalize=False, absorb_bias=True)).dfqkern_equalize_report
    assert rep.absorbed == {} and "zero-pads" in rep.skipped["0 -> 3 (bias absorption)"]


# ----------------------------------------------------------------------------- CLI

def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_quantize_with_equalize_absorb_and_bias_correction(tmp_path, tiny_tar_dataset, capsys):
    out = tmp_path / "mnv2"
    rc, stdout, err = _run(capsys, "quantize", "--model", "cifar10_mobilenetv2_x0_35", "--calib-data",
                           tiny_tar_dataset["tar"], "--num-calib", 6, "--batch-size", 3, "--eval-data",
                           tiny_tar_dataset["tar"], "--out", out, "--weight-observer", "minmax", "--act-observer",
                           "minmax", "--equalize", "--absorb-bias", "--bias-correction", "empirical")
    assert rc == 0, err
    summary = json.loads(stdout[stdout.index("{"):])
    eqr = summary["equalize"]
    assert "blocks.1.conv.0 -> blocks.1.conv.3" in eqr["equalized"]
    assert "add" in eqr["skipped"]["blocks.2.conv.6"]  # residual block: its projection feeds the add
    assert summary["bias_correction"]["mode"] == "empirical" and summary["bias_correction"]["corrected"] > 10
    assert 0 <= summary["fp_equalized_top1"] <= 100
    # the packed checkpoint rebuilds from the registry architecture: equalization added no tensor
    assert load_quantized(out) is not None
    rc, stdout, err = _run(capsys, "eval", "--quantized", out, "--data", tiny_tar_dataset["tar"])
    assert rc == 0, err
    assert json.loads(stdout[stdout.index("{"):])["top1"] == summary["quant_top1"]


def test_cli_refuses_bias_correction_with_reconstruction_before_work(tmp_path, tiny_tar_dataset, capsys):
    rc, _, err = _run(capsys, "quantize", "--model", "cifar10_mobilenetv2_x0_35", "--calib-data",
                      tiny_tar_dataset["tar"], "--out", tmp_path / "x", "--method", "qdrop", "--bias-correction",
                      "analytic")
    assert rc == 2 and "bias_correction 'analytic' applies to method 'observer' only" in err
    with pytest.raises(SystemExit):
        _run(capsys, "quantize", "--model", "m", "--calib-data", "d", "--out", "o", "--bias-correction", "magic")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the chain guard

def _even_chain():
    """conv1x1 -> ReLU -> dw3x3 -> ReLU -> conv1x1 with every channel range in [0.5, 1]: nothing for CLE to fix."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                      nn.Conv2d(8, 6, 1)).eval()
    with torch.no_grad():
        for c in (m[0], m[2], m[4]):
            c.weight.copy_(torch.randn_like(c.weight).sign() * torch.empty_like(c.weight).uniform_(0.5, 1.0))
    return m


def _noise(w: torch.Tensor, bits: int = 4) -> float:
    """Mean over output channels of the relative error of one per-tensor min-max grid, written out."""
    lo, hi = w.min(), w.max()
    step = (hi - lo) / (2 ** bits - 1)
    err = w - (torch.round((w - lo) / step) * step + lo)
    return float(torch.stack([err[c].pow(2).sum() / w[c].pow(2).sum() for c in range(w.shape[0])]).mean())


def test_guard_leaves_a_chain_cle_would_make_noisier_and_reports_it():
    model = _even_chain()
    paper = equalize_model(model, EqualizeConfig(guard_bits=None))
    assert paper.dfqkern_equalize_report.equalized == ["0 -> 2", "2 -> 4"]
    noise = {name: sum(_noise(m[i].weight.detach()) for i in (0, 2, 4)) for name, m in (("before", model),
                                                                                       ("paper", paper))}
    assert noise["paper"] > noise["before"]  # what the guard must see

    guarded = equalize_model(model)  # guard_bits defaults to the library's weight bits (4)
    rep = guarded.dfqkern_equalize_report
    assert rep.equalized == [] and list(rep.reverted) == ["0 -> 2 , 2 -> 4"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in guarded.state_dict().items())
    assert "reverted" in rep.to_dict()


def test_guard_keeps_chains_that_cle_fixes():
    model, x = _stack()  # 3 decades of channel-range spread: CLE lowers the noise
    rep = equalize_model(model, data=x).dfqkern_equalize_report
    assert rep.reverted == {} and len(rep.equalized) == 5


def test_guard_bits_are_checked():
    with pytest.raises(ValueError, match="guard_bits"):
        EqualizeConfig(guard_bits=5)
