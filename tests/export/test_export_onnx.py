"""ONNX QDQ export (dfqkern.export.onnx), checked by running the exported files in onnxruntime (CPU).

Sessions come from ``onnxruntime_session`` (two onnxruntime defaults that change the model switched off;
see dfqkern.export.onnx).

Tolerance. The exported graph computes what the packed model computes; onnxruntime's arithmetic
differs from dfqkern's packed kernels only by float32 rounding (it accumulates the dequantized tensors
in float, or requantizes its fused integer kernels in float, where dfqkern accumulates exactly in
int32; and QuantizeLinear divides by the scale where dfqkern multiplies by ``1 / scale``).
Such an error moves an activation lying on a rounding boundary of the next layer's grid by one code,
and that code's change propagates. So the checks are:

1. per layer, exactly: each QuantizeLinear's int8 codes equal dfqkern's codes for that layer's grid
   applied to the same input (shifted by -128), except at rounding ties (at most 0.1 %, by one code);
   each layer's weights are checked by the logits below and by the INT4 / int8 initializer checks;
2. end to end, on random inputs of small random models: logits within 1 % of the logits' range (float
   rounding alone is about 1e-7 of it; a one-code flip propagated through the following layers gave
   0.09 % here) and the same top-1 on at least 97 % of the inputs (a flipped top-1 needs a near tie);
3. on the real CIFAR-10 ResNet-20 (slow test): top-1 over the 5,000 dev images within 0.1 point of the
   packed model's, as the issue asks, and only near-tie images change their top-1.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install dfqkern[export])")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install dfqkern[export])")

import dfqkern  # noqa: E402
from dfqkern.export.onnx import OnnxExportError, export_onnx, onnx_export_problems, onnxruntime_session  # noqa: E402
from dfqkern.kernels import reference as R  # noqa: E402
from dfqkern.quantize import quant_layers  # noqa: E402

LOGIT_RTOL = 0.01  # of the logits' range (see the module docstring)
CODE_TIE_FRACTION = 1e-3  # x / s vs x * (1 / s) differ at about 1e-5 of random inputs


# ----------------------------------------------------------------------------- tiny models

class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (with a depthwise conv), a strided conv, pooling, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.dw(self.relu(self.bn1(self.conv1(x)))))
        x = self.relu(x + y)
        x = torch.nn.functional.max_pool2d(self.down(x), 2)
        return self.fc(torch.flatten(self.pool(x), 1))


class MlpBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TinyMlpViT(nn.Module):
    """ViT-like without attention: patch embedding, token-mixing and channel MLP blocks on [B, tokens, dim]
    (LayerNorm, GELU, residuals, 3-D Linear inputs), mean over tokens, head."""

    def __init__(self, classes: int = 10, dim: int = 24, patch: int = 4, img: int = 16):
        super().__init__()
        tokens = (img // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.token_mix = MlpBlock(tokens, 2 * tokens)
        self.blocks = nn.Sequential(MlpBlock(dim, 2 * dim), MlpBlock(dim, 2 * dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        x = self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


MODELS = {"cnn": (TinyResNet, (3, 16, 16)), "mlpvit": (TinyMlpViT, (3, 16, 16))}


def _packed(kind: str, wbits: int, abits: int | None = 8, **cfg):
    torch.manual_seed(0)
    cls, shape = MODELS[kind]
    model = _randomize_bn(cls())
    config = dfqkern.QuantConfig(weight_bits=wbits, act_bits=abits, weight_observer="minmax", act_observer="minmax",
                                 **cfg)
    q = dfqkern.quantize_model(model, config)
    dfqkern.calibrate_activations(q, torch.randn(32, *shape, generator=torch.Generator().manual_seed(1)),
                                  progress=False)
    return dfqkern.pack_model(q), shape


def _inputs(shape, n: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _with_quantize_outputs(path) -> tuple[bytes, int]:
    """The exported model with every QuantizeLinear's float input and int8 output as graph outputs."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.INT8, None))
    return model.SerializeToString(), len(nodes)


def _compare(q, path, shape, n: int = 64) -> float:
    """Check the exported file against the packed model (see the module docstring); returns the max logit
    difference as a fraction of the logits' range."""
    x = _inputs(shape, n)
    with torch.no_grad():
        ref = q(x).numpy()
    quantizers = [layer.a_quant for _, layer in quant_layers(q) if layer.a_quant is not None]  # execution order
    model, n_q = _with_quantize_outputs(path)
    out, *pairs = onnxruntime_session(model).run(None, {"input": x.numpy()})
    assert n_q == len(quantizers), "one QuantizeLinear per quantized layer with activations"
    for i, a in enumerate(quantizers):
        # each layer's grid, applied to the very input onnxruntime quantized: dfqkern's codes (shifted to int8)
        x_in, codes = torch.from_numpy(pairs[2 * i]), torch.from_numpy(pairs[2 * i + 1]).to(torch.int32)
        mine = R.quantize(x_in, a.scale, a.zero_point, 8).to(torch.int32) - 128
        diff = (codes - mine).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= CODE_TIE_FRACTION, \
            f"QuantizeLinear #{i}: {int((diff > 0).sum())} of {diff.numel()} codes differ, max {int(diff.max())}"
    span = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max())
    assert err <= LOGIT_RTOL * span, f"max |logit diff| {err:.3g} vs logit range {span:.3g}"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    return err / span


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("wbits", [8, 4, 2])
def test_export_runs_in_onnxruntime_and_matches_packed(tmp_path, kind, wbits):
    q, shape = _packed(kind, wbits)
    path = export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape))
    assert path == tmp_path / "m.onnx" and path.is_file()
    _compare(q, path, shape)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 21
    layers = dict(quant_layers(q))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == len(layers)  # every layer here has 8-bit activations
    # one weight DequantizeLinear per layer, reading INT4 initializers exactly for the layers below 8 bits
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) > 0]
    assert len(weight_dq) == len(layers)
    int4 = sum(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in weight_dq)
    assert int4 == sum(layer.lq.weight_bits < 8 for layer in layers.values())
    assert (int4 > 0) == (wbits < 8)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dfqkern.version"] == dfqkern.__version__ and meta["dfqkern.scheme"] == f"w{wbits}a8"


def test_dynamic_batch_and_opset_17_int8_containers(tmp_path):
    q, shape = _packed("cnn", 4)
    p21 = export_onnx(q, tmp_path / "w4.onnx", input_shape=(2, *shape))
    p17 = export_onnx(q, tmp_path / "w4_17.onnx", input_shape=(2, *shape), opset=17)
    m17 = onnx.load(str(p17))
    assert max(i.version for i in m17.opset_import if i.domain in ("", "ai.onnx")) == 17
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in m17.graph.initializer)
    assert p21.stat().st_size < p17.stat().st_size  # INT4 packs two weights a byte
    _compare(q, p17, shape)
    sess = onnxruntime_session(p21)
    for batch in (1, 5):  # exported at batch 2
        x = _inputs(shape, batch, seed=3)
        with torch.no_grad():
            ref = q(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=LOGIT_RTOL * float(np.abs(ref).max()))


def test_weight_only_layers_and_symmetric_zero_points(tmp_path):
    """Weight-only layers export as DQ(weight) on float activations; a symmetric config has zero points 0."""
    q, shape = _packed("mlpvit", 4, act_symmetric=True, weight_symmetric=True,
                       rules=(dfqkern.LayerRule(pattern="blocks.1.fc*", act_bits="float"),))
    path = export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape))
    model = onnx.load(str(path))
    n_act = sum(layer.a_quant is not None for _, layer in quant_layers(q))
    assert n_act == len(dict(quant_layers(q))) - 2
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == n_act
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all((z == 0).all() for z in zps)
    _compare(q, path, shape)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weight_only_models(tmp_path, kind):
    """No activation quantization at all: the graph is DequantizeLinear(weights) on float activations, equal to
    the packed model up to float rounding (4-bit weights: onnxruntime's MatMulNBits, at fp32 activations)."""
    q, shape = _packed(kind, 4, abits=None)
    path = export_onnx(q, tmp_path / "w4.onnx", input_shape=(2, *shape))
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load(str(path)).graph.node]
    assert _compare(q, path, shape) < 1e-5


def test_cifar_vit_attention_is_refused_unless_weight_only(tmp_path):
    """Quantized attention matmuls (dfqkern.nn.attention) have no QDQ form here: refused naming the module;
    the same ViT with weight-only layers (float matmuls) exports and matches."""
    from dfqkern.models import create_model

    torch.manual_seed(0)
    fp = create_model("cifar10_vit_qkv").eval()
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=8, act_bits=8, weight_observer="minmax",
                                                        act_observer="minmax"))
    dfqkern.calibrate_activations(q, _inputs((3, 32, 32), 8), progress=False)
    dfqkern.pack_model(q)
    with pytest.raises(OnnxExportError, match=r"module 'blocks\.0\.attn' \(QuantTimmAttention\) quantizes its "
                                              r"attention-matmul operands.*--format pt2"):
        export_onnx(q, tmp_path / "vit.onnx")
    q = dfqkern.pack_model(dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=4, act_bits=None,
                                                                           weight_observer="minmax")))
    path = export_onnx(q, tmp_path / "vit_w4.onnx")  # input shape from the model's input spec
    assert _compare(q, path, (3, 32, 32), n=8) < 1e-5


def test_tensorrt_target_is_symmetric_int8(tmp_path):
    q, shape = _packed("cnn", 4, act_symmetric=True, weight_symmetric=True)
    path = export_onnx(q, tmp_path / "trt.onnx", input_shape=(2, *shape), target="tensorrt")
    model = onnx.load(str(path))
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 17
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in inits:
            assert inits[node.input[0]].data_type == onnx.TensorProto.INT8
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert (onnx.numpy_helper.to_array(inits[node.input[2]]) == 0).all()
    _compare(q, path, shape)
    # the default (asymmetric) config is refused for TensorRT, naming a layer
    q_asym, _ = _packed("cnn", 4)
    with pytest.raises(OnnxExportError, match=r"layer 'stem\.0' \(w8a8\).*asymmetric.*act_symmetric=True"):
        export_onnx(q_asym, tmp_path / "asym.onnx", input_shape=(2, *shape), target="tensorrt")
    q_w, _ = _packed("cnn", 4, act_symmetric=True)
    with pytest.raises(OnnxExportError, match=r"asymmetric weight zero points.*weight_symmetric=True"):
        export_onnx(q_w, tmp_path / "asym.onnx", input_shape=(2, *shape), target="tensorrt")
    assert not (tmp_path / "asym.onnx").exists()


def test_export_from_checkpoint_directory(tmp_path):
    q, shape = _packed("cnn", 4)
    ck = dfqkern.save_quantized(q, tmp_path / "ck", arch=None)
    with pytest.raises(ValueError, match="records no architecture id"):
        export_onnx(ck, tmp_path / "m.onnx")
    model = dfqkern.load_quantized(ck, factory=lambda: _randomize_bn(TinyResNet()))
    path = export_onnx(model, tmp_path / "m.onnx", example_inputs=_inputs(shape, 2))
    _compare(model, path, shape)


# ----------------------------------------------------------------------------- refusals

def test_a4_activations_are_refused_naming_the_layer_and_scheme(tmp_path):
    q, shape = _packed("cnn", 4, abits=4)
    problems = onnx_export_problems(q)
    assert "conv1" in problems and "stem.0" not in problems  # first and last layer stay A8
    with pytest.raises(OnnxExportError, match=r"layer 'conv1' \(w4a4\) has 4-bit activations.*int8 activations"):
        export_onnx(q, tmp_path / "a4.onnx", input_shape=(2, *shape))
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_per_token_activations_are_refused(tmp_path):
    q, shape = _packed("mlpvit", 8, act_granularity="per_token")
    with pytest.raises(OnnxExportError, match=r"layer '.*' \(w8a8\) has per-token \(dynamic\) activation scales"):
        export_onnx(q, tmp_path / "pt.onnx", input_shape=(2, *shape))


def test_unpacked_and_float_models_are_refused(tmp_path):
    torch.manual_seed(0)
    q = dfqkern.quantize_model(_randomize_bn(TinyResNet()), dfqkern.QuantConfig(weight_observer="minmax",
                                                                                 act_observer="minmax"))
    dfqkern.calibrate_activations(q, _inputs((3, 16, 16), 8), progress=False)
    with pytest.raises(OnnxExportError, match=r"layer 'stem\.0' \(w8a8\) is not packed.*pack_model"):
        export_onnx(q, tmp_path / "m.onnx", input_shape=(2, 3, 16, 16))
    with pytest.raises(OnnxExportError, match="no dfqkern quantized layers"):
        export_onnx(TinyResNet(), tmp_path / "m.onnx", input_shape=(2, 3, 16, 16))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_onnx(42, tmp_path / "m.onnx")


def test_bad_output_paths(tmp_path):
    q, shape = _packed("cnn", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(q, tmp_path / "missing" / "m.onnx", input_shape=(2, *shape))
    with pytest.raises(ValueError, match=r"must end in '\.onnx'"):
        export_onnx(q, tmp_path / "m.txt", input_shape=(2, *shape))
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(q, tmp_path / "d.onnx", input_shape=(2, *shape))
    (tmp_path / "old.onnx").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(q, tmp_path / "old.onnx", input_shape=(2, *shape))
    assert (tmp_path / "old.onnx").read_text() == "old"
    export_onnx(q, tmp_path / "old.onnx", input_shape=(2, *shape), overwrite=True)
    onnx.checker.check_model(str(tmp_path / "old.onnx"))
    with pytest.raises(ValueError, match=r"opset must be an int in \[13, 21\]"):
        export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape), opset=22)
    with pytest.raises(ValueError, match="target must be one of"):
        export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape), target="tflite")
    with pytest.raises(ValueError, match="no example input"):
        export_onnx(q, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "old.onnx"]  # no temporaries left


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    q, shape = _packed("cnn", 8)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install dfqkern\[export\]"):
        export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install dfqkern\[export\]"):
        onnxruntime_session(tmp_path / "m.onnx")


def test_written_file_follows_the_umask(tmp_path):
    q, shape = _packed("cnn", 8)
    old = os.umask(0o022)
    try:
        path = export_onnx(q, tmp_path / "m.onnx", input_shape=(2, *shape))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
@pytest.mark.parametrize("wbits", [8, 4])
def test_cifar10_resnet20_top1_matches_packed(cifar10_dir, tmp_path, wbits):
    """W8A8 / W4A8 ResNet-20 calibrated (observer) on 64 real training images: onnxruntime top-1 over the
    5,000 dev images within 0.1 point of the packed model's (the issue's number: on a few hundred images a
    single near-tie image is worth more than 0.1 point, so the whole dev set is used), and every image whose
    top-1 differs is a near tie of the packed logits."""
    from dfqkern.data import TarImageDataset, build_transform, open_dataset
    from dfqkern.model_info import model_info
    from dfqkern.models import create_model

    train_tar = cifar10_dir / "cifar10_train_jpeg.tar.gz"
    if not train_tar.is_file():
        pytest.skip(f"real CIFAR-10 training images not found: {train_tar}")
    fp = create_model("cifar10_resnet20", pretrained=True).eval()
    transform = build_transform(model_info(fp).input_spec)
    dev = open_dataset(cifar10_dir / "cifar10_test_dev_jpeg.tar.gz", transform,
                       labels_csv=cifar10_dir / "cifar10_test_dev_labels.csv")
    train = TarImageDataset(train_tar, transform=transform, indices=range(0, 50000, 50000 // 64))
    calib = torch.stack([train[i][0] for i in range(64)])
    x = torch.stack([dev[i][0] for i in range(len(dev))])
    labels = np.array([dev[i][1] for i in range(len(dev))])
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=wbits, act_bits=8))
    dfqkern.calibrate_activations(q, calib, progress=False)
    dfqkern.pack_model(q)
    with torch.no_grad():
        ref = torch.cat([q(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
    path = export_onnx(q, tmp_path / f"r20_w{wbits}a8.onnx")
    top1_packed = 100 * (ref.argmax(1) == labels).mean()
    for faithful, tol in ((True, 0.1), (False, 0.25)):
        sess = onnxruntime_session(path, faithful=faithful)
        out = np.concatenate([sess.run(None, {"input": x[i:i + 500].numpy()})[0] for i in range(0, len(x), 500)])
        top1_ort = 100 * (out.argmax(1) == labels).mean()
        assert abs(top1_ort - top1_packed) <= tol + 1e-9, (faithful, top1_ort, top1_packed)
        differ = out.argmax(1) != ref.argmax(1)
        top2 = np.sort(ref, axis=1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        assert differ.mean() <= 0.01 and (margins[differ] < 0.5).all(), (faithful, differ.sum(), margins[differ])
        if faithful:
            assert np.abs(out - ref).max() <= LOGIT_RTOL * np.abs(ref).max()
