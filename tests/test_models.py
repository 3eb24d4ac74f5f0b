"""Model registry, input specs and checkpoint loading."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from dfqkern.models import (CifarBasicBlock, InputSpec, OptionAShortcut, create_model, input_spec, list_models,
                            load_checkpoint, register_model)
from dfqkern.model_info import model_info

CIFAR_NAMES = [f"{d}_resnet{n}" for d in ("cifar10", "cifar100") for n in (20, 32, 44, 56)]
# Parameter counts of He et al. (2016), Table 6: 0.27M, 0.46M, 0.66M, 0.85M (CIFAR-10 heads).
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- registry models

def test_list_models_has_every_family():
    assert set(CIFAR_NAMES) | {"digits_cnn"} <= set(list_models())


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_resnets_build_and_run(name):
    torch.manual_seed(0)
    model = create_model(name)
    classes = 100 if name.startswith("cifar100") else 10
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, classes)
    assert not model.training
    assert model_info(model).arch == name and model_info(model).input_spec == input_spec(name)
    depth = int(name.rsplit("resnet", 1)[1])
    assert sum(isinstance(m, CifarBasicBlock) for m in model.modules()) == (depth - 2) // 2
    if classes == 10:
        assert round(_params(model) / 1e6, 2) == PAPER_PARAMS_M[depth]


def test_cifar_resnet20_matches_reference_layout():
    model = create_model("cifar10_resnet20")
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    expected = {"conv1.weight", "linear.weight", "linear.bias"}
    expected |= {f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
    for layer in (1, 2, 3):
        for i in range(3):
            for c in (1, 2):
                expected.add(f"layer{layer}.{i}.conv{c}.weight")
                expected |= {f"layer{layer}.{i}.bn{c}.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
    assert keys == expected
    # Stage transitions use the parameter-free option-A shortcut; the others are identities.
    assert isinstance(model.layer2[0].shortcut, OptionAShortcut)
    assert isinstance(model.layer3[0].shortcut, OptionAShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = OptionAShortcut(8)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_cifar_resnet_deepcopies_and_fx_traces():
    torch.manual_seed(0)
    model = create_model("cifar10_resnet20")
    x = torch.randn(1, 3, 32, 32)
    clone = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(clone(x), model(x))
    assert torch.allclose(traced(x), model(x))


def test_num_classes_override_and_validation():
    assert create_model("cifar10_resnet20", num_classes=7)(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cifar10_resnet20", num_classes=0)


def test_digits_cnn():
    model = create_model("digits_cnn")
    spec = input_spec("digits_cnn")
    assert spec.input_size == (1, 8, 8) and spec.mean == (0.5,) and spec.std == (0.5,)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert 10_000 <= _params(model) <= 30_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_name_lists_known_names_and_prefixes():
    with pytest.raises(ValueError) as e:
        create_model("resnet9000")
    msg = str(e.value)
    assert "resnet9000" in msg and "cifar10_resnet20" in msg and "timm:" in msg and "torchvision:" in msg
    with pytest.raises(ValueError, match="resnet9000"):
        input_spec("resnet9000")
    with pytest.raises(ValueError, match="empty model name"):
        create_model("timm:")


def test_register_model_custom_factory_and_duplicates():
    spec = InputSpec(mean=(0.0,), std=(1.0,), input_size=(1, 4, 4))

    @register_model("test_tiny_linear_xyz")
    def factory(num_classes=None):
        return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes or 2)), spec

    model = create_model("test_tiny_linear_xyz", num_classes=5)
    assert model(torch.randn(1, 1, 4, 4)).shape == (1, 5)
    assert input_spec("test_tiny_linear_xyz") == spec
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_tiny_linear_xyz")
    with pytest.raises(ValueError, match="name"):
        register_model("timm:mine")


# ----------------------------------------------------------------------------- InputSpec

def test_input_spec_validation_and_dict_round_trip():
    spec = InputSpec(mean=[0.1, 0.2, 0.3], std=[1, 2, 3], input_size=[3, 8, 9], crop_pct=0.5)
    assert spec.mean == (0.1, 0.2, 0.3) and spec.input_size == (3, 8, 9)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="mean and std"):
        InputSpec(mean=(0.5,), std=(0.5,), input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="std"):
        InputSpec(mean=(0.5,), std=(0.0,), input_size=(1, 8, 8))
    with pytest.raises(ValueError, match="crop_pct"):
        InputSpec(mean=(0.5,), std=(0.5,), input_size=(1, 8, 8), crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        InputSpec(mean=(0.5,), std=(0.5,), input_size=(1, 8, 8), interpolation="cubic-ish")


# ----------------------------------------------------------------------------- timm / torchvision

@pytest.mark.parametrize("name,classes", [("timm:resnet18", 10), ("timm:vit_tiny_patch16_224", None)])
def test_timm_models(name, classes):
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (dfqkern[models])")
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    model = create_model(name, num_classes=classes)
    spec = model_info(model).input_spec
    cfg = resolve_data_config(model=timm.create_model(name.split(":", 1)[1]))
    assert spec == input_spec(name)
    assert (spec.mean, spec.std, spec.input_size) == (tuple(cfg["mean"]), tuple(cfg["std"]), tuple(cfg["input_size"]))
    assert spec.crop_pct == pytest.approx(cfg["crop_pct"]) and spec.interpolation == cfg["interpolation"]
    out = model(torch.randn(1, *spec.input_size))
    assert out.shape == (1, classes or 1000)


def test_timm_unknown_model():
    pytest.importorskip("timm", reason="timm is an optional dependency (dfqkern[models])")
    with pytest.raises(ValueError, match="timm:not_a_model"):
        create_model("timm:not_a_model")


def test_torchvision_mobilenet_v2():
    model = create_model("torchvision:mobilenet_v2", num_classes=10)
    spec = model_info(model).input_spec
    assert spec.input_size == (3, 224, 224) and spec.mean == (0.485, 0.456, 0.406)
    assert model(torch.randn(1, *spec.input_size)).shape == (1, 10)
    with pytest.raises(ValueError, match="torchvision:not_a_model"):
        create_model("torchvision:not_a_model")


# ----------------------------------------------------------------------------- checkpoints

def _small():
    torch.manual_seed(1)
    return create_model("cifar10_resnet20")


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_load_checkpoint_wrappers_and_prefixes(tmp_path, wrap, prefix):
    src = _small()
    state = {prefix + k: v for k, v in src.state_dict().items()}
    obj = state if wrap is None else {wrap: state, "best_prec1": 91.0, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    torch.manual_seed(2)
    dst = create_model("cifar10_resnet20")
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    assert load_checkpoint(dst, path) is dst
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dst(x), src(x))


def test_load_checkpoint_safetensors_and_create_model_checkpoint(tmp_path):
    src = _small()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_model("cifar10_resnet20", checkpoint=path)
    assert torch.equal(dst.linear.weight, src.linear.weight)


def test_load_checkpoint_without_num_batches_tracked(tmp_path):
    src = _small()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "c.pt")
    load_checkpoint(create_model("cifar10_resnet20"), tmp_path / "c.pt")


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(_small(), tmp_path / "nope.pth")


def test_load_checkpoint_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"meta\.pt.*not a state dict.*epoch"):
        load_checkpoint(_small(), tmp_path / "meta.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor\.pt.*not a state dict.*Tensor"):
        load_checkpoint(_small(), tmp_path / "tensor.pt")


def test_load_checkpoint_key_mismatch_lists_keys(tmp_path):
    state = _small().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["linear.bias"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(ValueError) as e:
        load_checkpoint(_small(), tmp_path / "c.pt")
    msg = str(e.value)
    assert "c.pt" in msg and "missing keys: linear.bias" in msg and "unexpected keys: extra.weight" in msg
    # strict=False loads what matches
    load_checkpoint(_small(), tmp_path / "c.pt", strict=False)


def test_load_checkpoint_other_architecture(tmp_path):
    torch.save(create_model("cifar100_resnet20").state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ValueError, match=r"c100\.pt.*wrong shape.*linear"):
        load_checkpoint(_small(), tmp_path / "c100.pt")
    torch.save(create_model("cifar10_resnet32").state_dict(), tmp_path / "r32.pt")
    with pytest.raises(ValueError, match=r"r32\.pt.*unexpected keys: layer1\.3"):
        load_checkpoint(_small(), tmp_path / "r32.pt")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_checkpoint_truncated_or_corrupt(tmp_path, suffix):
    src = _small()
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(good))
    else:
        torch.save(src.state_dict(), good)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"truncated{suffix}.*corrupt"):
        load_checkpoint(_small(), truncated)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x00\x13 not a checkpoint " * 50)
    with pytest.raises(ValueError, match=f"garbage{suffix}"):
        load_checkpoint(_small(), garbage)


def test_load_checkpoint_refuses_arbitrary_pickles(tmp_path):
    torch.save({"state_dict": _small().state_dict(), "cfg": nn.ReLU()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled\.pt"):
        load_checkpoint(_small(), tmp_path / "pickled.pt")


def test_load_checkpoint_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_checkpoint(_small(), tmp_path)


# ----------------------------------------------------------------------------- the real checkpoint

def test_pretrained_resnet20_loads_real_checkpoint(cifar10_dir):
    model = create_model("cifar10_resnet20", checkpoint=cifar10_dir / "resnet20-12fca82f.th")
    raw = torch.load(cifar10_dir / "resnet20-12fca82f.th", weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(model.layer3[2].conv2.weight, raw["module.layer3.2.conv2.weight"])
    with pytest.raises(ValueError, match="cifar10_resnet32"):
        create_model("cifar10_resnet32", pretrained=True)


def test_pretrained_convmixer_loads_and_classifies_dev_images(cifar10_dir):
    """``cifar10_convmixer_256_8`` with ``pretrained=True`` reads the shared checkpoint (keys strict) and its
    normalization is right: it classifies real dev images (86.5 % on all 5,000)."""
    from dfqkern.data import build_transform, open_dataset

    ckpt = cifar10_dir.parent / "models" / "convmixer_256_8" / "convmixer-256-8-p4-cifar10.pth"
    if not ckpt.is_file():
        pytest.skip(f"ConvMixer checkpoint not found at {ckpt}")
    model = create_model("cifar10_convmixer_256_8", pretrained=True)
    raw = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert torch.equal(model[3][0].fn[0].weight, raw["module.3.0.fn.0.weight"])  # block 1's depthwise conv
    dev = open_dataset(cifar10_dir / "cifar10_test_dev_jpeg.tar.gz", build_transform(model_info(model).input_spec),
                       labels_csv=cifar10_dir / "cifar10_test_dev_labels.csv", limit=200)
    x = torch.stack([dev[i][0] for i in range(len(dev))])
    y = torch.tensor([dev[i][1] for i in range(len(dev))])
    with torch.no_grad():
        top1 = (model(x).argmax(1) == y).float().mean().item()
    assert top1 > 0.75, top1
