"""QuantConfig bit policy and quantize_model: BN folding, module swap, rules / skip / unhandled, calibration."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dfqkern.config import CONFIG_VERSION, LayerQuant, LayerRule, QuantConfig, preset
from dfqkern.models import create_model
from dfqkern.nn import QuantConv2d, QuantLayer, QuantLinear
from dfqkern.quantize import (calibrate_activations, find_conv_bn_pairs, fold_batchnorm, pack_model, quant_layers,
                              quantize_model)
from dfqkern.model_info import model_info

FAST = dict(weight_observer="minmax", act_observer="minmax")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.3)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


# ----------------------------------------------------------------------------- QuantConfig

def test_config_validation_names_the_field():
    cases = [
        (dict(weight_bits=5), r"weight_bits must be one of \(2, 3, 4, 8\), got 5"),
        (dict(act_bits=5), r"act_bits must be one of \(2, 3, 4, 8\), got 5"),
        (dict(act_granularity="per_channel"), r"act_granularity must be one of \('per_tensor', 'per_token'\)"),
        (dict(weight_observer="kl"), r"weight_observer must be one of \('minmax', 'mse'\), got 'kl'"),
        (dict(act_observer="max"), r"act_observer must be one of"),
        (dict(first_last_bits=2), r"first_last_bits must be one of \(4, 8\), got 2"),
        (dict(lp=0), "lp must be > 0"),
        (dict(grid=0), "grid must be a positive int"),
        (dict(min_clip=0.0), r"min_clip must be in \(0, 1\]"),
        (dict(version=CONFIG_VERSION + 1), f"QuantConfig version {CONFIG_VERSION + 1} is not supported"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="exactly one of pattern"):
        LayerRule()
    with pytest.raises(ValueError, match="exactly one of pattern"):
        LayerRule(pattern="a", module_type="Linear")
    with pytest.raises(ValueError, match=r"LayerRule.weight_bits must be one of"):
        LayerRule(pattern="a", weight_bits=6)
    with pytest.raises(ValueError, match=r"LayerRule.act_bits must be one of"):
        LayerRule(pattern="a", act_bits=6)


def test_config_json_round_trip():
    cfg = QuantConfig(weight_bits=2, act_bits=4, rules=[LayerRule(pattern="layer1.*", weight_bits=4),
                                                        {"module_type": "Linear", "act_bits": "float"}],
                      skip=["fc"], first_last_bits=None, act_granularity="per_token", seed=7)
    assert isinstance(cfg.rules[1], LayerRule) and cfg.skip == ("fc",)
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match=r"unknown QuantConfig fields \['wbits'\]"):
        QuantConfig.from_dict({"wbits": 4})
    assert preset("w2a4") == QuantConfig(weight_bits=2, act_bits=4)
    assert preset("w4", seed=3).act_bits is None and preset("w4", seed=3).seed == 3
    assert preset("w3a8").scheme_name == "w3a8" and preset("w8").scheme_name == "w8"


def test_resolve_policy():
    lin, conv = nn.Linear(2, 2), nn.Conv2d(1, 1, 1)
    cfg = QuantConfig(weight_bits=2, act_bits=4)
    assert cfg.resolve("mid", conv, False, False) == LayerQuant(2, 4)
    assert cfg.resolve("first", conv, True, False) == LayerQuant(8, 8)
    assert cfg.resolve("last", lin, False, True) == LayerQuant(8, 8)
    assert cfg.replace(first_last_bits=None).resolve("first", conv, True, False) == LayerQuant(2, 4)
    assert cfg.replace(act_bits=None).resolve("last", lin, False, True) == LayerQuant(8, None)
    rules = (LayerRule(pattern="blocks.*.fc?", weight_bits=4), LayerRule(module_type="Linear", act_bits="float"),
             LayerRule(pattern="blocks.1.*", weight_bits=3, act_bits=8))
    cfg = cfg.replace(rules=rules)
    assert cfg.resolve("blocks.0.fc1", lin, False, False) == LayerQuant(4, None)
    assert cfg.resolve("blocks.1.fc2", lin, False, False) == LayerQuant(3, 8)  # last match wins
    assert cfg.resolve("blocks.0.conv", conv, False, False) == LayerQuant(2, 4)
    assert cfg.resolve("head", lin, False, True) == LayerQuant(8, None)  # rules apply after first/last
    assert cfg.replace(skip=("head*",)).is_skipped("head.fc") and not cfg.is_skipped("head")


# ----------------------------------------------------------------------------- BatchNorm folding

class ConvBNZoo(nn.Module):
    """Foldable and non-foldable conv/BN wirings."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)  # conv with bias
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # c3's output also feeds a residual
        self.shared, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # shared conv, called twice
        self.dw, self.b5 = nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        y = self.c3(x)
        x = self.b3(y) + y
        x = self.b4(self.shared(x)) + self.shared(x)
        return self.b5(self.dw(x))


def test_fold_batchnorm_pairs_and_outputs():
    model = randomize_bn(ConvBNZoo())
    assert find_conv_bn_pairs(model) == {"b1": "c1", "b2": "c2", "b5": "dw"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
        folded = copy.deepcopy(model)
        pairs = fold_batchnorm(folded)
        assert pairs == {"b1": "c1", "b2": "c2", "b5": "dw"}
        assert isinstance(folded.b1, nn.Identity) and isinstance(folded.b3, nn.BatchNorm2d)
        assert folded.c1.bias is not None
        assert rel(folded(x), y) <= 1e-5


@pytest.mark.parametrize("name", ["cifar10_resnet20", "digits_cnn"])
def test_fold_batchnorm_registry_models(name):
    model = randomize_bn(create_model(name))
    x = torch.randn(2, *model_info(model).input_spec.input_size)
    with torch.no_grad():
        y = model(x)
        folded = copy.deepcopy(model)
        pairs = fold_batchnorm(folded)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert len(pairs) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert rel(folded(x), y) <= 1e-4


# ----------------------------------------------------------------------------- quantize_model

def _check_layerwise_packed_equals_fake_quant(qmodel, x):
    """Feed every packed layer exactly the input its fake-quant twin saw; outputs agree within 1e-5.

    (Whole-model outputs are not compared this tightly: a 1e-7 float difference can flip one activation
    rounding, and a deep random network amplifies that.)
    """
    fq = copy.deepcopy(qmodel)
    seen = {}  # clones: in-place ReLUs / residual adds modify a layer's output after the hook
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].clone(), o.clone())))
             for n, layer in quant_layers(fq)]
    with torch.no_grad():
        fq(x)
    for h in hooks:
        h.remove()
    pack_model(qmodel)
    layers = dict(quant_layers(qmodel))
    assert set(seen) == set(layers)
    with torch.no_grad():
        for n, (inp, out) in seen.items():
            assert layers[n].is_packed
            assert rel(layers[n](inp), out) <= 1e-5, n


def _check_quantized(model, qmodel, x, expect_layers):
    report = model_info(qmodel).report
    assert set(report.layers) == expect_layers
    for name, lq in report.layers.items():
        layer = qmodel.get_submodule(name)
        assert isinstance(layer, QuantLayer) and layer.lq == lq
    names = list(report.layers)
    assert report.layers[names[0]].weight_bits == 8 and report.layers[names[-1]].weight_bits == 8
    assert model_info(qmodel).config is not None
    calibrate_activations(qmodel, x, batch_size=2, progress=False)
    with torch.no_grad():
        y, yq = model(x), qmodel(x)
    assert yq.shape == y.shape and torch.isfinite(yq).all()
    _check_layerwise_packed_equals_fake_quant(qmodel, x)
    with torch.no_grad():
        assert qmodel(x).shape == y.shape


def _linear_conv_names(model):
    return {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def test_quantize_cifar_resnet20_end_to_end():
    model = randomize_bn(create_model("cifar10_resnet20"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, grid=10))
    assert len(model_info(q).report.folded_bn) == 19 and not model_info(q).report.unhandled
    layers = model_info(q).report.layers
    assert layers["conv1"] == LayerQuant(8, 8) and layers["linear"] == LayerQuant(8, 8)
    assert layers["layer2.1.conv1"] == LayerQuant(4, 8)
    _check_quantized(model, q, x, _linear_conv_names(model))
    # the original is untouched (a copy was converted)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)


def test_all_layers_switch_and_inplace():
    model = randomize_bn(create_model("digits_cnn"))
    q = quantize_model(model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=None, **FAST))
    assert {lq for lq in model_info(q).report.layers.values()} == {LayerQuant(2, 4)}
    same = quantize_model(model, QuantConfig(**FAST), inplace=True)
    assert same is model and isinstance(model.fc, QuantLinear)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        quantize_model({}, QuantConfig())


def test_fold_bn_off_keeps_batchnorm():
    model = randomize_bn(create_model("digits_cnn"))
    q = quantize_model(model, QuantConfig(fold_bn=False, **FAST))
    assert not model_info(q).report.folded_bn
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == 3


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.body(self.reflect(self.stem(x)))  # [N, 8, H, W]
        t = self.seq(x.flatten(2)).transpose(1, 2)  # [N, HW, 8]
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_unhandled_skip_and_rules():
    model = Mixed().eval()
    cfg = QuantConfig(weight_bits=4, act_bits=8, skip=("body.2",), **FAST,
                      rules=(LayerRule(pattern="body.*", weight_bits=2, act_bits=4),
                             LayerRule(module_type="Linear", weight_bits=3, act_bits="float")))
    q = quantize_model(model, cfg)
    rep = model_info(q).report
    assert set(rep.unhandled) == {"reflect", "seq", "attn", "body.2"}
    assert "padding_mode='reflect'" in rep.unhandled["reflect"]
    assert "Conv1d" in rep.unhandled["seq"] and "MultiheadAttention" in rep.unhandled["attn"]
    assert "matmuls left in float" in rep.unhandled["attn"]  # its projections are weight-only (the Linear rule)
    assert rep.unhandled["body.2"] == "skipped by config"
    # left in float, by type
    assert type(q.reflect) is nn.Conv2d and type(q.seq) is nn.Conv1d and type(q.body[2]) is nn.Conv2d
    assert type(q.attn.out_proj) is QuantLinear  # the MHA twin runs its projections as modules
    assert set(rep.layers) == {"stem", "body.0", "head.0", "head.2", *(f"attn.{p}_proj" for p in "qkv"),
                               "attn.out_proj"}
    assert rep.layers["stem"] == LayerQuant(8, 8)  # first
    assert rep.layers["body.0"] == LayerQuant(2, 4)  # by name glob
    assert rep.layers["head.0"] == LayerQuant(3, None)  # by module type
    assert rep.layers["head.2"] == LayerQuant(3, None)  # last (8 bits), then the type rule
    assert q.head[0].a_quant is None and isinstance(q.body[0], QuantConv2d)
    d = rep.to_dict()
    assert d["layers"]["body.0"] == {"weight_bits": 2, "act_bits": 4} and d["unhandled"] == rep.unhandled
    x = torch.randn(2, 3, 4, 4)
    calibrate_activations(q, x, progress=False)
    with torch.no_grad():
        assert q(x).shape == (2, 5)
    pack_model(q)
    with torch.no_grad():
        assert q(x).shape == (2, 5)


def test_calibrate_activations_errors_and_inputs():
    model = randomize_bn(create_model("digits_cnn"))
    q = quantize_model(model, QuantConfig(**FAST))
    for empty in (torch.empty(0, 1, 8, 8), [], iter(())):
        with pytest.raises(ValueError, match="calibration data is empty"):
            calibrate_activations(q, empty, progress=False)
    with pytest.raises(ValueError, match="activations contain NaN or Inf"):
        calibrate_activations(q, torch.full((2, 1, 8, 8), float("nan")), progress=False)
    # a failed calibration leaves the quantizers out of observe mode (and still uncalibrated)
    assert all(layer.a_quant.mode == "quant" and not bool(layer.a_quant.calibrated)
               for _, layer in quant_layers(q))
    # an iterable of (images, labels) batches works like a tensor
    x = torch.randn(12, 1, 8, 8)
    q2 = copy.deepcopy(q)
    calibrate_activations(q, x, batch_size=5, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(12)), batch_size=5)
    calibrate_activations(q2, loader, progress=False)
    for (_, a), (_, b) in zip(quant_layers(q), quant_layers(q2)):
        assert torch.equal(a.a_quant.scale, b.a_quant.scale) and torch.equal(a.a_quant.zero_point,
                                                                             b.a_quant.zero_point)


# ----------------------------------------------------------------------------- library architectures

def _tv(name):
    pytest.importorskip("torchvision")
    return create_model(f"torchvision:{name}")


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval()


ARCHS = {
    "torchvision_resnet18": (lambda: _tv("resnet18"), 32),
    "torchvision_mobilenet_v2": (lambda: _tv("mobilenet_v2"), 32),
    "timm_resnet18": (lambda: _timm("resnet18"), 32),
    "timm_vit_tiny": (lambda: _timm("vit_tiny_patch16_224", img_size=32), 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_library_architectures(arch):
    factory, size = ARCHS[arch]
    model = randomize_bn(factory())
    x = torch.randn(2, 3, size, size)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if n_bn:
        with torch.no_grad():
            folded = copy.deepcopy(model)
            assert len(fold_batchnorm(folded)) == n_bn
            assert rel(folded(x), model(x)) <= 1e-4
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, **FAST))
    assert len(model_info(q).report.folded_bn) == n_bn
    expect = _linear_conv_names(model)
    if arch == "timm_vit_tiny":
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) >= 4 * 12  # qkv, proj, fc1, fc2 per block
        assert all(isinstance(q.get_submodule(f"blocks.{i}.attn.qkv"), QuantLinear) for i in range(12))
    assert not model_info(q).report.unhandled
    _check_quantized(model, q, x, expect)


# ----------------------------------------------------------------------------- real CIFAR-10 ResNet-20

@pytest.mark.slow
def test_cifar10_resnet20_real_accuracy(cifar10_dir):
    """W8A8 (mse observers, 256 real training images): top-1 drop <= 0.3 points on the 5,000 dev images.

    Also prints the W4A8 and W4A4 observer-only numbers: the baseline reconstruction must beat.
    """
    from dfqkern.data import build_transform, open_dataset
    from dfqkern.evaluation import evaluate_top1
    from dfqkern.pipeline import load_calibration

    fp = create_model("cifar10_resnet20", pretrained=True)
    dev = open_dataset(cifar10_dir / "cifar10_test_dev_jpeg.tar.gz", transform=build_transform(model_info(fp).input_spec))
    assert len(dev) == 5000
    calib = load_calibration(str(cifar10_dir / "cifar10_train_jpeg.tar.gz"), fp, 256, seed=0)
    assert calib.shape == (256, 3, 32, 32)
    fp_top1 = evaluate_top1(fp, dev, progress=False)["top1"]
    assert fp_top1 == pytest.approx(81.02, abs=0.05)  # the README's measured FP accuracy
    results = {}
    for scheme in ("w8a8", "w4a8", "w4a4"):
        q = quantize_model(fp, preset(scheme))  # defaults: mse observers, first/last layer at 8 bits
        calibrate_activations(q, calib, progress=False)
        pack_model(q)
        results[scheme] = evaluate_top1(q, dev, progress=False)["top1"]
    print(f"\nCIFAR-10 ResNet-20, dev 5000, observer (mse) calibration on 256 train images: FP {fp_top1:.2f}%")
    for scheme, top1 in results.items():
        print(f"  {scheme}: {top1:.2f}% (drop {fp_top1 - top1:.2f})")
    assert fp_top1 - results["w8a8"] <= 0.3
    assert 10 < results["w4a4"] <= results["w4a8"] + 1 and results["w4a8"] <= fp_top1 + 1  # sanity only


def test_a3_calibrates_in_fake_quant_and_pack_names_the_layer():
    """Activation widths without a packed kernel are first-class for calibration; packing refuses them
    before touching any layer, naming one."""
    model = randomize_bn(create_model("digits_cnn"))
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=3, **FAST))
    assert {layer.lq.act_bits: layer.a_quant.bits for _, layer in quant_layers(q)} == {8: 8, 3: 3}
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate_activations(q, x, progress=False)
    codes = {name: layer.a_quant.zero_point for name, layer in quant_layers(q) if layer.a_quant.bits == 3}
    assert codes and all(0 <= int(z) <= 7 for z in codes.values())
    with pytest.raises(ValueError, match=r"cannot pack layer 'features\.3'.*3-bit activations have no packed kernel"):
        pack_model(q)
    assert not any(layer.is_packed for _, layer in quant_layers(q))  # nothing was packed half-way
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_backend_choice_reaches_every_quantized_module():
    """``quantize_model(backend=)`` / ``set_backend`` / ``CalibConfig(backend=)`` force the kernel backend of
    fake-quant and packed calls (strict: a backend that cannot serve the call raises)."""
    from dfqkern.calib import CalibConfig, calibrate
    from dfqkern.quantize import set_backend

    model = randomize_bn(create_model("digits_cnn"))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_model(model, QuantConfig(**FAST), backend="tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        CalibConfig(backend="tpu")
    q = quantize_model(model, QuantConfig(**FAST), backend="reference")
    quantizers = [m for m in q.modules() if hasattr(m, "backend") and m is not q]
    assert quantizers and {m.backend for m in quantizers} == {"reference"}
    calibrate_activations(q, x, progress=False)
    set_backend(q, "cuda")  # never serves CPU tensors (triton may, under TRITON_INTERPRET): must surface
    with pytest.raises(RuntimeError, match="backend 'cuda'"), torch.no_grad():
        q(x)
    set_backend(q, None)
    calibrate(q, model, x, CalibConfig(method="observer", backend="reference", progress=False))
    assert {m.backend for m in quantizers} == {None}  # calibration's backend does not stick
    pack_model(q)
    set_backend(q, "reference")
    with torch.no_grad():
        ref = q(x)
        set_backend(q, "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            q(x)
        set_backend(q, None)
        torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)
