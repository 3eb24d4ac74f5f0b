"""Packed models as standard ONNX QuantizeLinear / DequantizeLinear (QDQ) graphs.

What the exported graph holds, per packed layer (BatchNorm is already folded into it):

* **Activations** (the layer's input): ``QuantizeLinear -> DequantizeLinear`` with the layer's
  per-tensor scale, into **int8**. dfqkern's code ``c`` in ``[0, 255]`` with zero point ``z`` becomes
  the int8 value ``c - 128`` with zero point ``z - 128``: the same grid, the same clamping
  (``clamp(round_half_even(x / s) + z, 0, 255)``), the same dequantized values. int8, not uint8,
  because TensorRT's Q/DQ layers take int8 only (and symmetric, zero point 0), while onnxruntime
  takes both; a symmetric activation config (``act_symmetric=True``, ``z = 128``) exports with
  zero point 0.
* **Weights**: ``DequantizeLinear`` per output channel (``axis=0`` for Conv ``[O, C/g, kh, kw]``,
  ``axis=1`` for a Linear's weight stored ``[K, N]`` to feed ``MatMul`` directly), from codes
  shifted the same way, ``c - 2**(b-1)`` with zero point ``z - 2**(b-1)`` (a symmetric weight config
  gives zero point 0). 8-bit weights are int8. 4-, 3- and 2-bit weights are **INT4** initializers
  (opset 21, two values per byte: the nearest standard type, since ONNX has no 2- or 3-bit type
  that onnxruntime reads: W2 codes lie in ``[-2, 1]``, W3 codes in ``[-4, 3]`` of the int4 range)
  when ``opset >= 21``; with ``opset <= 20`` they are widened into int8 initializers (identical
  values, no compression).
* **Encoding per target**: the graph is built in int8 as above; for ``target="onnxruntime"`` every
  int8 Q/DQ tensor is then re-encoded as uint8 (``+ 128``: dfqkern's own codes and zero points, the
  same grid), because onnxruntime's int8 kernels on x86 CPUs without VNNI (AVX2-only machines)
  saturate int16 pair sums in ``VPMADDUBSW`` and drift far from the packed model, while its uint8
  kernels do not (:func:`_to_uint8` has the numbers). INT4 weights stay INT4. ``"tensorrt"`` keeps int8.
* The layer itself is a float ``Conv`` / ``MatMul`` (+ ``Add`` for the bias) on the dequantized
  tensors: the QDQ form runtimes fuse into integer kernels. Everything that is not a quantized
  layer (ReLU, pooling, residual adds, flatten, LayerNorm, GELU, ...) is exported as it is, by
  torch's TorchScript-based ONNX exporter (``torch.onnx.export(dynamo=False)``, which needs no
  onnxscript), which traces the model with the packed layers swapped for modules that emit these
  nodes. Standalone activation quantizers become Q/DQ pairs the same way.
* **Quantized attention** (the swapped modules of :mod:`dfqkern.nn.attention`: timm ``Attention``,
  Swin ``WindowAttention``, ``nn.MultiheadAttention``, also inside ``nn.TransformerEncoderLayer``):
  the module's own steps (projections, reshapes, masks, ``q`` scaled by ``1/sqrt(d)``) are traced as
  they are; its two matmuls become ``Q/DQ(q) -> MatMul <- Q/DQ(k^T)`` (int8 per tensor, codes
  shifted as above), ``+ bias``, ``Softmax``, then the two-range softmax grid as
  two int8 branches with zero point 0 (codes ``0 ... 127`` need no shift): ``Less(p, boundary)``
  picks the range, ``Where(fine, p, 0)`` is quantized with the fine step and ``Where(fine, 0, p)``
  with the coarse step, each feeds its own ``MatMul`` with ``Q/DQ(v)`` and the two are added: the
  packed path's two integer matmuls. The boundary is the first float32 probability dfqkern's grid
  puts on the coarse range (its test ``round(p * (1 / fine)) <= 127`` is monotone in ``p``), so the
  range choice is bit-exact; each branch's QuantizeLinear saturates at 127, dfqkern's clamp. An
  element's code in the other range is 0 in both. onnxruntime fuses each Q/DQ ``MatMul`` into an
  integer ``MatMulIntegerToFloat``.

Numerics: the graph computes the packed model's function; a runtime's arithmetic differs in three
places. (1) It accumulates in float (or fuses into its own integer kernels with a float
requantization) where dfqkern's packed kernels accumulate exactly in int32 and apply
``acc * (s_a * s_w) + bias``; (2) ONNX QuantizeLinear divides by the scale where dfqkern multiplies
by ``1 / scale``; (3) its float ops (LayerNorm, GELU, Softmax, ...) round differently from torch's
(about 1e-6 relative). All are float32 rounding errors, which move a value lying on a rounding
boundary of the next layer's activation grid by one code (a few elements per image). Logits therefore agree
to a small fraction of their range and only near-tie images can change their top-1 (tested: CIFAR-10
ResNet-20 W8A8 / W4A8, top-1 within 0.1 point over the 5,000 dev images). A ViT feels one such code
more (it reaches every token through attention): in the tests about half of the images flip no code
and match to float precision, the others move by up to about 4 % of the logits' range, on average a
quarter of what the quantization itself moves them (random-init CIFAR ViTs, W8A8). Two onnxruntime (1.32)
defaults change the model more than that: its ``WeightBiasQuantization`` pass rounds each float Conv
/ Gemm bias to int32 at scale ``s_a * s_w`` (up to half an accumulator step per output), and the
``MatMulNBits`` kernel it fuses a 4-bit-weight ``DequantizeLinear -> MatMul`` into quantizes the
float activations of a weight-only Linear to int8 on the fly (its default accuracy level 4).
:func:`onnxruntime_session` opens a file with the first pass disabled and the second kernel at
accuracy level 1 (fp32 activations); every other fusion into integer kernels stays on. A plain
``onnxruntime.InferenceSession`` keeps both (in our CIFAR-10 test, without weight-only layers, top-1
still within 0.25 point). Non-finite inputs are not reproduced: dfqkern turns a row / pixel holding
NaN or Inf into NaN, ONNX QuantizeLinear saturates.

Refused, with an error naming the layer and its scheme, never exported as a different model:

* 4-bit activations (``a4``): TensorRT's INT4 is weight-only and onnxruntime disables its QDQ
  fusions for 4-bit types, so an A4 QDQ graph would not run as an A4 model anywhere. Export such a
  model as ``.pt2`` (:mod:`dfqkern.export.pt2`), or keep those layers at 8-bit activations
  (``LayerRule(..., act_bits=8)``). Attention-matmul operands take the activation bits of their
  module's input projection: A4 operands are refused the same way.
* Per-token (dynamic) activation scales, and so attention operands with per-token ``q`` / ``k`` and
  per-channel ``v`` (``act_granularity="per_token"``): QuantizeLinear's scale is a build-time constant.
* Per-head attention operand scales (``attn_granularity="per_head"``): a per-axis QDQ graph is valid
  ONNX, but onnxruntime 1.32 fuses its DequantizeLinear into a ``MatMulIntegerToFloat`` that rejects
  the per-head zero point at run time, and TensorRT quantizes activations per tensor.
* Unpacked (fake-quant) layers and attention modules: call :func:`dfqkern.pack_model` first.
* Any other module that computes on quantized operands of its own (none ships today).
* ``target="tensorrt"`` additionally refuses any non-zero zero point (TensorRT quantization is
  symmetric): quantize with ``weight_symmetric=True, act_symmetric=True``. For that target every
  weight is an int8 initializer (TensorRT's INT4 is for weight-only layers, and these layers
  quantize their activations too) and the default opset is 17.

Requires the optional packages ``onnx`` (and ``onnxruntime`` to run the file): ``pip install
dfqkern[export]``.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..formats import matrix_to_conv_weight, symmetric_zero_point
from ..model_info import model_info, unwrap
from ..nn import ActQuantizer, QuantConv2d, QuantLayer
from ..nn.attention import HeadActQuantizer, QuantAttentionBase, SoftmaxQuantizer
from .paths import check_out_file

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "TARGETS", "OnnxExportError", "export_onnx",
           "onnx_export_problems", "onnxruntime_session", "require_onnx"]

MIN_OPSET = 13  # per-axis DequantizeLinear
MAX_OPSET = 21  # INT4 DequantizeLinear; torch's TorchScript exporter writes at most opset 20 (we lift 20 -> 21)
DEFAULT_OPSET = {"onnxruntime": 21, "tensorrt": 17}
TARGETS = tuple(DEFAULT_OPSET)
INT4_OPSET = 21
_EXPORTER_MAX_OPSET = 20
INSTALL_HINT = "pip install dfqkern[export]"
_WEIGHT_SUFFIX = "weight_q"  # buffer name the INT4 pass looks for (initializer names follow buffer names)


class OnnxExportError(ValueError):
    """A model (or one of its layers) that ONNX QDQ cannot represent exactly; the message names the layer."""


def require_onnx():
    """The ``onnx`` module, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"ONNX export needs the 'onnx' package: {INSTALL_HINT}") from e
    return onnx


# ----------------------------------------------------------------------------- export-time modules

class _QuantDequant(torch.autograd.Function):
    """``DequantizeLinear(QuantizeLinear(x))`` per tensor, int8: traced as those two nodes."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        # no x.float(): on a float input it returns x itself, and the tracer would route x's other uses
        # (a residual branch) through the Cast it records
        zp = zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + zp, -128, 127) - zp) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _Dequant(torch.autograd.Function):
    """``DequantizeLinear(q, scale, zero_point, axis)`` per channel: traced as that node."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int):
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def _act_qparams(quantizer: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """dfqkern's per-tensor scale / unsigned zero point as ONNX int8 QDQ parameters (0-d tensors)."""
    scale = quantizer.scale.detach().float().reshape(()).clone()
    zp = int(quantizer.zero_point.reshape(())) - symmetric_zero_point(8)
    return scale, torch.tensor(zp, dtype=torch.int8)


class _OnnxActQuant(nn.Module):
    """A per-tensor 8-bit activation quantizer as a Q/DQ pair."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        scale, zp = _act_qparams(quantizer)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)

    def forward(self, x):
        return _QuantDequant.apply(x, self.scale, self.zero_point)


class _OnnxQuantLayer(nn.Module):
    """A packed QuantConv2d / QuantLinear as Q/DQ(input) -> DQ(weight) -> Conv / MatMul (+ bias)."""

    def __init__(self, layer: QuantLayer, name: str):
        super().__init__()
        self.layer_name = name
        self.weight_bits = layer.lq.weight_bits
        pw = layer.packed()
        offset = symmetric_zero_point(self.weight_bits)
        codes = pw.codes().to(torch.int16) - offset  # [N, K] in the packed K order
        if isinstance(layer, QuantConv2d):
            weight, axis = matrix_to_conv_weight(codes, pw.shape), 0
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        else:
            weight, axis = codes.t(), 1  # [K, N]: MatMul's B, dequantized per column
            self.conv = None
        self.axis = axis
        self.register_buffer(_WEIGHT_SUFFIX, weight.contiguous().to(torch.int8))
        self.register_buffer("weight_scale", pw.scale.detach().float().clone())
        self.register_buffer("weight_zero_point", (pw.zero_point.to(torch.int16) - offset).to(torch.int8))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        if layer.a_quant is not None:
            scale, zp = _act_qparams(layer.a_quant)
            self.register_buffer("input_scale", scale)
            self.register_buffer("input_zero_point", zp)
        else:
            self.input_scale = None

    def forward(self, x):
        if self.input_scale is not None:
            x = _QuantDequant.apply(x, self.input_scale, self.input_zero_point)
        w = _Dequant.apply(getattr(self, _WEIGHT_SUFFIX), self.weight_scale, self.weight_zero_point, self.axis)
        if self.conv is not None:
            return F.conv2d(x, w, self.bias, **self.conv)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


def _first_coarse_probability(quant: SoftmaxQuantizer) -> torch.Tensor:
    """The smallest float32 ``p`` that dfqkern's two-range softmax grid puts on the coarse range.

    dfqkern picks the fine range where ``round_half_even(p * (1 / fine)) <= levels`` (float32 product);
    that product rounds monotonically in ``p``, so the fine range is exactly ``p < this``: one ``Less``
    reproduces the choice bit for bit, with no division whose rounding could differ from the product.
    """
    fine, _ = quant.steps()
    inv = 1.0 / fine  # float32, as in SoftmaxQuantizer.codes

    def coarse(p):
        return bool(torch.round(p * inv) > quant.levels)

    p = torch.tensor((quant.levels + 0.5) / float(inv), dtype=torch.float32)  # within an ulp or two
    down, up = torch.tensor(-math.inf), torch.tensor(math.inf)
    while coarse(p):
        p = torch.nextafter(p, down)
    while not coarse(p):
        p = torch.nextafter(p, up)
    return p


class _OnnxAttention(nn.Module):
    """The two matmuls of a packed quantized attention module (:mod:`dfqkern.nn.attention`) as QDQ.

    ``q``, ``k``, ``v``: Q/DQ per tensor, as their quantizers; ``scores = q @ k^T (+ bias)``, softmax.
    The two-range softmax grid becomes two int8 Q/DQ branches with
    zero point 0 (codes ``0 ... levels``, no shift needed), selected by ``Less`` on the range boundary: the
    fine branch quantizes ``Where(fine, p, 0)`` with the fine step, the coarse branch ``Where(fine, 0, p)``
    with the coarse step (the element's code in the other range is 0, as in dfqkern), each feeding its own
    ``MatMul`` with ``v``; the sum is ``attn @ v``, the two integer matmuls of the packed path."""

    def __init__(self, attn: QuantAttentionBase):
        super().__init__()
        self.q_quant, self.k_quant, self.v_quant = (_OnnxActQuant(attn.q_quant), _OnnxActQuant(attn.k_quant),
                                                    _OnnxActQuant(attn.v_quant))
        fine, coarse = attn.attn_quant.steps()
        self.register_buffer("fine_step", fine.clone())
        self.register_buffer("coarse_step", coarse.clone())
        self.register_buffer("softmax_zero_point", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("first_coarse", _first_coarse_probability(attn.attn_quant))

    def attend(self, q, k, v, bias=None, dropout_p: float = 0.0, need_probs: bool = False):
        """:meth:`QuantAttentionBase.attend` (inference): ``(out, dequantized probabilities or None)``."""
        # k^T is quantized (not k): elementwise, so the same codes; the DQ then feeds the MatMul directly (with
        # DQ -> Transpose -> MatMul, onnxruntime 1.32's QDQPropagationTransformer writes an invalid QuantizeLinear)
        q, k_t, v = self.q_quant(q), self.k_quant(k.transpose(-2, -1)), self.v_quant(v)
        scores = q @ k_t
        if bias is not None:
            scores = scores + bias
        p = scores.softmax(dim=-1)
        fine = p < self.first_coarse
        p_fine = _QuantDequant.apply(torch.where(fine, p, 0.0), self.fine_step, self.softmax_zero_point)
        p_coarse = _QuantDequant.apply(torch.where(fine, 0.0, p), self.coarse_step, self.softmax_zero_point)
        out = p_fine @ v + p_coarse @ v
        return out, (p_fine + p_coarse) if need_probs else None


def _install_onnx_attention(attn: QuantAttentionBase) -> None:
    """Make ``attn`` (a module of the export copy) compute its matmuls as :class:`_OnnxAttention`."""
    matmuls = _OnnxAttention(attn)
    attn.q_quant = attn.k_quant = attn.v_quant = attn.attn_quant = None
    attn.onnx_matmuls = matmuls
    # an instance attribute shadows QuantAttentionBase.attend for this (deep-copied) module only; its forward
    # (projections, reshapes, masks) is traced unchanged
    attn.attend = matmuls.attend


# ----------------------------------------------------------------------------- checks

def _scheme(layer: QuantLayer) -> str:
    lq = layer.lq
    return f"w{lq.weight_bits}" + ("" if lq.act_bits is None else f"a{lq.act_bits}")


def _act_problem(q: ActQuantizer, target: str) -> str | None:
    if q.per_token:
        return ("per-token (dynamic) activation scales: ONNX QuantizeLinear takes a build-time scale; quantize "
                "with act_granularity='per_tensor' to export ONNX, or export .pt2")
    if q.bits != 8:
        return (f"{q.bits}-bit activations: ONNX QDQ export carries int8 activations only (TensorRT's INT4 is "
                f"weight-only and onnxruntime does not fuse 4-bit QDQ, so an A{q.bits} graph would not run as an "
                f"A{q.bits} model); keep this layer at 8-bit activations (LayerRule(pattern=..., act_bits=8)) "
                f"or export .pt2")
    if not bool(q.calibrated):
        return "an uncalibrated activation quantizer (run calibration before packing)"
    if target == "tensorrt" and int(q.zero_point.reshape(())) != symmetric_zero_point(8):
        return ("an asymmetric activation zero point: TensorRT quantization is symmetric (zero point 0); "
                "quantize with act_symmetric=True for target='tensorrt'")
    return None


def _standalone_problem(q: ActQuantizer) -> str | None:
    """Why a quantizer outside the quantized layers cannot become a Q/DQ pair (None: it can)."""
    if type(q) is not ActQuantizer and type(q).__name__ != "FixedRangeActQuantizer":
        return f"a {type(q).__name__}, which has no ONNX QDQ form"
    if q.scale.numel() != 1 and not q.per_token:
        return "per-channel / per-head scales (ONNX export carries per-tensor activation quantizers)"
    return None


def _attention_problem(attn: QuantAttentionBase, name: str, target: str) -> str | None:
    """Why the quantized attention module ``name``'s matmuls cannot become QDQ (None: they can, or run in float)."""
    if attn.bits is None:
        return None
    if not attn.is_packed:
        return "is not packed (fake-quant mode): export a packed model (dfqkern.pack_model or dfqkern.load_quantized)"
    for operand, q in (("q", attn.q_quant), ("k", attn.k_quant), ("v", attn.v_quant)):
        if isinstance(q, HeadActQuantizer):
            return (f"per-head scales on its {operand} operand (attn_granularity='per_head'): onnxruntime (1.32) "
                    f"fuses a per-head DequantizeLinear into an integer MatMul that then fails to run, and TensorRT "
                    f"quantizes activations per tensor; quantize with attn_granularity='per_tensor', or export .pt2")
        if type(q) is not ActQuantizer:
            return f"a {type(q).__name__} on its {operand} operand, which has no ONNX QDQ form"
        if why := _act_problem(q, target):
            proj = next((f"{name}.{n}" for n, c in attn.named_children() if c is attn.input_projection()), name)
            return f"{operand} operand (at the activation bits of {proj!r}) with {why}"
    if type(attn.attn_quant) is not SoftmaxQuantizer or attn.attn_quant.levels > 127:
        return (f"a {type(attn.attn_quant).__name__} ({attn.attn_quant.bits}-bit) on the softmax output, which has "
                f"no int8 QDQ form here")
    return None


def onnx_export_problems(model: nn.Module, target: str = "onnxruntime") -> dict[str, str]:
    """``{module name: why it cannot be exported}`` for ``target`` (empty when the model exports)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    problems: dict[str, str] = {}
    covered: set[int] = set()  # quantizers accounted for (inside a quantized layer or a refused module)
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            covered.update(id(c) for c in m.modules())
            where = f"layer {name!r} ({_scheme(m)})"
            if not m.is_packed:
                problems[name] = (f"{where} is not packed (fake-quant mode): export a packed model "
                                  f"(dfqkern.pack_model or dfqkern.load_quantized)")
            elif m.a_quant is not None and (why := _act_problem(m.a_quant, target)):
                problems[name] = f"{where} has {why}"
            elif target == "tensorrt" and bool((m.w_zero != symmetric_zero_point(m.lq.weight_bits)).any()):
                problems[name] = (f"{where} has asymmetric weight zero points: TensorRT quantization is symmetric "
                                  f"(zero point 0); quantize with weight_symmetric=True for target='tensorrt'")
        elif isinstance(m, QuantAttentionBase):
            covered.update(id(q) for q in (m.q_quant, m.k_quant, m.v_quant, m.attn_quant) if q is not None)
            if why := _attention_problem(m, name, target):
                problems[name] = f"attention module {name!r} ({type(m).__name__}, a{m.bits} matmuls) has {why}"
        elif not isinstance(m, ActQuantizer) and hasattr(m, "is_packed") and (
                m.is_packed is True or any(isinstance(c, ActQuantizer) for c in m.children())):
            # another module computing on quantized operands itself: no QDQ form is known for it
            covered.update(id(c) for c in m.modules())
            problems[name] = (f"module {name!r} ({type(m).__name__}) computes on quantized operands of its own, "
                              f"which the ONNX QDQ export has no form for; export .pt2 (dfqkern export --format pt2)")
    for name, q in model.named_modules():
        if isinstance(q, ActQuantizer) and id(q) not in covered and q.mode != "off":
            where = f"activation quantizer {name!r} (a{q.bits})"
            if q.mode != "quant":
                problems[name] = f"{where} is in {q.mode!r} mode, not 'quant'"
            elif why := (_standalone_problem(q) or _act_problem(q, target)):
                problems[name] = f"{where} has {why}"
    return problems


def _check_model(model: nn.Module, target: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or a packed checkpoint path), got {type(model).__name__}")
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        raise OnnxExportError("export_onnx needs a packed dfqkern model (dfqkern.pack_model or "
                              "dfqkern.load_quantized); this model has no dfqkern quantized layers")
    problems = onnx_export_problems(model, target)
    if problems:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more: {', '.join(list(problems)[1:6])})" if len(problems) > 1 else ""
        raise OnnxExportError(f"cannot export to ONNX (target {target}): {first}{more}")




def _example_inputs(model: nn.Module, example_inputs, input_shape) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not (isinstance(example_inputs, (tuple, list)) and example_inputs
                and all(isinstance(t, torch.Tensor) for t in example_inputs)):
            raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
                            f"{type(example_inputs).__name__}")
        return tuple(t.detach().float().cpu() for t in example_inputs)
    if input_shape is None:
        spec = model_info(model).input_spec
        if spec is None:
            raise ValueError("no example input: pass example_inputs or input_shape (the model records no input spec)")
        input_shape = (2, *spec.input_size)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"input_shape must be positive ints with a leading batch dimension, got {tuple(input_shape)}")
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


# ----------------------------------------------------------------------------- graph passes

def _to_int4(graph, weight_names: set[str]) -> int:
    """Re-type the weight (and weight zero point) initializers of DequantizeLinear nodes whose weight is
    one of ``weight_names`` from int8 to INT4. Each such node gets its own INT4 initializers (the
    exporter may share identical initializers between nodes). Returns how many nodes were re-typed."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    made, used = 0, set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in weight_names:
            continue
        new_inputs = list(node.input)
        for i in (0, 2):
            arr = numpy_helper.to_array(inits[node.input[i]])
            if arr.dtype.name != "int8" or arr.size and (arr.min() < -8 or arr.max() > 7):
                raise RuntimeError(f"internal error: initializer {node.input[i]!r} does not hold int4 values")
            name = f"{node.input[i]}_int4_{made}"
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT4, arr.shape,
                                                        arr.astype("int32").ravel().tolist()))
            new_inputs[i] = name
        del node.input[:]
        node.input.extend(new_inputs)
        made += 1
    for node in graph.node:
        used.update(node.input)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return made


def _to_uint8(graph) -> int:
    """Re-encode every int8 Q/DQ tensor (activation zero points, 8-bit and widened weight initializers) as
    uint8 ``+ 128``: dfqkern's own codes and zero points, the same grid and the same saturation. For
    onnxruntime: on x86 CPUs without VNNI its int8 kernels feed u8 x s8 pairs to VPMADDUBSW, whose int16
    sums saturate (measured on an AVX2-only EPYC: a W8A8 CIFAR ViT's logits off by 8.7 % of their range
    on average, 0 % of images exact; as uint8, 0.35 % and 56 % exact, as on a VNNI Xeon), while its
    u8 x u8 kernels widen to int16 first. Returns the number of tensors changed."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    done: set[str] = set()

    def shift(name: str) -> bool:
        tensor = inits.get(name)
        if tensor is None and name in consts:
            tensor = next((a.t for a in consts[name].attribute if a.name == "value"), None)
        if tensor is None or tensor.data_type != TensorProto.INT8:
            return False
        if name not in done:
            arr = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((arr.astype(np.int16) + 128).astype(np.uint8), tensor.name))
            done.add(name)
        return True

    changed_outputs = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and shift(node.input[2]):
            changed_outputs.add(node.output[0])
        elif node.op_type == "DequantizeLinear":
            shift(node.input[0])
            if len(node.input) > 2:
                shift(node.input[2])
    # recorded int8 types of the re-typed QuantizeLinear outputs would contradict the new ones
    keep = [v for v in graph.value_info if v.name not in changed_outputs]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return len(done)


def _drop_initializer_identities(graph) -> None:
    """The exporter shares equal initializers (say, two layers' zero points) through ``Identity`` nodes;
    point their consumers at the initializer itself, so every Q/DQ reads its constants directly."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _count_ops(graph, op: str) -> int:
    return sum(node.op_type == op for node in graph.node)


# ----------------------------------------------------------------------------- export

def export_onnx(model, out_path, example_inputs=None, *, opset: int | None = None, target: str = "onnxruntime",
                input_shape=None, dynamic_batch: bool = True, overwrite: bool = False,
                trust_unverified: bool = False) -> Path:
    """Export a packed dfqkern model (or a packed checkpoint directory) as an ONNX QDQ graph at ``out_path``.

    ``example_inputs``: the forward's arguments used for tracing; default: random images of
    ``input_shape`` (batch first), else ``(2, *input_spec.input_size)`` of the model's recorded input spec.
    ``opset``: 13 ... 21 (default 21 for ``target='onnxruntime'``, 17 for ``'tensorrt'``); below 21
    4/3/2-bit weights are stored in int8 initializers. ``target``: ``'onnxruntime'`` or
    ``'tensorrt'`` (stricter: symmetric quantization only, int8 weights). ``dynamic_batch``: the first
    dimension of inputs and outputs is symbolic. The file is written beside ``out_path`` and renamed
    onto it. Raises :class:`OnnxExportError` naming the layer for a scheme ONNX QDQ cannot represent
    (see the module docstring). Returns the written path.
    """
    onnx = require_onnx()
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if opset is None:
        opset = DEFAULT_OPSET[target]
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    path = check_out_file(out_path, ".onnx", overwrite)
    if isinstance(model, (str, os.PathLike)):
        from ..io import load_quantized

        model = load_quantized(model, trust_unverified=trust_unverified)
    if isinstance(model, nn.Module):
        model = unwrap(model)  # torch.compile / DataParallel wrappers: export the module inside
    _check_model(model, target)
    inputs = _example_inputs(model, example_inputs, input_shape)

    export_model = copy.deepcopy(model).cpu().eval()
    from ..quantize import set_module

    int4_weights: set[str] = set()
    layers: dict[str, dict] = {}
    int4 = opset >= INT4_OPSET and target != "tensorrt"
    for name, layer in [(n, m) for n, m in export_model.named_modules() if isinstance(m, QuantLayer)]:
        set_module(export_model, name, _OnnxQuantLayer(layer, name))
        container = "int4" if int4 and layer.lq.weight_bits <= 4 else "int8"
        if container == "int4":
            int4_weights.add(f"{name}.{_WEIGHT_SUFFIX}")
        layers[name] = {"scheme": _scheme(layer), "weight_container": container,
                        "activations": "float" if layer.a_quant is None else "int8"}
    attention: dict[str, dict] = {}
    for name, attn in [(n, m) for n, m in export_model.named_modules()
                       if isinstance(m, QuantAttentionBase) and m.bits is not None]:
        attention[name] = {"operands": "int8 per tensor", "softmax": "two-range int8",
                           "softmax_shift": int(attn.attn_quant.shift)}
        _install_onnx_attention(attn)
    standalone = [(n, m) for n, m in export_model.named_modules()
                  if isinstance(m, ActQuantizer) and m.mode == "quant"]
    for name, q in standalone:
        set_module(export_model, name, _OnnxActQuant(q))
    for name, q in [(n, m) for n, m in export_model.named_modules() if isinstance(m, ActQuantizer)]:
        set_module(export_model, name, nn.Identity())  # mode 'off': passes its input through

    with torch.no_grad():
        outputs = export_model(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    if isinstance(outputs, (tuple, list)) and not all(isinstance(o, torch.Tensor) for o in outputs) \
            or not isinstance(outputs, (tuple, list, torch.Tensor)):
        raise TypeError(f"the model must return a tensor or a tuple of tensors, got {type(outputs).__name__}")
    input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)  # strided slices
            torch.onnx.export(export_model, inputs, buf, dynamo=False, opset_version=min(opset, _EXPORTER_MAX_OPSET),
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
    except TypeError as e:  # a torch whose export() lost the TorchScript path
        if "dynamo" in str(e):
            raise RuntimeError(f"this torch ({torch.__version__}) has no TorchScript-based ONNX exporter "
                               f"(torch.onnx.export(dynamo=False)), which dfqkern's ONNX export uses") from e
        raise
    proto = onnx.load_from_string(buf.getvalue())
    graph = proto.graph
    _drop_initializer_identities(graph)

    quant_layers = len(layers)
    if _count_ops(graph, "DequantizeLinear") < quant_layers:  # constant folding must leave the weight DQs
        raise RuntimeError("internal error: the exported graph lost DequantizeLinear nodes of quantized weights")
    if int4_weights and _to_int4(graph, int4_weights) != len(int4_weights):
        raise RuntimeError("internal error: not every 4/3/2-bit weight initializer was found in the exported graph")
    if opset > _EXPORTER_MAX_OPSET:
        # 20 -> 21 widens type lists (int4 / uint4) and adds QDQ's block_size (default: per-axis); the one op whose
        # meaning changes, GroupNormalization, is not written by the TorchScript exporter (checked)
        if _count_ops(graph, "GroupNormalization"):
            raise RuntimeError("the exported graph has GroupNormalization, whose meaning changes at opset 21; "
                               "export with opset=20 (4/3/2-bit weights then in int8 initializers)")
        for imp in proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    if target == "onnxruntime":
        _to_uint8(graph)
    proto.producer_name, proto.producer_version = "dfqkern", __version__
    info = model_info(model)
    cfg = info.config
    meta = {"dfqkern.version": __version__, "dfqkern.target": target,
            "dfqkern.arch": str(info.arch or ""),
            "dfqkern.scheme": cfg.scheme_name if cfg is not None else "",
            "dfqkern.activations": ("uint8 QDQ; dfqkern's codes and zero points" if target == "onnxruntime" else
                                    "int8 QDQ; zero point = dfqkern zero point - 128"),
            "dfqkern.weights": ("per-channel DequantizeLinear; 8-bit (and widened) weights uint8, dfqkern's codes; "
                                "INT4 value = dfqkern code - 2**(bits-1)" if target == "onnxruntime" else
                                "per-channel DequantizeLinear; value = dfqkern code - 2**(bits-1)"),
            "dfqkern.layers": json.dumps(layers, sort_keys=True)}
    if attention:
        meta["dfqkern.attention"] = json.dumps(attention, sort_keys=True)
    spec = info.input_spec
    if spec is not None:
        meta["dfqkern.input_spec"] = json.dumps(spec.to_dict(), sort_keys=True)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)

    data = proto.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an exported model is a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# onnxruntime's pass that rounds float Conv / Gemm biases to int32 (a change of the model, see the module docstring)
ORT_BIAS_ROUNDING = "WeightBiasQuantization"
# session option: MatMulNBits (fused 4-bit DequantizeLinear -> MatMul) computes with fp32 activations, not int8
ORT_MATMULNBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


def onnxruntime_session(path, *, threads: int | None = None, faithful: bool = True, providers=None):
    """An ``onnxruntime.InferenceSession`` for an exported file (or its bytes). ``faithful`` (default): without
    the two onnxruntime defaults that change the model (bias rounding, int8 activations in ``MatMulNBits``;
    see the module docstring), every other optimization on. ``threads``: intra-op threads (default:
    onnxruntime's). CPU unless ``providers`` says otherwise."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"running an exported ONNX file needs the 'onnxruntime' package: {INSTALL_HINT}") from e
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if faithful:
        opts.add_session_config_entry(*ORT_MATMULNBITS_ACCURACY)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=[ORT_BIAS_ROUNDING] if faithful else [])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
