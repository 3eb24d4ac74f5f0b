"""Fuzzing packed-checkpoint loading (issue 15, item 8): corrupted config.json and safetensors headers.

Every case either loads (a harmless edit) or fails with a CheckpointError that names the file;
never another exception type, a hang or a crash. Mutations are applied both as-is (the hashes
catch them) and re-hashed (a crafted, self-consistent checkpoint, which the schema checks and the
header parser must catch). Small model, bounded examples: a few seconds of CPU.
"""
from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfqkern.config import QuantConfig
from dfqkern.io import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_summary, load_quantized, save_quantized
from dfqkern.models import create_model
from dfqkern.quantize import calibrate_activations, quantize_model

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def canonical_sha256(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode("utf-8")).hexdigest()


class Original(tuple):
    def __repr__(self):  # hypothesis prints the fixture with every failure: keep it short
        return "<saved digits_cnn checkpoint>"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(config dict, config bytes, weights bytes) of a saved W4A8 digits CNN checkpoint."""
    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn"), QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                               act_observer="minmax"))
    calibrate_activations(q, torch.randn(16, 1, 8, 8), progress=False)
    path = save_quantized(q, tmp_path_factory.mktemp("fuzz") / "digits")
    cfg = (path / CONFIG_FILE).read_bytes()
    return Original((json.loads(cfg), cfg, (path / WEIGHTS_FILE).read_bytes()))


def check_loads_or_clean_error(config: bytes, weights: bytes, trust: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ck"
        d.mkdir()
        (d / CONFIG_FILE).write_bytes(config)
        (d / WEIGHTS_FILE).write_bytes(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trust_unverified=True warns; not the point here
            extra = {"trust_unverified": True} if trust else {}  # False: the default path
            for fn in (load_quantized, checkpoint_summary):
                try:
                    out = fn(d, **extra)
                except CheckpointError as e:
                    assert str(d) in str(e), f"error does not name the checkpoint: {e}"
                    continue
                if fn is load_quantized:  # what loads must run
                    with torch.no_grad():
                        out(X)


# ----------------------------------------------------------------------------- config.json

SCALARS = (st.none() | st.booleans() | st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 2 ** 31, 10 ** 12])
           | st.integers() | st.floats() | st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=4), max_leaves=8)


def _paths(obj, prefix=()):
    """Every key path into a JSON tree (dict keys and list indices)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(meta, path, op, value, new_key):
    if not path:
        return value if op == "replace" else meta
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][new_key] = value
    else:
        parent[last] = [parent[last], value]
    return meta


@SETTINGS
@given(data=st.data())
def test_fuzz_config_json_fields(original, data):
    meta0, _, weights = original
    meta = json.loads(json.dumps(meta0))
    path = data.draw(st.sampled_from(sorted(_paths(meta), key=repr)), label="path")
    op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="op")
    value = data.draw(JSON_VALUES, label="value")
    meta = _mutate(meta, path, op, value, data.draw(st.text(max_size=8), label="new_key"))
    if data.draw(st.booleans(), label="rehash") and isinstance(meta, dict) and "config_sha256" in meta \
            and path[:1] != ("config_sha256",):
        meta["config_sha256"] = canonical_sha256(meta)
    check_loads_or_clean_error(json.dumps(meta).encode(), weights, data.draw(st.booleans(), label="trust"))


@SETTINGS
@given(data=st.data())
def test_fuzz_config_json_bytes(original, data):
    _, cfg, weights = original
    raw = bytearray(cfg)
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]), label="kind")
    pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
    if kind == "truncate":
        raw = raw[:pos]
    elif kind == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255), label="mask")
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
    check_loads_or_clean_error(bytes(raw), weights, data.draw(st.booleans(), label="trust"))


# ----------------------------------------------------------------------------- safetensors header

def _split_safetensors(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _with_weights_hash(meta0: dict, weights: bytes) -> bytes:
    meta = dict(meta0, weights_sha256=hashlib.sha256(weights).hexdigest())
    meta["config_sha256"] = canonical_sha256(meta)
    return json.dumps(meta).encode()


@SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_header_fields(original, data):
    meta0, cfg, weights = original
    header, body = _split_safetensors(weights)
    path = data.draw(st.sampled_from(sorted(_paths(header), key=repr)[1:]), label="path")
    op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="op")
    value = data.draw(JSON_VALUES | st.lists(st.integers(-2, 2 ** 40), max_size=4), label="value")
    header = _mutate(header, path, op, value, data.draw(st.text(max_size=8), label="new_key"))
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + body
    # re-hashed, the reader must get past the sha256 and meet the damaged header itself
    config = _with_weights_hash(meta0, blob) if data.draw(st.booleans(), label="rehash") else cfg
    check_loads_or_clean_error(config, blob, data.draw(st.booleans(), label="trust"))


@SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_header_bytes(original, data):
    meta0, cfg, weights = original
    (n,) = struct.unpack("<Q", weights[:8])
    raw = bytearray(weights)
    kind = data.draw(st.sampled_from(["length", "flip", "truncate", "append"]), label="kind")
    if kind == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1) | st.integers(max(n - 64, 0), n + 64),
                                              label="length"))
    elif kind == "flip":
        pos = data.draw(st.integers(0, 8 + n - 1), label="pos")
        raw[pos] ^= data.draw(st.integers(1, 255), label="mask")
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="size")]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16), label="tail")
    blob = bytes(raw)
    config = _with_weights_hash(meta0, blob) if data.draw(st.booleans(), label="rehash") else cfg
    check_loads_or_clean_error(config, blob, data.draw(st.booleans(), label="trust"))
