"""Bias correction of a quantized model (Nagel et al. 2019, section 4.2): remove the expected output
shift that quantization adds to every layer, by moving its bias.

Run after :func:`~dfqkern.quantize.quantize_model` and :func:`~dfqkern.quantize.calibrate_activations`,
instead of reconstruction (which would learn the rounding afresh).

- ``analytic``: the shift of a layer is ``(W_q - W) E[x]``, with ``E[x]`` from the BatchNorm that
  feeds the layer in the float model (through ReLU / ReLU6 / identity): a BatchNorm output is taken
  as ``N(beta, gamma^2)`` per channel, so ``E[x]`` is the mean of that Gaussian clipped by the
  activation. The expected input is convolved at its real spatial size, so zero padding is counted.
  Only weight error is corrected; layers whose input does not come from a BatchNorm are skipped.
  No data (one example input fixes the spatial sizes).
- ``empirical``: on calibration images, for each quantized layer in call order, ``E[y_q] - E[y]``
  where ``y_q`` is the layer's output in the quantized model (layers before it already corrected)
  and ``y`` its output with quantization off (the float model with BatchNorm folded). Corrects the
  weight error, the input's quantization error and what reaches the layer from the layers before it.
  After it, every corrected layer's mean output error on those images is zero.

A layer without a bias is skipped (a new bias tensor would not fit the architecture a packed
checkpoint is rebuilt from).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ActQuantizer, QuantConv2d, QuantLayer, QuantLinear
from ..nn.observe import batches_of
from .capture import quantization_disabled, run_with_output_hooks

BIAS_CORRECTION_MODES = ("none", "analytic", "empirical")


@dataclass
class BiasCorrectionReport:
    """``corrected``: ``{layer: max |bias shift|}``; ``skipped``: ``{layer: reason}``."""

    mode: str
    corrected: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "corrected": len(self.corrected), "skipped": dict(self.skipped),
                "max_shift": max(self.corrected.values(), default=0.0)}


def correct_bias(qmodel: nn.Module, mode: str, *, float_model: nn.Module | None = None, data=None,
                 batch_size: int = 32, device=None) -> BiasCorrectionReport:
    """Correct the biases of ``qmodel``'s quantized layers in place; returns the report (also set as
    ``qmodel.dfqkern_bias_correction_report``).

    ``analytic`` needs ``float_model`` (the model ``quantize_model`` was given: its BatchNorms) and
    ``data`` (at least one input, for the spatial sizes); ``empirical`` needs ``data`` (calibration
    inputs, a tensor or batches)."""
    if mode not in BIAS_CORRECTION_MODES:
        raise ValueError(f"mode must be one of {BIAS_CORRECTION_MODES}, got {mode!r}")
    report = BiasCorrectionReport(mode)
    if mode == "none":
        return report
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("qmodel has no quantized layers; run quantize_model first")
    if data is None:
        raise ValueError(f"bias correction {mode!r} needs data (calibration inputs"
                         f"{'' if mode == 'empirical' else '; one input fixes the spatial sizes'})")
    uncalibrated = [n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and not bool(m.calibrated)]
    if uncalibrated:
        raise ValueError(f"activation quantizer {uncalibrated[0]!r} is not calibrated; run calibrate_activations "
                         f"first")
    if any(m.is_packed for _, m in layers):
        raise ValueError("qmodel is packed; correct the biases before pack_model")
    batches = batches_of(data, batch_size)
    device = device or next(qmodel.parameters()).device
    was_training = qmodel.training
    qmodel.eval()
    try:
        if mode == "analytic":
            if float_model is None:
                raise ValueError("bias correction 'analytic' needs float_model (the model before quantize_model)")
            _analytic(qmodel, float_model, layers, batches[0][:1].to(device), report)
        else:
            _empirical(qmodel, layers, batches, device, report)
    finally:
        qmodel.train(was_training)
    qmodel.dfqkern_bias_correction_report = report
    return report


# ----------------------------------------------------------------------------- analytic

def clipped_gaussian_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``E[clip(Y, lo, hi)]`` for ``Y ~ N(mu, sigma^2)`` per element (``lo`` / ``hi`` may be infinite)."""
    mu, sigma = mu.double(), sigma.double().abs()
    if lo == -math.inf and hi == math.inf:
        return mu
    s = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    a, b = (lo - mu) / s, (hi - mu) / s
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    pdf_a = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    pdf_b = torch.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    inner = mu * (cdf_b - cdf_a) - s * (pdf_b - pdf_a)  # E[Y; lo < Y < hi]
    out = inner + (lo * cdf_a if lo != -math.inf else 0) + (hi * (1 - cdf_b) if hi != math.inf else 0)
    return torch.where(sigma > 0, out, mu.clamp(lo, hi))


def input_moments(float_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{layer: E[input] per channel}`` from the BatchNorm feeding each Conv2d / Linear of the float
    model, and ``{layer: why not}`` for the others."""
    import torch.fx

    from ..equalize import describe, module_calls, node_kind, trace

    graph, why = trace(float_model)
    if graph is None:
        return {}, {"<model>": why}
    mods = dict(float_model.named_modules())
    calls = module_calls(graph)
    means, skipped = {}, {}
    for node in graph.nodes:
        if node_kind(node, mods)[0] != "layer":
            continue
        name, lo, hi, cur, pooled, act_seen = node.target, -math.inf, math.inf, node.args[0], False, False
        reason = None
        if calls[name] != 1:
            reason = "module called more than once"
        while reason is None:  # walk back from the layer to the BatchNorm that feeds it
            if not isinstance(cur, torch.fx.Node):
                reason = "input is not a graph value"
                break
            kind, bounds = node_kind(cur, mods)
            if kind == "bn":
                break
            if kind == "act" and bounds == (-math.inf, math.inf):
                pass  # identity / eval-mode dropout
            elif kind == "act" and not act_seen:
                (lo, hi), act_seen = bounds, True
            elif kind in ("avgpool", "flatten") and not act_seen:
                pooled = True  # the mean passes through averaging and flattening (not an activation of a pool)
            else:
                reason = f"input comes from {describe(cur, mods)}, not from a BatchNorm (through an activation)"
                break
            cur = cur.args[0] if cur.args else None
        if reason is None and calls.get(cur.target, 0) != 1:
            reason = f"BatchNorm {cur.target} is called more than once"
        if reason is not None:
            skipped[name] = reason
            continue
        bn = mods[cur.target]
        gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
        beta = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
        if pooled and isinstance(mods[name], nn.Linear) and mods[name].in_features != bn.num_features:
            skipped[name] = f"input is {bn.num_features} pooled channels flattened to {mods[name].in_features} features"
            continue
        means[name] = clipped_gaussian_mean(beta, gamma, lo, hi).float()
    return means, skipped


def _input_shapes(qmodel: nn.Module, layers, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes, handles = {}, []
    for name, m in layers:
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: shapes.__setitem__(
            name, tuple(args[0].shape))))
    try:
        with torch.no_grad(), quantization_disabled(qmodel):
            qmodel(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


@torch.no_grad()
def expected_shift(layer: QuantLayer, mean: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``E[(W_q - W) x]`` per output channel, averaged over output positions (zero padding counted)."""
    eps = layer.quant_weight() - layer.weight
    mean = mean.to(eps)
    if isinstance(layer, QuantLinear):
        return eps @ mean
    x = mean.reshape(1, -1, 1, 1).expand(1, mean.numel(), *shape[-2:])
    out = F.conv2d(x, eps, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return out.mean((0, 2, 3))


def _analytic(qmodel, float_model, layers, example, report) -> None:
    means, skipped = input_moments(float_model)
    shapes = _input_shapes(qmodel, layers, example)
    report.skipped.update({n: r for n, r in skipped.items() if n in dict(layers) or n == "<model>"})
    for name, layer in layers:
        if name not in means:
            report.skipped.setdefault(name, "no BatchNorm statistics for its input")
            continue
        if layer.bias is None:
            report.skipped[name] = "has no bias"
            continue
        if isinstance(layer, QuantConv2d) and len(shapes.get(name, ())) != 4:
            report.skipped[name] = "input is not a 4-d image batch"
            continue
        shift = expected_shift(layer, means[name], shapes.get(name, ()))
        layer.bias.data.sub_(shift.to(layer.bias))
        report.corrected[name] = float(shift.abs().max())


# ----------------------------------------------------------------------------- empirical

class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _channel_sum(y: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the channel one (dim 1 of images, the last of tokens)."""
    y = y.detach().double()
    return y.sum((0, 2, 3)) if y.dim() == 4 else y.reshape(-1, y.shape[-1]).sum(0)


def _count(y: torch.Tensor) -> int:
    return y.numel() // (y.shape[1] if y.dim() == 4 else y.shape[-1])


@torch.no_grad()
def _float_means(qmodel, layers, batches, device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Mean output per channel of every layer with quantization off, and the layers' call order."""
    sums, counts, calls, order = {}, {}, {}, []

    def hook(mod, args, out, name):
        if name not in sums:
            order.append(name)
            sums[name], counts[name], calls[name] = 0, 0, 0
        sums[name] = sums[name] + _channel_sum(out)
        counts[name] += _count(out)
        calls[name] += 1

    run_with_output_hooks(qmodel, {m: lambda mod, o, name=name: hook(mod, None, o, name) for name, m in layers},
                          batches, device, float_model=True)
    once = [n for n in order if calls[n] == len(batches)]  # a shared layer has no single output to correct
    return {n: sums[n] / counts[n] for n in once}, order


@torch.no_grad()
def _quant_mean(qmodel, layer, batches, device) -> torch.Tensor:
    """Mean output per channel of ``layer`` in the quantized model (the pass stops after it)."""
    acc = {"sum": 0, "n": 0}

    def hook(mod, args, out):
        acc["sum"] = acc["sum"] + _channel_sum(out)
        acc["n"] += _count(out)
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                qmodel(x.to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    return acc["sum"] / acc["n"]


def _empirical(qmodel, layers, batches, device, report) -> None:
    ref, order = _float_means(qmodel, layers, batches, device)
    by_name = dict(layers)
    for name, _ in layers:
        if name not in order:
            report.skipped[name] = "not called on the calibration inputs"
    for name in order:
        layer = by_name[name]
        if name not in ref:
            report.skipped[name] = "called more than once per forward"
            continue
        if layer.bias is None:
            report.skipped[name] = "has no bias"
            continue
        shift = _quant_mean(qmodel, layer, batches, device) - ref[name]
        layer.bias.data.sub_(shift.to(layer.bias))
        report.corrected[name] = float(shift.abs().max())
