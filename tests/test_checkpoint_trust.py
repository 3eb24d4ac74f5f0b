"""What loading a packed checkpoint trusts (issue 15, items 1, 5, 7).

A checkpoint picks its architecture only by id plus allow-listed keys (never a download, never
another file); the whole config.json and the tensor file are covered by hashes; malformed
configs fail with a CheckpointError that names the file and the field; saved files follow the
umask; packed layers refuse gradients with a message that says why.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch

import dfqkern.models
from dfqkern.config import QuantConfig
from dfqkern.io import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_summary, load_quantized, save_quantized
from dfqkern.models import create_model
from dfqkern.quantize import calibrate_activations, quantize_model
from dfqkern.model_info import model_info

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def quantized_digits(wbits=4):
    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn"), QuantConfig(weight_bits=wbits, act_bits=8, weight_observer="minmax",
                                                               act_observer="minmax"))
    calibrate_activations(q, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), progress=False)
    return q


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = save_quantized(quantized_digits(), tmp_path_factory.mktemp("trust") / "digits")
    with torch.no_grad():
        expected = load_quantized(path)(X)
    return path, expected


@pytest.fixture
def ckpt(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def canonical_sha256(meta: dict) -> str:
    """The documented config hash: sha256 of the canonical JSON (sorted keys, no whitespace, ASCII)
    of config.json without its own ``config_sha256`` field. Spelled out here, independently of
    dfqkern.io, so the format is pinned by the tests."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode("utf-8")).hexdigest()


def edit_config(path, fn, rehash=True):
    """Apply ``fn`` to config.json. ``rehash``: recompute the hashes as a writer would (a crafted,
    self-consistent checkpoint); otherwise the edit is left for the integrity check to find."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    fn(meta)
    if rehash and "config_sha256" in meta:
        meta["config_sha256"] = canonical_sha256(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def rehash_weights(path):
    digest = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    edit_config(path, lambda m: m.update(weights_sha256=digest))


# ----------------------------------------------------------------------------- item 1: no steering

def test_saved_config_carries_its_canonical_hash(ckpt):
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    assert meta["config_sha256"] == canonical_sha256(meta)
    assert meta["weights_sha256"] == hashlib.sha256((ckpt / WEIGHTS_FILE).read_bytes()).hexdigest()


STEERING = {
    "torchvision-download": ("torchvision:resnet18", {"pretrained": True}),
    "registry-pretrained": ("digits_cnn", {"pretrained": True}),
    "local-file": ("digits_cnn", {"checkpoint": "FLOAT_FILE"}),
    "local-file-next-to-allowed": ("digits_cnn", {"num_classes": 10, "checkpoint": "FLOAT_FILE"}),
}


@pytest.mark.parametrize("trust", [None, False, True])
@pytest.mark.parametrize("case", list(STEERING))
def test_checkpoint_cannot_make_the_loader_download_or_read_files(ckpt, tmp_path, monkeypatch, case, trust):
    arch, kwargs = STEERING[case]
    float_file = tmp_path / "float.pt"
    torch.save(create_model("digits_cnn").state_dict(), float_file)
    kwargs = {k: (str(float_file) if v == "FLOAT_FILE" else v) for k, v in kwargs.items()}
    edit_config(ckpt, lambda m: m.update(arch=arch, arch_kwargs=kwargs))  # self-consistent: hashes match

    steered = []
    real_create, real_torch_load = dfqkern.models.create_model, torch.load

    def create_spy(name, *args, **kw):
        if kw.get("pretrained") or kw.get("checkpoint") is not None or args:
            steered.append(("create_model", name, args, kw))
            raise RuntimeError(f"the checkpoint steered create_model({name!r}, {args}, {kw})")
        return real_create(name, **kw)

    def torch_load_spy(f, *args, **kw):
        steered.append(("torch.load", str(f)))
        return real_torch_load(f, *args, **kw)

    monkeypatch.setattr(dfqkern.models, "create_model", create_spy)
    monkeypatch.setattr(torch, "load", torch_load_spy)
    extra = {} if trust is None else {"trust_unverified": trust}
    with pytest.raises(CheckpointError) as e:
        load_quantized(ckpt, **extra)
    msg = str(e.value)
    assert str(ckpt / CONFIG_FILE) in msg and "arch_kwargs" in msg
    assert ("pretrained" in msg) or ("checkpoint" in msg)
    assert steered == []


def test_allowed_arch_kwargs_still_rebuild(tmp_path):
    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn", num_classes=7), QuantConfig(weight_observer="minmax",
                                                                            act_observer="minmax"))
    calibrate_activations(q, torch.randn(16, 1, 8, 8), progress=False)
    path = save_quantized(q, tmp_path / "d7", arch_kwargs={"num_classes": 7})
    m = load_quantized(path)
    assert m.fc.out_features == 7 and model_info(m).arch_kwargs == {"num_classes": 7}


def test_save_refuses_arch_kwargs_loading_would_not_honour(tmp_path):
    q = quantized_digits()
    with pytest.raises(ValueError, match=r"arch_kwargs.*'pretrained'.*num_classes"):
        save_quantized(q, tmp_path / "x", arch_kwargs={"pretrained": True})
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- item 1: integrity hash

def test_edited_conv_padding_is_detected(ckpt):
    edit_config(ckpt, lambda m: m["layers"]["features.0"].update(padding=[2, 2]), rehash=False)
    for extra in ({}, {"trust_unverified": True}):  # a hash that is present and wrong is never waived
        with pytest.raises(CheckpointError, match="config_sha256") as e:
            load_quantized(ckpt, **extra)
        assert str(ckpt / CONFIG_FILE) in str(e.value)
    with pytest.raises(CheckpointError, match="config_sha256"):
        checkpoint_summary(ckpt)


def test_crafted_conv_padding_must_match_the_architecture(ckpt):
    edit_config(ckpt, lambda m: m["layers"]["features.0"].update(padding=[2, 2]))  # hashes recomputed
    with pytest.raises(CheckpointError, match=r"layers\['features.0'\].padding") as e:
        load_quantized(ckpt)
    assert str(ckpt) in str(e.value)


def test_deleting_the_weights_hash_is_not_silent(ckpt, saved):
    edit_config(ckpt, lambda m: m.pop("weights_sha256"), rehash=False)
    with pytest.raises(CheckpointError, match="config_sha256"):
        load_quantized(ckpt)
    edit_config(ckpt, lambda m: None)  # now the config hash agrees with the stripped config
    with pytest.raises(CheckpointError, match=r"weights_sha256.*trust_unverified=True") as e:
        load_quantized(ckpt)
    assert str(ckpt) in str(e.value)
    with pytest.warns(UserWarning, match="unverified"):
        m = load_quantized(ckpt, trust_unverified=True)
    with torch.no_grad():
        assert torch.equal(m(X), saved[1])


def test_checkpoint_without_config_hash_needs_explicit_trust(ckpt, saved):
    """A checkpoint written before config_sha256 existed: readable, but only when asked."""
    edit_config(ckpt, lambda m: m.pop("config_sha256"), rehash=False)
    for fn in (load_quantized, checkpoint_summary):
        with pytest.raises(CheckpointError, match=r"config_sha256.*trust_unverified=True.*--trust-unverified") as e:
            fn(ckpt)
        assert str(ckpt / CONFIG_FILE) in str(e.value)
    with pytest.warns(UserWarning, match="unverified"):
        m = load_quantized(ckpt, trust_unverified=True)
    with torch.no_grad():
        assert torch.equal(m(X), saved[1])
    with pytest.warns(UserWarning, match="unverified"):
        assert checkpoint_summary(ckpt, trust_unverified=True)["arch"] == "digits_cnn"


def test_verified_load_does_not_warn(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_quantized(ckpt)
        checkpoint_summary(ckpt)


# ----------------------------------------------------------------------------- item 5: umask

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_checkpoint_follows_the_umask(tmp_path, umask):
    q = quantized_digits()
    old = os.umask(umask)
    try:
        fresh = save_quantized(q, tmp_path / "fresh")
        replaced = save_quantized(q, fresh, overwrite=True)
    finally:
        os.umask(old)
    for path in (fresh, replaced):
        assert oct(path.stat().st_mode & 0o777) == oct(0o777 & ~umask)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            assert oct((path / f).stat().st_mode & 0o777) == oct(0o666 & ~umask), f


# ----------------------------------------------------------------------------- item 7: malformed configs

def _set_layers_list(m):
    m["layers"] = list(m["layers"].values())


MALFORMED = {
    "layers-a-list": (_set_layers_list, "layers"),
    "groups-zero": (lambda m: m["layers"]["features.3"].update(groups=0), "layers['features.3'].groups"),
    "kind-missing": (lambda m: m["layers"]["fc"].pop("kind"), "layers['fc'].kind"),
    "kind-unknown": (lambda m: m["layers"]["fc"].update(kind="lstm"), "layers['fc'].kind"),
    "bits-unknown": (lambda m: m["layers"]["fc"].update(weight_bits=5), "layers['fc'].weight_bits"),
    "bits-bool": (lambda m: m["layers"]["fc"].update(act_bits=True), "layers['fc'].act_bits"),
    "shape-text": (lambda m: m["layers"]["fc"].update(weight_shape="10x64"), "layers['fc'].weight_shape"),
    "stride-zero": (lambda m: m["layers"]["features.0"].update(stride=[0, 1]), "layers['features.0'].stride"),
    "layout-other": (lambda m: m["layers"]["fc"].update(layout="kpack-msb-v9"), "layers['fc'].layout"),
    "k-wrong": (lambda m: m["layers"]["fc"].update(k=65), "layers['fc'].k"),
    "quant-config-list": (lambda m: m.update(quant_config=[1, 2]), "quant_config"),
    "quant-config-bad-rule": (lambda m: m["quant_config"].update(rules=[{"bits": 3}]), "quant_config"),
    "input-spec-bad": (lambda m: m.update(input_spec={"mean": [0.5]}), "input_spec"),
    "folded-bn-list": (lambda m: m.update(folded_bn=["features.1"]), "folded_bn"),
    "folded-bn-not-bn": (lambda m: m["folded_bn"].update({"pool": "features.6"}), "folded_bn['pool']"),
    "arch-number": (lambda m: m.update(arch=3), "arch"),
    "arch-kwargs-list": (lambda m: m.update(arch_kwargs=[]), "arch_kwargs"),
    "num-classes-zero": (lambda m: m.update(arch_kwargs={"num_classes": 0}), "arch_kwargs['num_classes']"),
    "weights-hash-number": (lambda m: m.update(weights_sha256=12), "weights_sha256"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_names_the_file_and_the_field(ckpt, case):
    edit, field = MALFORMED[case]
    edit_config(ckpt, edit)  # self-consistent hashes: the schema check itself must catch it
    for extra in ({}, {"trust_unverified": True}):
        with pytest.raises(CheckpointError) as e:
            load_quantized(ckpt, **extra)
        assert str(ckpt / CONFIG_FILE) in str(e.value), str(e.value)
        assert f"field {field} " in str(e.value), str(e.value)


def test_tensor_dtype_must_match_the_architecture(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / WEIGHTS_FILE))
    state["features.0.packed_weight"] = state["features.0.packed_weight"].to(torch.int8)
    save_file(state, str(ckpt / WEIGHTS_FILE))
    rehash_weights(ckpt)
    with pytest.raises(CheckpointError, match=r"features.0.packed_weight.*int8.*uint8") as e:
        load_quantized(ckpt)
    assert str(ckpt / WEIGHTS_FILE) in str(e.value)


def test_packed_layers_say_they_are_inference_only(saved):
    model = load_quantized(saved[0])
    x = X.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x).sum().backward()
    with torch.no_grad():  # inference is unaffected
        assert torch.equal(model(X), saved[1])


@pytest.mark.parametrize("suffix", ["w_scale", "bias", "a_quant.scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_quantization_tensors_are_refused(ckpt, suffix, value):
    """A tampered NaN / Inf scale or bias (hashes recomputed) is refused at load, naming file and tensor."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / WEIGHTS_FILE))
    key = next((k for k in sorted(state) if k.endswith("." + suffix) and state[k].dtype.is_floating_point), None)
    if key is None:
        pytest.skip(f"no float tensor *.{suffix} in this checkpoint: {sorted(state)[:8]}")
    state[key] = state[key].clone()
    state[key].reshape(-1)[0] = value
    save_file(state, str(ckpt / WEIGHTS_FILE))
    rehash_weights(ckpt)
    with pytest.raises(CheckpointError, match=r"non-finite") as e:
        load_quantized(ckpt)
    assert str(ckpt / WEIGHTS_FILE) in str(e.value) and key in str(e.value)
