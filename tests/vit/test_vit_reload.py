"""Save -> load in a fresh process -> the same logits, for every attention kind and calibration flavour
(observer, QDrop reconstruction, per-token activations); checkpoint fields of the attention records are
hashed and validated."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfqkern.calib import CalibConfig, calibrate
from dfqkern.config import QuantConfig
from dfqkern.io import CONFIG_FILE, CheckpointError, config_sha256, load_quantized, save_quantized
from dfqkern.model_info import model_info
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model
from vit_models import build

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CASES = {  # case -> (model, calibration method, QuantConfig fields)
    "vit_qkv-observer": ("vit_qkv", "observer", {}),
    "vit_qkv-qdrop": ("vit_qkv", "qdrop", {}),
    "vit_qkv-per_token": ("vit_qkv", "observer", {"act_granularity": "per_token"}),
    "vit_mha-observer": ("vit_mha", "observer", {"attn_granularity": "per_head"}),
    "vit_mha-qdrop": ("vit_mha", "qdrop", {}),
    "vit_mha-per_token": ("vit_mha", "qdrop", {"act_granularity": "per_token"}),
    "timm_vit-observer": ("timm_vit", "observer", {}),
    "timm_swin-observer": ("timm_swin", "observer", {}),
    "torchvision_vit-observer": ("torchvision_vit", "observer", {"attn_granularity": "per_head"}),
}

RELOAD = """
import json, sys, torch
sys.path.insert(0, {here!r})
from vit_models import MODELS
from dfqkern.io import load_quantized
from dfqkern.model_info import model_info
torch.set_num_threads(1)
out = {{}}
for case, model_name, path in json.loads(sys.argv[1]):
    q = load_quantized(path, factory=MODELS[model_name][0])
    x, logits = torch.load(path + "/../" + case + ".expect.pt", weights_only=True)
    with torch.no_grad():
        got = q(x)
    out[case] = {{"equal": bool(torch.equal(got, logits)), "max_diff": float((got - logits).abs().max()),
                 "attention": sorted(set(model_info(q).report.attention.values()))}}
print(json.dumps(out))
"""


def _make(case: str, tmp: Path):
    model_name, method, extra = CASES[case]
    model, x = build(model_name)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=20, **extra))
    if method == "observer":
        calibrate_activations(q, x, progress=False)
    else:
        calibrate(q, model, x, CalibConfig(method=method, iters=8, batch_size=8, progress=False))
    pack_model(q)
    with torch.no_grad():
        logits = q(x[:6])
    path = save_quantized(q, tmp / case)
    torch.save((x[:6], logits), tmp / f"{case}.expect.pt")
    return model_name, str(path), model_info(q).report.attention


def test_reload_in_fresh_process_gives_same_logits(tmp_path):
    jobs, kinds = [], {}
    for case in CASES:
        model_name, path, attention = _make(case, tmp_path)
        jobs.append((case, model_name, path))
        kinds[case] = sorted(set(attention.values()))
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
        assert {n: r["kind"] for n, r in meta["attention"].items()} == attention
        assert all(r["bits"] == 8 or r["kind"] == "transformer_encoder_layer" for r in meta["attention"].values())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD.format(here=str(HERE)), json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in CASES:
        assert result[case]["equal"], (case, result[case])
        assert result[case]["attention"] == kinds[case]


def _edit(path: Path, change, rehash: bool = True):
    cfg_file = path / CONFIG_FILE
    meta = json.loads(cfg_file.read_text())
    change(meta)
    if rehash:
        meta["config_sha256"] = config_sha256(meta)
    cfg_file.write_text(json.dumps(meta))


@pytest.fixture
def mha_ckpt(tmp_path):
    model, x = build("vit_mha")
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=20))
    calibrate_activations(q, x, progress=False)
    return save_quantized(q, tmp_path / "ck"), model


def _load(path):
    from vit_models import vit_mha

    return load_quantized(path, factory=vit_mha)


def test_attention_records_are_hashed(mha_ckpt):
    path, _ = mha_ckpt
    _edit(path, lambda m: m["attention"]["blocks.layers.0.self_attn"].update(bits=4), rehash=False)
    with pytest.raises(CheckpointError, match="does not match its config_sha256"):
        _load(path)


@pytest.mark.parametrize("change,match", [
    (lambda m: m["attention"]["blocks.layers.0.self_attn"].update(bits=3),
     r"field attention\['blocks.layers.0.self_attn'\].bits must be null \(float matmuls\) or one of \(4, 8\)"),
    (lambda m: m["attention"]["blocks.layers.0.self_attn"].update(kind="rope"),
     r"field attention\['blocks.layers.0.self_attn'\].kind must be one of"),
    (lambda m: m["attention"]["blocks.layers.0"].update(bits=8),
     r"attention\['blocks.layers.0'\].bits must be null for a transformer_encoder_layer"),
    (lambda m: m["attention"].update({"blocks.layers.0.norm1": {"kind": "multihead_attention", "bits": 8}}),
     r"attention\['blocks.layers.0.norm1'\] should be MultiheadAttention .*found LayerNorm"),
    (lambda m: m["attention"].update({"nowhere": {"kind": "multihead_attention", "bits": 8}}),
     r"no module 'nowhere'"),
    (lambda m: m["attention"].pop("blocks.layers.1.self_attn"),  # its projections then exist nowhere
     r"layer 'blocks.layers.1.self_attn.\w_proj' should be a Linear"),
    (lambda m: m.update(attention=[]), r"field attention must be an object"),
])
def test_attention_records_are_validated(mha_ckpt, change, match):
    path, _ = mha_ckpt
    _edit(path, change)
    with pytest.raises(CheckpointError, match=match):
        _load(path)
