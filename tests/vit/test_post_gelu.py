"""QuantConfig.gelu_act_bits: the Linear layers reading a GELU output (found by structure for every ViT kind) get
those activation bits; rules still win; the bits survive save -> load; the CLI flag sets the field."""
from __future__ import annotations

import pytest
import torch

from dfqkern.config import LayerRule, QuantConfig
from dfqkern.io import load_quantized, save_quantized
from dfqkern.model_info import model_info
from dfqkern.quantize import calibrate_activations, pack_model, post_gelu_linears, quantize_model
from vit_models import build

EXPECTED = {
    "vit_qkv": {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"},
    "vit_mha": {"blocks.layers.0.linear2", "blocks.layers.1.linear2"},
    "timm_vit": {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"},
    "torchvision_vit": {"encoder.layers.encoder_layer_0.mlp.3", "encoder.layers.encoder_layer_1.mlp.3"},
    "timm_swin": {f"layers.{s}.blocks.{b}.mlp.fc2" for s in range(2) for b in range(2)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_post_gelu_layers_get_their_bits(name):
    model, _ = build(name)
    assert post_gelu_linears(model) == EXPECTED[name]
    layers = model_info(quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, gelu_act_bits=8))).report.layers
    eights = {n for n, lq in layers.items() if lq.act_bits == 8}
    assert eights >= EXPECTED[name] and len(eights - EXPECTED[name]) == 2  # plus the first and the last layer
    plain = model_info(quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))).report.layers
    assert all(plain[n].act_bits == 4 for n in EXPECTED[name])


def test_rules_win_and_bad_bits_are_refused():
    model, _ = build("vit_qkv")
    cfg = QuantConfig(weight_bits=4, act_bits=4, gelu_act_bits=8, rules=(LayerRule(pattern="blocks.0.*", act_bits=4),))
    layers = model_info(quantize_model(model, cfg)).report.layers
    assert layers["blocks.0.mlp.fc2"].act_bits == 4 and layers["blocks.1.mlp.fc2"].act_bits == 8
    with pytest.raises(ValueError, match="gelu_act_bits"):
        QuantConfig(gelu_act_bits=5)


def test_lower_error_and_reload(tmp_path):
    model, x = build("vit_qkv")
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for gelu in (None, 8):
        q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, gelu_act_bits=gelu, grid=10))
        calibrate_activations(q, x, progress=False)
        pack_model(q)
        with torch.no_grad():
            out = q(x)
        errs[gelu] = float(((out - ref) ** 2).mean())
    assert errs[8] < errs[None], errs
    path = save_quantized(q, tmp_path / "q")
    loaded = load_quantized(path, factory=lambda: build("vit_qkv")[0])
    assert model_info(loaded).config.gelu_act_bits == 8
    assert loaded.get_submodule("blocks.0.mlp.fc2").a_quant.bits == 8
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_cli_flags_set_the_config():
    from dfqkern.cli import _config, build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--calib-data", "d", "--out", "o", "--abits", "4",
                                      "--gelu-abits", "8", "--vit-ln-reparam"])
    cfg = _config(args)
    assert cfg.gelu_act_bits == 8 and cfg.ln_reparam is True and cfg.act_bits == 4
    assert _config(build_parser().parse_args(["quantize", "--model", "m", "--calib-data", "d", "--out", "o"])) \
        == QuantConfig(first_last_bits=8)
