"""RepQ-ViT LayerNorm reparameterization (dfqkern.calib.ln_reparam): the float function is kept, readers keep
per-tensor quantizers, channel outliers quantize better, checkpoints reload, bad inputs are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkern.calib import CalibConfig, calibrate, reparameterize_layernorms
from dfqkern.calib.capture import quantization_disabled
from dfqkern.config import QuantConfig
from dfqkern.io import load_quantized, save_quantized
from dfqkern.model_info import model_info
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model
from vit_models import build

READERS = {  # model -> LayerNorm -> the Linear layers reading it
    "vit_qkv": {"blocks.0.norm1": ["blocks.0.attn.qkv"], "blocks.0.norm2": ["blocks.0.mlp.fc1"],
                "blocks.1.norm1": ["blocks.1.attn.qkv"], "blocks.1.norm2": ["blocks.1.mlp.fc1"], "norm": ["head"]},
    "vit_mha": {**{f"blocks.layers.{i}.norm1": [f"blocks.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
                   for i in range(2)},
                **{f"blocks.layers.{i}.norm2": [f"blocks.layers.{i}.linear1"] for i in range(2)}, "norm": ["head"]},
}


def outlier_model(name: str):
    """A tiny ViT whose LayerNorm outputs have a few channels with ~20x the range of the rest."""
    model, x = build(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[:3] *= 20.0
                m.bias[3:5] += 8.0
    return model, x


def float_logits(q, x):
    with torch.no_grad(), quantization_disabled(q):
        return q(x)


@pytest.mark.parametrize("name", ["vit_qkv", "vit_mha"])
def test_fold_keeps_the_float_function_and_per_tensor_quantizers(name):
    model, x = outlier_model(name)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, grid=10))
    before = float_logits(q, x)
    ln_before = {n: (m.weight.clone(), m.bias.clone()) for n, m in q.named_modules() if isinstance(m, nn.LayerNorm)}
    report = reparameterize_layernorms(q, x)
    assert report.folded == READERS[name] and not report.skipped
    after = float_logits(q, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    for ln_name, readers in report.folded.items():
        ln = q.get_submodule(ln_name)
        assert not torch.allclose(ln.weight, ln_before[ln_name][0])  # something was folded
        lo, hi = report.ratio_range[ln_name]
        assert hi > 2.0 and lo < 1.0
        for r in readers:
            assert q.get_submodule(r).a_quant.scale.numel() == 1 and not q.get_submodule(r).a_quant.per_token
    calibrate_activations(q, x, progress=False)
    assert all(m.a_quant.scale.numel() == 1 for m in q.modules() if hasattr(m, "a_quant") and m.a_quant is not None)


def _reader_error(q, x, name: str) -> float:
    """MSE of layer ``name``'s output, quantized vs float, on its own (float) input: the quantization error at
    that LayerNorm output (the float function of the layer on the block input is the same with or without the
    fold, so the two models are compared on equal terms)."""
    seen = {}
    layer = q.get_submodule(name)
    h = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    float_logits(q, x)
    h.remove()
    with torch.no_grad():
        ref = F.linear(seen["x"], layer.weight, layer.bias)
        return float(((layer(seen["x"]) - ref) ** 2).mean())


@pytest.mark.parametrize("bits", [(8, 4), (4, 4)])
@pytest.mark.parametrize("name", ["vit_qkv", "vit_mha"])
def test_fold_lowers_the_error_at_an_outlier_layernorm_output(name, bits):
    model, x = outlier_model(name)
    reader = READERS[name][next(iter(READERS[name]))][0]
    errs = {}
    for reparam in (False, True):
        cfg = QuantConfig(weight_bits=bits[0], act_bits=bits[1], ln_reparam=reparam, grid=20)
        q = quantize_model(model, cfg)
        calibrate_activations(q, x, progress=False)
        errs[reparam] = _reader_error(q, x, reader)
        assert bool(model_info(q).report.ln_reparam) == reparam  # the switch is the config field
    assert errs[True] < 0.75 * errs[False], errs  # W4 weights pay for the scaled columns: not the A4 gain alone


def test_reconstruction_applies_the_config_switch():
    model, x = outlier_model("vit_qkv")
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, ln_reparam=True, grid=10))
    before = float_logits(q, x)
    calibrate(q, model, x, CalibConfig(method="qdrop", iters=4, batch_size=8, progress=False))
    assert set(model_info(q).report.ln_reparam) >= set(READERS["vit_qkv"])
    torch.testing.assert_close(float_logits(q, x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


@pytest.mark.parametrize("name", ["vit_qkv", "vit_mha"])
def test_save_load_gives_the_same_logits(name, tmp_path):
    model, x = outlier_model(name)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, ln_reparam=True, grid=10))
    calibrate_activations(q, x, progress=False)
    pack_model(q)
    with torch.no_grad():
        logits = q(x[:4])
    path = save_quantized(q, tmp_path / name)
    factory = {"vit_qkv": lambda: build("vit_qkv")[0], "vit_mha": lambda: build("vit_mha")[0]}[name]
    loaded = load_quantized(path, factory=factory)
    assert model_info(loaded).config.ln_reparam is True
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), logits)


def test_post_norm_layernorm_is_put_back_and_reported():
    """A post-norm encoder layer's LayerNorm output is also the residual stream: folding it would change the
    model, so the fold is undone and the reason recorded."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4)).eval()
    x = torch.randn(6, 5, 8)
    q = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, first_last_bits=None, grid=10))
    before = float_logits(q, x)
    report = reparameterize_layernorms(q, x)
    assert "1.norm1" in report.skipped and "other than the Linear layers" in report.skipped["1.norm1"]
    assert "1.norm1" not in report.folded
    torch.testing.assert_close(float_logits(q, x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_refusals():
    model, x = build("vit_qkv")
    with pytest.raises(ValueError, match="no quantized Linear"):
        reparameterize_layernorms(model, x)
    with pytest.raises(TypeError, match="qmodel must be an nn.Module"):
        reparameterize_layernorms("model", x)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=10))
    with pytest.raises(ValueError, match="calibration data is empty"):
        reparameterize_layernorms(q, x[:0])
    calibrate_activations(q, x, progress=False)
    pack_model(q)
    with pytest.raises(ValueError, match="packed"):
        reparameterize_layernorms(q, x)
    with pytest.raises(ValueError, match="ln_reparam must be true or false"):
        QuantConfig(ln_reparam="yes")
    weight_only = quantize_model(model, QuantConfig(weight_bits=4, act_bits=None))
    report = reparameterize_layernorms(weight_only, x)
    assert not report.folded and "static per-tensor" in report.skipped["blocks.0.norm1"]
    per_token = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, act_granularity="per_token"))
    assert not reparameterize_layernorms(per_token, x).folded


def test_cli_flag(tiny_tar_dataset, tmp_path, capsys):
    from cli_helpers import json_block, run_cli

    out = tmp_path / "q"
    rc, stdout, err = run_cli(capsys, "quantize", "--model", "cifar10_vit_qkv", "--calib-data", tiny_tar_dataset["tar"],
                              "--num-calib", 4, "--batch-size", 2, "--out", out, "--weight-observer", "minmax",
                              "--act-observer", "minmax", "--vit-ln-reparam")
    assert rc == 0, err
    folded = {k: v for k, v in json_block(stdout)["ln_reparam"].items() if not v.startswith("skipped")}
    assert folded["blocks.0.norm1"] == "blocks.0.attn.qkv" and folded["norm"] == "head" and len(folded) == 13
    assert model_info(load_quantized(out)).config.ln_reparam is True


@pytest.mark.parametrize("name", ["timm_vit", "torchvision_vit", "timm_swin"])
def test_other_attention_kinds_keep_their_float_function(name):
    """timm / torchvision ViTs: the pre-norm LayerNorms and the final one fold; Swin's norm1 outputs reach qkv only
    through window partitioning copies (not views), so they are left alone and reported."""
    model, x = build(name)
    if name == "torchvision_vit":  # its head starts at zero: logits that could not show a change
        torch.nn.init.normal_(model.heads.head.weight)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=10))
    ref = float_logits(q, x)
    assert ref.abs().max() > 0.1
    report = reparameterize_layernorms(q, x)
    torch.testing.assert_close(float_logits(q, x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    lns = {n for n, m in q.named_modules() if isinstance(m, nn.LayerNorm)}
    assert set(report.folded) | set(report.skipped) == lns and report.folded
    if name == "timm_swin":
        assert report.skipped["layers.0.blocks.0.norm1"] == "no quantized Linear reads its output"
    else:
        assert not report.skipped
