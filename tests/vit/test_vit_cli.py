"""The CLI path for ViTs: quantize a registered CIFAR ViT (random weights; nn.TransformerEncoder and fused-qkv
variants), evaluate the packed checkpoint bit-identically, and a clear error for missing pretrained weights."""
from __future__ import annotations


import pytest

from dfqkern import assets
from dfqkern.io import load_quantized
from dfqkern.nn.attention import HeadActQuantizer, QuantAttentionBase
from cli_helpers import json_block, run_cli




@pytest.mark.parametrize("arch,flags", [
    ("cifar10_vit_mha", ["--per-token"]),  # (QDrop on ViTs: tests/vit/test_vit_reload.py, through the library)
    ("cifar10_vit_qkv", ["--attn-granularity", "per_head", "--abits", 4]),
])
def test_quantize_then_eval_packed_vit(arch, flags, tiny_tar_dataset, tmp_path, capsys):
    out = tmp_path / arch
    rc, stdout, err = run_cli(capsys, "quantize", "--model", arch, "--calib-data", tiny_tar_dataset["tar"],
                              "--num-calib", 6, "--batch-size", 3, "--eval-data", tiny_tar_dataset["tar"], "--out", out,
                              "--weight-observer", "minmax", "--act-observer", "minmax", *flags)
    assert rc == 0, err
    summary = json_block(stdout)
    model = load_quantized(out)
    attns = [m for m in model.modules() if isinstance(m, QuantAttentionBase)]
    assert len(attns) == 6 and all(m.is_packed for m in attns)
    if "--per-token" in flags:
        assert all(m.q_quant.per_token and m.v_quant.per_token for m in attns)
    else:
        assert all(isinstance(m.k_quant, HeadActQuantizer) and m.bits == 4 for m in attns)
    rc, stdout, err = run_cli(capsys, "eval", "--quantized", out, "--data", tiny_tar_dataset["tar"])
    assert rc == 0, err
    assert json_block(stdout)["top1"] == summary["quant_top1"]  # bit-identical reload


def test_pretrained_vit_without_trained_weights_fails_clearly(monkeypatch, tiny_tar_dataset, tmp_path, capsys):
    monkeypatch.setitem(assets.REPO_PRETRAINED, "cifar10_vit_qkv",
                        ("bench/weights/not_trained_yet.safetensors", "python bench/train_cifar_vit.py --variant qkv"))
    rc, _, err = run_cli(capsys, "eval", "--model", "cifar10_vit_qkv", "--pretrained", "--data",
                         tiny_tar_dataset["tar"])
    assert rc == 2
    assert "not_trained_yet.safetensors is missing" in err and "python bench/train_cifar_vit.py --variant qkv" in err
