"""DFQ-ViT's activation correction (dfqkern.calib.act_correction): the per-channel fit against its formula,
the quantized model's layer outputs matching the float model's moments afterwards, the integer codes kept
(so a corrected model packs, saves and reloads like any other), and the argument errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfqkern.calib import act_correction as A
from dfqkern.calib.capture import quantization_disabled
from dfqkern.config import QuantConfig
from dfqkern.io import load_quantized, save_quantized
from dfqkern.nn import QuantLayer
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model
from vit_models import MODELS, build


def _quantized(name="vit_qkv", bits=4):
    model, x = build(name)
    q = quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, first_last_bits=None, grid=20))
    calibrate_activations(q, x, progress=False)
    return model, q, x


def _outputs(model, names, x):
    """Per layer: every output row [rows, C] (tokens / positions x channels)."""
    got, mods = {}, dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, A._channels_last(o, m)))
          for n in names]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return got


def test_one_layer_fit_is_the_formula():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    q = quantize_model(float_model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=None, grid=20))
    x = torch.randn(64, 6) * 3
    calibrate_activations(q, x, progress=False)
    layer = q[2]
    with quantization_disabled(q):
        yf = _outputs(q, ["2"], x)["2"]
    yq = _outputs(q, ["2"], x)["2"]
    a = (yf.std(0, unbiased=False) / yq.std(0, unbiased=False)).clamp(1 / A.SCALE_LIMIT, A.SCALE_LIMIT)
    b = yf.mean(0) - a * yq.mean(0)
    w, bias, s = layer.weight.clone(), layer.bias.clone(), layer.w_quant.scale.clone()
    codes = layer.w_quant.codes(layer.weight)
    report = A.correct_activations(q, x, layers=["2"])
    assert torch.allclose(layer.bias.double(), a * bias.double() + b, atol=1e-5)
    assert torch.allclose(layer.weight.double(), w.double() * a[:, None], atol=1e-6)
    assert torch.allclose(layer.w_quant.scale.double(), s.double() * a, atol=1e-7)
    assert torch.equal(layer.w_quant.codes(layer.weight), codes)  # the integer weight is unchanged
    assert list(report.corrected) == ["2"] and report.corrected["2"]["scale_max"] == pytest.approx(a.max().item())
    after = _outputs(q, ["2"], x)["2"]  # the corrected output has the float moments
    assert torch.allclose(after.mean(0), yf.mean(0), atol=1e-4)
    assert torch.allclose(after.std(0, unbiased=False), a * yq.std(0, unbiased=False), atol=1e-4)


@pytest.mark.parametrize("name", ["vit_qkv", "vit_mha"])
def test_every_layer_gets_the_float_moments(name):
    model, q, x = _quantized(name)
    names = [n for n, m in q.named_modules() if isinstance(m, QuantLayer) and m.bias is not None]
    with quantization_disabled(q):
        ref = _outputs(q, names, x)
    before = _outputs(q, names, x)
    report = A.correct_activations(q, x, batch_size=10)
    assert sorted(report.corrected) == sorted(names) and not report.skipped
    after = _outputs(q, names, x)
    gap = lambda out, n: (out[n].mean(0) - ref[n].mean(0)).abs().max().item()  # noqa: E731
    for n in names:  # layers are fitted in call order on the corrected model before them: every one matches
        assert gap(after, n) < 1e-3 * (1 + ref[n].abs().max().item()), n
        sd_ratio = after[n].std(0) / ref[n].std(0)
        ratio = ref[n].std(0) / before[n].std(0)
        limited = (ratio > A.SCALE_LIMIT) | (ratio < 1 / A.SCALE_LIMIT)
        assert torch.allclose(sd_ratio[~limited], torch.ones_like(sd_ratio[~limited]), atol=1e-3), n
    assert sum(gap(before, n) for n in names) > 10 * sum(gap(after, n) for n in names)


def test_shift_only_and_the_corrected_model_packs_and_reloads(tmp_path):
    model, q, x = _quantized("vit_qkv", bits=8)
    weights = {n: m.weight.clone() for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    report = A.correct_activations(q, x, scale=False)
    assert all(r["scale_min"] == r["scale_max"] == 1.0 for r in report.corrected.values())
    assert all(torch.equal(m.weight, weights[n]) for n, m in q.named_modules() if isinstance(m, QuantLayer))
    A.correct_activations(q, x)
    with torch.no_grad():
        fake = q(x[:4])
    pack_model(q)
    with torch.no_grad():
        packed = q(x[:4])
    assert torch.allclose(packed, fake, atol=1e-3 * fake.abs().max().item())
    again = load_quantized(save_quantized(q, tmp_path / "q"), factory=MODELS["vit_qkv"][0])
    with torch.no_grad():
        assert torch.equal(again(x[:4]), packed)


def test_errors():
    model, x = build("vit_qkv")
    with pytest.raises(ValueError, match="no quantized layers"):
        A.correct_activations(copy.deepcopy(model), x)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=20))
    with pytest.raises(ValueError, match="not calibrated"):
        A.correct_activations(q, x)
    calibrate_activations(q, x, progress=False)
    with pytest.raises(ValueError, match=r"layers: \['nope'\] are not quantized layers"):
        A.correct_activations(q, x, layers=["nope"])
    pack_model(q)
    with pytest.raises(ValueError, match="packed; correct the activations before pack_model"):
        A.correct_activations(q, x)


def test_cli_act_correction_runs_and_is_reported(tiny_tar_dataset, tmp_path, capsys):
    """`dfqkern quantize --act-correction`: corrected after calibration, folded before packing, reported in
    the summary; the checkpoints reload, and none / shift / affine give three different models."""
    from cli_helpers import json_block, run_cli

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("none", "shift", "affine"):
        out = tmp_path / mode
        rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_vit_qkv", "--calib-data",
                                  tiny_tar_dataset["tar"], "--num-calib", 4, "--batch-size", 2, "--out", out,
                                  "--weight-observer", "minmax", "--act-observer", "minmax", "--act-correction", mode)
        assert rc == 0, err
        summary = json_block(stdout)
        if mode == "none":
            assert "act_correction" not in summary
        else:
            report = summary["act_correction"]
            assert report["corrected"] >= 1 and report["scale"] == (mode == "affine")
        with torch.no_grad():
            logits[mode] = load_quantized(out)(x)
        assert torch.isfinite(logits[mode]).all()
    assert not torch.equal(logits["none"], logits["shift"]) and not torch.equal(logits["shift"], logits["affine"])


def test_cli_act_correction_bad_value_is_refused_before_work(tiny_tar_dataset, tmp_path, capsys):
    from cli_helpers import run_cli

    with pytest.raises(SystemExit):
        run_cli(capsys, "quantize", "--model", "cifar10_vit_qkv", "--calib-data", tiny_tar_dataset["tar"],
                "--out", tmp_path / "q", "--act-correction", "full")
    assert "--act-correction" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
