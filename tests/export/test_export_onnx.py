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
   packed model's, as the issue asks, and only near-tie images change their top-1;
4. quantized attention (random-init CIFAR ViTs, no trained weights exist): per module, on onnxruntime's own
   tensors, the q / k^T / v codes and both softmax branches' codes equal dfqkern's (but for ties) and each
   MatMul equals dfqkern's integer matmul of those codes. End to end a ViT feels one flipped code much more
   than a CNN (it reaches every token), so the stated checks are: a good part of the images match to float
   precision (1e-4 of the range; the float model is >= 0.5 % off on every image), the mean deviation is under
   half the quantization's own, every image within 5 % of the range, top-1 equal but for near ties. An export
   whose softmax grid is off by one shift fails the per-module check, matches no image to float precision and
   exceeds the mean bound.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
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


def _q_type(graph, node) -> int:
    """The element type of a QuantizeLinear's output: its zero point's (uint8 for target onnxruntime, int8
    for tensorrt)."""
    zp = next((t for t in graph.initializer if t.name == node.input[2]), None)
    if zp is None:
        const = next(n for n in graph.node if n.op_type == "Constant" and n.output[0] == node.input[2])
        zp = const.attribute[0].t
    return zp.data_type


def _int8_view(codes):
    """Q/DQ codes as the int8 values of the int8 encoding (a uint8 export holds them + 128)."""
    a = np.asarray(codes)
    shift = 128 if a.dtype == np.uint8 else 0  # else int8, or int4 weight zero points (ml_dtypes)
    return torch.tensor(a.astype(np.int32)) - shift


def _with_quantize_outputs(path) -> tuple[bytes, int]:
    """The exported model with every QuantizeLinear's float input and code output as graph outputs."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], _q_type(model.graph, node),
                                                                     None))
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
        x_in, codes = torch.from_numpy(pairs[2 * i]), _int8_view(pairs[2 * i + 1])
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
    assert zps and all((_int8_view(z) == 0).all() for z in zps)  # 128 in the uint8 encoding
    _compare(q, path, shape)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weight_only_models(tmp_path, kind):
    """No activation quantization at all: the graph is DequantizeLinear(weights) on float activations, equal to
    the packed model up to float rounding (4-bit weights: onnxruntime's MatMulNBits, at fp32 activations)."""
    q, shape = _packed(kind, 4, abits=None)
    path = export_onnx(q, tmp_path / "w4.onnx", input_shape=(2, *shape))
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load(str(path)).graph.node]
    assert _compare(q, path, shape) < 1e-5


def test_cifar_vit_weight_only_exports_with_float_matmuls(tmp_path):
    """A ViT with weight-only layers has float attention matmuls (no operand quantizers): DQ(weight) graph."""
    from dfqkern.models import create_model

    torch.manual_seed(0)
    fp = create_model("cifar10_vit_qkv").eval()
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


# ----------------------------------------------------------------------------- quantized attention (ViTs)

VIT_SHAPE = (3, 32, 32)
EXACT_RTOL = 1e-4  # of the logits' range: an image whose logits agree this well flipped no code anywhere (float
# rounding alone: ~1e-6); W8A8 quantization itself moves every image by >= 0.5 % (asserted below)
VIT_LOGIT_RTOL = 0.05  # of the logits' range, any image: a bound; the tests' finer checks are per module and the mean


@functools.cache
def _packed_vit(arch: str, qk_gain: float = 2.0, **cfg):
    """(float, packed) random-init registered CIFAR ViT (no trained weights exist), W8A8 unless ``cfg`` says
    otherwise. The q/k/v projection weights are scaled by ``qk_gain`` so that attention is peaked enough to use
    the softmax grid's coarse range too (at the stock init of the fused-qkv model every probability lies in the
    fine range). Do not modify the models: they are shared between tests."""
    from dfqkern.models import create_model

    torch.manual_seed(0)
    fp = create_model(arch).eval()
    with torch.no_grad():
        for name, w in fp.named_parameters():
            if name.endswith(("qkv.weight", "in_proj_weight")):
                w.mul_(qk_gain)
    config = dfqkern.QuantConfig(**{"weight_bits": 8, "act_bits": 8, "weight_observer": "minmax",
                                    "act_observer": "minmax", **cfg})
    q = dfqkern.quantize_model(fp, config)
    dfqkern.calibrate_activations(q, _vit_inputs(32, seed=1), progress=False)
    return fp, dfqkern.pack_model(q)


def _vit_inputs(n: int, seed: int) -> torch.Tensor:
    """Half Gaussian noise, half structured: colour gratings in 10 orientations under noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *VIT_SHAPE, generator=g)
    m = n // 2
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ang = (torch.arange(m) % 10).float() * (math.pi / 10)
    phase = torch.rand(m, generator=g) * 2 * math.pi
    wave = torch.sin(0.3 * (xx * ang.cos()[:, None, None] + yy * ang.sin()[:, None, None]) + phase[:, None, None])
    colour = torch.stack([ang.cos(), ang.sin(), (2 * ang).cos()], 1)
    x[:m] = 0.5 * x[:m] + wave[:, None] * (1 + colour[:, :, None, None])
    return x


def _attention_nodes(graph) -> list[dict]:
    """Per Softmax node (one per quantized attention module, in execution order), found from the graph's
    structure: the QuantizeLinear nodes of q, k^T, v and of the two softmax branches, the probabilities, and
    the outputs of the two MatMuls with v."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores = producer[softmax.input[0]]
        scores = producer[scores.input[0]] if scores.op_type == "Add" else scores  # + bias
        q_q, k_q = (producer[producer[i].input[0]] for i in scores.input)  # MatMul <- DQ <- Q
        p = softmax.output[0]
        fine_q, = [consumers[w.output[0]][0] for w in consumers[p] if w.op_type == "Where" and w.input[1] == p]
        coarse_q, = [consumers[w.output[0]][0] for w in consumers[p] if w.op_type == "Where" and w.input[2] == p]
        fine_mm, coarse_mm = (consumers[consumers[n.output[0]][0].output[0]][0] for n in (fine_q, coarse_q))
        assert fine_mm.op_type == coarse_mm.op_type == "MatMul" and fine_mm.input[1] == coarse_mm.input[1]
        v_q = producer[producer[fine_mm.input[1]].input[0]]
        assert {n.op_type for n in (q_q, k_q, v_q, fine_q, coarse_q)} == {"QuantizeLinear"}
        found.append({"q": q_q, "k_t": k_q, "v": v_q, "fine": fine_q, "coarse": coarse_q, "p": p,
                      "fine_mm": fine_mm.output[0], "coarse_mm": coarse_mm.output[0]})
    return found


def _assert_codes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = (got.to(torch.int32) - want.to(torch.int32)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= CODE_TIE_FRACTION, \
        f"{what}: {int((diff > 0).sum())} of {diff.numel()} codes differ, max {int(diff.max())}"


def _check_attention(q, path, x) -> float:
    """Each quantized attention module of the exported graph against dfqkern's packed attention, on the very
    tensors onnxruntime computed: q / k / v codes are dfqkern's codes of the same inputs; the two softmax
    branches hold dfqkern's (fine, coarse) codes of onnxruntime's probabilities; each MatMul with v equals
    dfqkern's exact integer matmul of those codes times the scales. Returns the fraction of coarse codes."""
    from dfqkern.nn.attention import QuantAttentionBase

    model = onnx.load(str(path))
    found = _attention_nodes(model.graph)
    attns = [m for m in q.modules() if isinstance(m, QuantAttentionBase)]  # module order = execution order here
    assert len(found) == len(attns) > 0
    wanted = []  # (module index, key, tensor name, type)
    for i, f in enumerate(found):
        for key in ("q", "k_t", "v", "fine", "coarse"):
            wanted += [(i, f"{key}_in", f[key].input[0], onnx.TensorProto.FLOAT),
                       (i, key, f[key].output[0], _q_type(model.graph, f[key]))]
        wanted += [(i, key, f[key], onnx.TensorProto.FLOAT) for key in ("p", "fine_mm", "coarse_mm")]
    for _, _, name, dtype in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    values = onnxruntime_session(model.SerializeToString()).run(None, {"input": x.numpy()})[1:]
    coarse_codes = total = 0
    for i, attn in enumerate(attns):
        got = {key: _int8_view(v) if dtype != onnx.TensorProto.FLOAT else torch.from_numpy(v.copy())
               for (j, key, _, dtype), v in zip(wanted, values) if j == i}
        for key, quant in (("q", attn.q_quant), ("k_t", attn.k_quant), ("v", attn.v_quant)):
            mine = R.quantize(got[f"{key}_in"], quant.scale.detach(), quant.zero_point, 8)
            _assert_codes(got[key], mine.to(torch.int32) - 128, f"attention #{i} {key}")
        c_fine, c_coarse = attn.attn_quant.codes(got["p"])
        _assert_codes(got["fine"], c_fine, f"attention #{i} fine softmax codes")
        _assert_codes(got["coarse"], c_coarse, f"attention #{i} coarse softmax codes")
        fine, coarse = attn.attn_quant.steps()
        v_codes = (got["v"].to(torch.int32) + 128).to(torch.uint8)
        vs, vz = attn.v_quant.scale.detach().reshape(()), attn.v_quant.zero_point.reshape(1)
        zero = torch.zeros(1, dtype=torch.int32)
        for key, step in (("fine", fine), ("coarse", coarse)):
            want = R.matmul_int(got[key].to(torch.uint8), zero, v_codes, vz).float() * step * vs
            np.testing.assert_allclose(got[f"{key}_mm"], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                       err_msg=f"attention #{i}: {key}-range MatMul with v")
        coarse_codes += int((got["coarse"] > 0).sum())
        total += got["coarse"].numel()
    return coarse_codes / total


def _logit_deviation(q, path, x, fp=None) -> dict:
    """Per-image max |logit difference| of onnxruntime (and of the float model) vs the packed model and the
    packed top-2 margin, as fractions of the packed logits' range; the top-1 agreement."""
    with torch.no_grad():
        ref = q(x).numpy()
        ref_fp = None if fp is None else fp(x).numpy()
    out = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
    span = float(np.abs(ref).max())
    top2 = np.sort(ref, axis=1)[:, -2:]
    same = out.argmax(1) == ref.argmax(1)
    res = {"ort": np.abs(out - ref).max(1) / span, "ort_agree": float(same.mean()), "same_top1": same,
           "margin": (top2[:, 1] - top2[:, 0]) / span}
    if ref_fp is not None:
        res.update(fp=np.abs(ref_fp - ref).max(1) / span, fp_agree=float((ref_fp.argmax(1) == ref.argmax(1)).mean()))
    return res


@pytest.mark.parametrize("arch", ["cifar10_vit_qkv", "cifar10_vit_mha"])
def test_quantized_attention_runs_in_onnxruntime_and_matches_packed(tmp_path, arch):
    """W8A8 CIFAR ViTs with quantized attention matmuls (timm-style fused qkv; nn.TransformerEncoderLayer /
    nn.MultiheadAttention). Per module: exact but for rounding ties (``_check_attention``). End to end on 256
    noise / structured images: a good part of the images flip no code anywhere and match to float precision,
    where the float model is off by >= 0.5 % of the range on every image; the mean deviation is well under the
    quantization's own; top-1 agrees but for near ties. Measured (qkv / mha, onnxruntime 1.32): images matching
    to 1e-4 of the range 68 % / 46 %; max deviation 1.9 % / 4.1 % of the range (float model 2.5 % / 12.7 %); mean
    of the per-image max 0.26 % / 0.76 % (float 1.3 % / 3.4 %); top-1 agreement 100 % / 99.2 % (float 98.4 % /
    97.3 %), the two differing images with top-2 margins of 0.6 % and 0.3 % of the range."""
    from dfqkern.nn.attention import QuantAttentionBase

    fp, q = _packed_vit(arch)
    path = export_onnx(q, tmp_path / "vit.onnx")  # input shape from the model's input spec
    model = onnx.load(str(path))
    n_attn = sum(isinstance(m, QuantAttentionBase) for m in q.modules())
    ops = [node.op_type for node in model.graph.node]
    assert n_attn == 6 and ops.count("Softmax") == ops.count("Less") == n_attn
    assert ops.count("QuantizeLinear") == len(dict(quant_layers(q))) + 5 * n_attn  # q, k, v, fine, coarse
    meta = {p.key: p.value for p in model.metadata_props}
    assert len(json.loads(meta["dfqkern.attention"])) == n_attn
    assert _check_attention(q, path, _vit_inputs(8, seed=3)) > 1e-4  # both softmax ranges are exercised

    dev = _logit_deviation(q, path, _vit_inputs(256, seed=2), fp)
    exact = dev["ort"] <= EXACT_RTOL
    assert dev["fp"].min() > 50 * EXACT_RTOL  # the quantization moves every image far beyond "exact"
    assert exact.mean() >= 0.3, f"only {exact.mean():.0%} of the images match to float precision"
    assert dev["ort"].max() <= VIT_LOGIT_RTOL
    assert dev["ort"].mean() <= 0.5 * dev["fp"].mean(), (dev["ort"].mean(), dev["fp"].mean())
    assert dev["ort_agree"] >= 0.98
    assert (dev["margin"][~dev["same_top1"]] < 0.02).all()  # only near ties change (median margin: ~12 %)


def test_quantized_swin_window_attention_matches_packed(tmp_path):
    """timm Swin window attention (relative position bias, shifted-window mask: an Add before the softmax):
    the same per-module and end-to-end checks on a tiny random Swin (measured on 64 images: 95 % match to float
    precision, max 0.33 % of the range vs 2.3 % for the float model, top-1 agreement 100 %)."""
    pytest.importorskip("timm", reason="Swin needs timm")
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    fp = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                         num_classes=10).eval()
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=8, act_bits=8, weight_observer="minmax",
                                                        act_observer="minmax"))
    dfqkern.calibrate_activations(q, _vit_inputs(16, seed=1), progress=False)
    dfqkern.pack_model(q)
    assert sum(type(m).__name__ == "QuantWindowAttention" for m in q.modules()) == 4
    path = export_onnx(q, tmp_path / "swin.onnx", input_shape=(2, *VIT_SHAPE))
    assert _check_attention(q, path, _vit_inputs(4, seed=3)) > 1e-4
    dev = _logit_deviation(q, path, _vit_inputs(64, seed=2), fp)
    assert dev["fp"].min() > 10 * EXACT_RTOL
    assert (dev["ort"] <= EXACT_RTOL).mean() >= 0.3 and dev["ort"].max() <= VIT_LOGIT_RTOL
    assert dev["ort"].mean() <= 0.5 * dev["fp"].mean() and dev["ort_agree"] >= 0.98


def test_quantized_attention_check_catches_a_wrong_softmax_scale(tmp_path):
    """The checks above can fail: an export whose softmax grid is off by one shift (fine step halved, the
    boundary with it) fails the per-module check, matches no image end to end, and its mean deviation is above
    the tolerance (measured: 3.0 % of the range, the correct export 0.76 %, the float model 3.4 %)."""
    fp, q = _packed_vit("cifar10_vit_mha")
    wrong = copy.deepcopy(q)
    for m in wrong.modules():
        if type(m).__name__ == "SoftmaxQuantizer":
            with torch.no_grad():
                m.shift += 1
                m.scale /= 2
    path = export_onnx(wrong, tmp_path / "wrong.onnx")
    with pytest.raises(AssertionError, match="softmax codes"):
        _check_attention(q, path, _vit_inputs(8, seed=3))
    dev = _logit_deviation(q, path, _vit_inputs(64, seed=2), fp)
    assert (dev["ort"] > EXACT_RTOL).all()
    assert dev["ort"].mean() > 0.5 * dev["fp"].mean()


def test_quantized_attention_tensorrt_target_is_symmetric(tmp_path):
    """A symmetric W8A8 ViT exports for TensorRT (opset 17): every Q/DQ zero point 0, attention included."""
    _, q = _packed_vit("cifar10_vit_qkv", act_symmetric=True, weight_symmetric=True)
    path = export_onnx(q, tmp_path / "trt.onnx", target="tensorrt")
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 0 and all((inits[n.input[2]] == 0).all() for n in qdq)
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 17
    _check_attention(q, path, _vit_inputs(4, seed=3))


def test_quantized_attention_refusals(tmp_path):
    """What ONNX QDQ cannot carry for attention is refused naming the module and its scheme."""
    _, q = _packed_vit("cifar10_vit_qkv", act_bits=4)  # first / last layer stay A8: the blocks are A4
    with pytest.raises(OnnxExportError, match=r"attention module 'blocks\.0\.attn' \(QuantTimmAttention, a4 matmuls\) "
                                              r"has q operand \(at the activation bits of 'blocks\.0\.attn\.qkv'\) "
                                              r"with 4-bit activations.*export \.pt2"):
        export_onnx(q, tmp_path / "a4.onnx")
    _, q = _packed_vit("cifar10_vit_mha", attn_granularity="per_head")
    with pytest.raises(OnnxExportError, match=r"attention module 'blocks\.layers\.0\.self_attn' "
                                              r"\(QuantMultiheadAttention, a8 matmuls\) has per-head scales on its q "
                                              r"operand.*attn_granularity='per_tensor'"):
        export_onnx(q, tmp_path / "ph.onnx")
    _, q = _packed_vit("cifar10_vit_mha", act_granularity="per_token")
    assert re.search(r"q operand \(at the activation bits of 'blocks\.layers\.0\.self_attn\.q_proj'\) with "
                     r"per-token", onnx_export_problems(q)["blocks.layers.0.self_attn"])
    from dfqkern.models import create_model

    torch.manual_seed(0)
    q = dfqkern.quantize_model(create_model("cifar10_vit_qkv").eval(),
                               dfqkern.QuantConfig(weight_observer="minmax", act_observer="minmax"))
    dfqkern.calibrate_activations(q, _vit_inputs(4, seed=1), progress=False)
    assert "is not packed" in onnx_export_problems(q)["blocks.0.attn"]
    assert list(tmp_path.iterdir()) == []


def test_softmax_range_boundary_is_bit_exact():
    """The exported ``Less(p, boundary)`` picks the coarse range exactly where dfqkern's grid does, for every
    shift, on the float32 values around the boundary."""
    from dfqkern.export.onnx import _first_coarse_probability
    from dfqkern.nn.attention import SoftmaxQuantizer

    for shift in range(1, 9):
        sq = SoftmaxQuantizer(8)
        with torch.no_grad():
            sq.shift.fill_(shift)
            sq.scale.fill_(1.0 / (sq.levels * (1 << shift)))
        t = _first_coarse_probability(sq)
        p = (t.reshape(1).view(torch.int32) + torch.arange(-200, 201, dtype=torch.int32)).view(torch.float32)
        assert (p.diff() > 0).all() and p[200] == t  # positive floats: one int32 step is one ulp
        c_fine, _ = sq.codes(p)  # near the boundary: 127 on the fine range, 0 off it (the coarse code may be 0 too)
        assert torch.equal(c_fine == 0, p >= t), shift
        assert c_fine[:200].min() == sq.levels


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
