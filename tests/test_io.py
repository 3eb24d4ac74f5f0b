"""Packed checkpoints: bit-identical round trips (also in a fresh process), atomic writes, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dfqkern.config import QuantConfig
from dfqkern.formats import PACK_LAYOUT, packed_width
from dfqkern.io import (CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, CheckpointError, checkpoint_summary,
                        config_sha256, load_quantized, read_metadata, save_quantized)
from dfqkern.models import DigitsCNN, create_model
from dfqkern.quantize import calibrate_activations, pack_model, quant_layers, quantize_model
from dfqkern.model_info import model_info, set_info
from model_helpers import randomize_bn

REPO = Path(__file__).resolve().parents[1]
FAST = dict(weight_observer="minmax", act_observer="minmax")


def quantized_digits(scheme=(4, 8), **cfg):
    torch.manual_seed(0)
    model = randomize_bn(create_model("digits_cnn"), torch.Generator().manual_seed(0), mean=0.2, var=0.3)
    q = quantize_model(model, QuantConfig(weight_bits=scheme[0], act_bits=scheme[1], **FAST, **cfg))
    calibrate_activations(q, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)), progress=False)
    return q


def packed_copy(q):
    import copy

    return pack_model(copy.deepcopy(q))


X = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = quantized_digits()
    path = save_quantized(q, tmp_path_factory.mktemp("ckpt") / "digits_w4a8")
    with torch.no_grad():
        expected = packed_copy(q)(X)
    return path, q, expected


def test_round_trip_bit_identical(saved):
    path, q, expected = saved
    assert sorted(os.listdir(path)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert not any(layer.is_packed for _, layer in quant_layers(q))  # saving packed a copy
    loaded = load_quantized(path)
    assert all(layer.is_packed for _, layer in quant_layers(loaded))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
    assert model_info(loaded).arch == "digits_cnn" and model_info(loaded).config == model_info(q).config
    assert model_info(loaded).report.layers == model_info(q).report.layers
    assert model_info(loaded).input_spec == model_info(q).input_spec
    # the saved tensors are the packed model's state, exactly
    state = load_file(str(path / WEIGHTS_FILE))
    ref = packed_copy(q).state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in state)
    assert state["features.0.packed_weight"].dtype == torch.uint8


def test_metadata_contents(saved):
    path, q, _ = saved
    meta = read_metadata(path)
    import dfqkern

    assert meta["format_version"] == FORMAT_VERSION and meta["package_version"] == dfqkern.__version__
    assert meta["arch"] == "digits_cnn"
    assert QuantConfig.from_dict(meta["quant_config"]) == model_info(q).config
    assert len(meta["weights_sha256"]) == 64
    rec = meta["layers"]["features.3"]
    assert rec == {"kind": "conv2d", "weight_bits": 4, "act_bits": 8, "weight_shape": [32, 16, 3, 3], "k": 144,
                   "bias": True, "layout": PACK_LAYOUT, "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                   "groups": 1}
    assert meta["layers"]["fc"]["kind"] == "linear" and meta["layers"]["fc"]["weight_bits"] == 8
    assert set(meta["folded_bn"]) == {"features.1", "features.4", "features.8"}


def test_round_trip_in_fresh_process(saved, tmp_path):
    path, _, expected = saved
    save_file({"x": X}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "y.safetensors"
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from dfqkern.io import load_quantized\n"
        "m = load_quantized(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    y = m(load_file(sys.argv[2])['x'])\n"
        "save_file({'y': y.contiguous()}, sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.safetensors"), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(str(out))["y"], expected)


class MixedNet(nn.Module):
    """Not in the registry (loaded through factory=); has a module left in float and a weight-only layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)
        self.seq = nn.Conv1d(6, 6, 1)
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x).flatten(2)
        return self.out(torch.relu(self.fc(self.seq(x).mean(2))))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_factory_model_round_trip(tmp_path, granularity):
    torch.manual_seed(0)
    model = MixedNet().eval()
    cfg = QuantConfig(weight_bits=2, act_bits=4, first_last_bits=None, act_granularity=granularity,
                      rules=({"pattern": "out", "act_bits": "float", "weight_bits": 3},), **FAST)
    q = quantize_model(model, cfg)
    x = torch.randn(5, 3, 6, 6)
    calibrate_activations(q, x, progress=False)
    pack_model(q)  # saving an already packed model
    with torch.no_grad():
        y = q(x)
    path = save_quantized(q, tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="records no architecture id; pass factory="):
        load_quantized(path)
    loaded = load_quantized(path, factory=MixedNet)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert type(loaded.seq) is nn.Conv1d and "seq" in model_info(loaded).report.unhandled
    assert loaded.out.a_quant is None and loaded.out.lq.weight_bits == 3
    assert loaded.fc.a_quant.per_token == (granularity == "per_token")


# ----------------------------------------------------------------------------- atomic writes

def test_refuses_existing_path(saved, tmp_path):
    path, q, _ = saved
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_quantized(q, path)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a checkpoint directory"):
        save_quantized(q, f, overwrite=True)
    assert f.read_text() == "x"


def test_overwrite_replaces(tmp_path):
    q4, q8 = quantized_digits((4, 8)), quantized_digits((8, 8))
    path = save_quantized(q4, tmp_path / "ck")
    save_quantized(q8, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or .old directories left behind
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(X), packed_copy(q8)(X))


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import dfqkern.io as io

    q_old, q_new = quantized_digits((4, 8)), quantized_digits((2, 8))
    path = save_quantized(q_old, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(p):
        assert Path(p).stat().st_size > 0  # the tensor file was (partly) written when the failure hits
        raise OSError("disk full")

    monkeypatch.setattr(io, "_sha256", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(q_new, path, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(q_new, tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no partial directory, no temporaries
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # previous checkpoint intact
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(X), packed_copy(q_old)(X))


def test_save_errors():
    with pytest.raises(ValueError, match="no quantized layers; call dfqkern.quantize_model first"):
        save_quantized(nn.Linear(2, 2), "/tmp/never-written")
    q = quantized_digits()
    set_info(q, config=None)
    with pytest.raises(ValueError, match="not produced by dfqkern.quantize_model"):
        save_quantized(q, "/tmp/never-written")
    assert not Path("/tmp/never-written").exists()


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint, free to damage."""
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def _edit_meta(path, fn):
    """Edit config.json and re-hash it like a writer would, so the damage under test is what loading meets
    (unedited hashes are covered in test_checkpoint_trust.py)."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    fn(meta)
    if "config_sha256" in meta:
        meta["config_sha256"] = config_sha256(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def test_truncated_weights(ckpt):
    w = ckpt / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match the sha256 .* truncated or corrupted"):
        load_quantized(ckpt)
    # without the recorded hash (trusted explicitly), the header check still refuses it with a CheckpointError
    _edit_meta(ckpt, lambda m: m.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="weights_sha256.*trust_unverified"):
        load_quantized(ckpt)
    with pytest.warns(UserWarning, match="unverified"), \
            pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_quantized(ckpt, trust_unverified=True)


def test_corrupted_bytes(ckpt):
    w = ckpt / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) - 10] ^= 0xFF  # same size, one tensor byte flipped
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(ckpt)
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint_summary(ckpt)


def test_bad_json_and_versions(ckpt):
    text = (ckpt / CONFIG_FILE).read_text()
    (ckpt / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_quantized(ckpt)
    (ckpt / CONFIG_FILE).write_text(text)
    _edit_meta(ckpt, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match=r"format_version 99; this dfqkern .* reads version 1"):
        load_quantized(ckpt)
    _edit_meta(ckpt, lambda m: m.update(format_version=FORMAT_VERSION, format="something-else"))
    with pytest.raises(CheckpointError, match="is not a dfqkern-packed checkpoint"):
        read_metadata(ckpt)
    (ckpt / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="is not a dfqkern-packed checkpoint"):
        read_metadata(ckpt)


def test_missing_pieces(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_quantized(tmp_path / "nothing-here")
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_FILE}"):
        load_quantized(ckpt)
    (ckpt / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {CONFIG_FILE}"):
        load_quantized(ckpt)


def test_other_architecture(ckpt):
    with pytest.raises(CheckpointError, match=r"another architecture: layer 'features.3' has weight shape "
                                              r"\[32, 16, 3, 3\]"):
        load_quantized(ckpt, factory=lambda: _conv_width_changed())
    with pytest.raises(CheckpointError, match="another architecture"):
        load_quantized(ckpt, factory=lambda: create_model("cifar10_resnet20"))
    with pytest.raises(CheckpointError, match=r"layer 'fc' has weight shape \[10, 64\]"):
        load_quantized(ckpt, factory=lambda: DigitsCNN(num_classes=5))
    with pytest.raises(CheckpointError, match="layer 'fc' should be a Linear .* found nothing"):
        load_quantized(ckpt, factory=lambda: _without_fc())
    _edit_meta(ckpt, lambda m: m["folded_bn"].update({"head.bn": "head.conv"}))
    with pytest.raises(CheckpointError, match="another architecture: no module 'head.bn' in 'digits_cnn'"):
        load_quantized(ckpt)
    _edit_meta(ckpt, lambda m: m.update(arch="no_such_model"))
    with pytest.raises(CheckpointError, match="cannot rebuild architecture 'no_such_model'.*pass factory="):
        load_quantized(ckpt)


def _conv_width_changed():
    m = DigitsCNN()
    m.features[3] = nn.Conv2d(16, 32, 5, padding=2)
    return m


def _without_fc():
    m = DigitsCNN()
    del m.fc
    return m


def test_extra_or_missing_tensors(ckpt):
    state = load_file(str(ckpt / WEIGHTS_FILE))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(ckpt / WEIGHTS_FILE))
    _edit_meta(ckpt, lambda m: m.pop("weights_sha256"))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        load_quantized(ckpt, trust_unverified=True)
    del state["extra.weight"], state["fc.w_scale"]
    save_file(state, str(ckpt / WEIGHTS_FILE))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"missing \['fc.w_scale'\]"):
        load_quantized(ckpt, trust_unverified=True)


# ----------------------------------------------------------------------------- summary

def _expected_packed_weight_bytes(meta):
    total = 0
    for rec in meta["layers"].values():
        n = rec["weight_shape"][0]
        total += n * packed_width(rec["k"], rec["weight_bits"])
    return total


@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_checkpoint_summary_sizes(tmp_path, wbits):
    q = quantized_digits((wbits, 8), first_last_bits=None)
    path = save_quantized(q, tmp_path / f"w{wbits}")
    s = checkpoint_summary(path)
    state = load_file(str(path / WEIGHTS_FILE))
    assert s["checkpoint_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert s["checkpoint_bytes"] < os.path.getsize(path / WEIGHTS_FILE) + 1  # header not counted
    n_weights = sum(p.numel() for n, p in create_model("digits_cnn").named_parameters()
                    if n.endswith("weight") and p.dim() > 1)
    biases = sum(r["weight_shape"][0] for r in s["layers"].values() if r["bias"])
    assert s["float_bytes"] >= 4 * (n_weights + biases)
    meta = read_metadata(path)
    packed = sum(state[k].numel() for k in state if k.endswith("packed_weight"))
    assert packed == _expected_packed_weight_bytes(meta)
    assert packed <= n_weights * {2: 2, 4: 4, 8: 8}[wbits] / 8 + 3 * len(meta["layers"]) * 2  # padding only
    assert s["compression"] == pytest.approx(s["float_bytes"] / s["checkpoint_bytes"])
    assert 1 < s["compression"] < 32 / wbits
    assert s["scheme"] == f"w{wbits}a8" and s["arch"] == "digits_cnn"


def test_compression_grows_as_bits_shrink(tmp_path):
    ratios = []
    for wbits in (8, 4, 2):
        q = quantized_digits((wbits, 8), first_last_bits=None)
        ratios.append(checkpoint_summary(save_quantized(q, tmp_path / f"w{wbits}"))["compression"])
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[1] / ratios[0] > 1.5  # weights dominate the digits CNN's checkpoint
