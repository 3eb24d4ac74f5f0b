"""RepQ-ViT's post-LayerNorm reparameterization: per-channel activation ranges, deployed per tensor.

A LayerNorm's output has a few channels with ranges tens of times the others (its ``gamma`` /
``beta`` put them there), so one per-tensor scale spends most of its levels on them. Quantizing that
output per channel (scale ``s_c``, zero point ``z_c``) would fix it, but the integer GEMM that reads
it needs one scale. RepQ-ViT (Li et al., ICCV 2023) folds the difference into float parameters:
with ``s~ = mean(s)``, ``z~ = round(mean(z))``, ``r1 = s / s~``, ``r2 = z - z~``,

* the LayerNorm gets ``gamma / r1`` and ``(beta + s * r2) / r1``, so its channel ``c`` reads
  ``X~_c = (X_c + s_c r2_c) / r1_c``, and ``X~_c / s~ + z~ = X_c / s_c + z_c``: a per-tensor
  quantizer with ``(s~, z~)`` on ``X~`` is the per-channel one on ``X``;
* every Linear reading that output gets ``W * r1`` (input columns) and ``b - W (s * r2)``, so the
  float function is unchanged (any positive ``r1`` and any ``r2`` would keep it; these make the
  per-tensor grid the per-channel one).

The consumers are found by running the model (a quantized Linear whose input is the LayerNorm's
output or a view of it along the tokens), and each fold is checked on a probe batch: a LayerNorm
whose output has another reader (a post-norm residual, Swin's zero padding) changes the model's
float output, so it is put back and reported. Weight ranges of the changed Linears are re-observed;
activation ranges must be (re)observed afterwards, which :func:`dfqkern.quantize.calibrate_activations`
and :func:`dfqkern.calib.calibrate` do after calling :func:`apply_configured`.

Switch: ``QuantConfig.ln_reparam`` (CLI ``--vit-ln-reparam``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import reference as R
from ..model_info import model_info
from ..nn import QuantLinear
from ..nn.observers import mse_qparams
from .capture import quantization_disabled, run_with_output_hooks

log = logging.getLogger(__name__)

SAMPLE_ELEMENTS = 1 << 18  # per LayerNorm, the token rows the per-channel mse search sees (as RangeTracker's
# sample); min / max cover every token
PROBE_IMAGES = 4  # images the float-function check of each fold runs
R1_RANGE = (1e-3, 1e3)  # clamp of the per-channel scale ratio (a dead channel's range is ~0)
FLOAT_RTOL = 1e-4  # a fold keeps the float output to this, relative to its largest magnitude


@dataclass
class LNReparamReport:
    """What :func:`reparameterize_layernorms` did: LayerNorm name -> the Linear layers it was folded into,
    or -> why it was left alone; and the (smallest, largest) scale ratio per folded LayerNorm."""

    folded: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ratio_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"folded": {k: list(v) for k, v in self.folded.items()}, "skipped": dict(self.skipped),
                "ratio_range": {k: list(v) for k, v in self.ratio_range.items()}}


def _static_quantizer(layer: QuantLinear):
    """The layer's static per-tensor activation quantizer, or None (weight-only, per-token)."""
    a = layer.a_quant
    return None if a is None or a.per_token or a.scale.numel() != 1 else a


def _reads(out: torch.Tensor, inp: torch.Tensor) -> bool:
    """``inp`` is ``out`` or a view of it that keeps the channels as its last dimension (token slicing,
    a batch / sequence transpose)."""
    if inp is out:
        return True
    c = out.shape[-1]
    return (inp.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() and inp.shape[-1] == c
            and inp.stride(-1) == out.stride(-1) == 1 and out.is_contiguous()
            and (inp.storage_offset() - out.storage_offset()) % c == 0)


@torch.no_grad()
def find_consumers(model: nn.Module, x: torch.Tensor) -> dict[str, list[str]]:
    """``{LayerNorm name: [QuantLinear names reading its output]}`` from one float forward of ``x``."""
    lns = {m: n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    linears = {m: n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    outs: list[tuple[str, torch.Tensor]] = []  # kept alive, so no later tensor reuses their storage
    found: dict[str, list[str]] = {}

    def ln_hook(mod, args, out):
        outs.append((lns[mod], out))

    def lin_hook(mod, args):
        inp = args[0] if args else None
        if not isinstance(inp, torch.Tensor):
            return
        for ln_name, out in outs:
            if _reads(out, inp):
                names = found.setdefault(ln_name, [])
                if linears[mod] not in names:
                    names.append(linears[mod])

    handles = [m.register_forward_hook(ln_hook) for m in lns]
    handles += [m.register_forward_pre_hook(lin_hook) for m in linears]
    try:
        with quantization_disabled(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


class _ChannelStats:
    """Per-channel min / max over every token, plus a bounded random sample of token rows."""

    def __init__(self, seed: int):
        self.lo = self.hi = None
        self.rows: list[torch.Tensor] = []
        self.n = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, out: torch.Tensor) -> None:
        x = out.detach().float().reshape(-1, out.shape[-1]).cpu()
        lo, hi = x.min(dim=0).values, x.max(dim=0).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        max_rows = max(64, SAMPLE_ELEMENTS // x.shape[1])
        budget = max(1, max_rows // 4)  # each batch contributes at most a quarter of the sample
        if len(x) > budget:
            x = x[torch.randint(0, len(x), (budget,), generator=self.gen)]
        self.rows.append(x)
        self.n += len(x)
        while self.n > max_rows and len(self.rows) > 1:
            self.n -= len(self.rows.pop(0))

    def qparams(self, quant) -> tuple[torch.Tensor, torch.Tensor]:
        if quant.observer == "minmax":
            return R.qparams_from_range(self.lo, self.hi, quant.bits, quant.symmetric)
        return mse_qparams(torch.cat(self.rows), quant.bits, quant.symmetric, 1, self.lo, self.hi, quant.spec)


@torch.no_grad()
def _channel_qparams(model: nn.Module, lns: dict[str, object], batches, device, seed: int):
    """Per-channel (scale, zero point) of each named LayerNorm's output, at its quantizer's settings."""
    stats = {name: _ChannelStats(seed + i) for i, name in enumerate(lns)}
    run_with_output_hooks(model, {model.get_submodule(name): lambda m, out, s=s: s.update(out)
                                  for name, s in stats.items()}, batches, device, float_model=True)
    return {name: stats[name].qparams(quant) for name, quant in lns.items()}


def _fold(ln: nn.LayerNorm, layers: list[QuantLinear], scale: torch.Tensor, zp: torch.Tensor,
          use_zero_points: bool) -> tuple[float, float]:
    """Fold per-channel ``(scale, zp)`` into ``ln`` and ``layers`` (float64 arithmetic); returns r1's range."""
    s = scale.double()
    s_t = s.mean()
    r1 = (s / s_t).clamp(*R1_RANGE)
    shift = torch.zeros_like(s)  # s * r2: what is added to the LayerNorm output before dividing by r1
    if use_zero_points:
        z = zp.double()
        shift = s * (z - torch.round(z.mean()))
    dev = ln.weight.device
    r1_d, shift_d = r1.to(dev), shift.to(dev)
    ln.weight.copy_((ln.weight.double() / r1_d).to(ln.weight.dtype))
    ln.bias.copy_(((ln.bias.double() + shift_d) / r1_d).to(ln.bias.dtype))
    for layer in layers:
        w = layer.weight.double()
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.double() - w @ shift_d.to(w.device)).to(layer.bias.dtype))
        layer.weight.copy_((w * r1_d.to(w.device)).to(layer.weight.dtype))
        layer.observe_weight()
    return float(r1.min()), float(r1.max())


def _snapshot(ln: nn.LayerNorm, layers: list[QuantLinear]):
    tensors = [ln.weight, ln.bias]
    for layer in layers:
        tensors += [layer.weight, layer.w_quant.scale, layer.w_quant.zero_point]
        if layer.bias is not None:
            tensors.append(layer.bias)
    return [(t, t.detach().clone()) for t in tensors]


def _skip_reason(ln: nn.LayerNorm, layers: list[QuantLinear]) -> str | None:
    if ln.weight is None or ln.bias is None:
        return "LayerNorm without an affine weight and bias has nowhere to fold the scales"
    if any(layer.is_packed for layer in layers):
        return "its readers are packed; reparameterize the fake-quant model before pack_model()"
    if any(layer.w_quant.rounding != "nearest" for layer in layers):
        return "its readers have learned rounding; reparameterize before reconstruction"
    if not any(_static_quantizer(layer) is not None for layer in layers):
        return "no reader has a static per-tensor activation quantizer (weight-only or per-token)"
    return None


@torch.no_grad()
def _float_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with quantization_disabled(model):
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returns {type(out).__name__}; the LayerNorm reparameterization checks a tensor "
                        f"output")
    return out.float()


@torch.no_grad()
def reparameterize_layernorms(qmodel: nn.Module, data, batch_size: int = 32, device=None,
                              seed: int = 0) -> LNReparamReport:
    """Fold per-channel activation ranges of every LayerNorm output into the LayerNorm and the Linear
    layers reading it (see the module docstring), in place. ``data``: calibration images (a tensor or
    an iterable of batches). The activation quantizers must be observed afterwards. A second call folds
    again from the new ranges (exact for the float function, close to the identity)."""
    from ..nn.observe import batches_of

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if not any(isinstance(m, QuantLinear) for m in qmodel.modules()):
        raise ValueError("qmodel has no quantized Linear layers (dfqkern.quantize.quantize_model first)")
    if any(isinstance(m, QuantLinear) and m.is_packed for m in qmodel.modules()):
        raise ValueError("qmodel is packed; reparameterize the fake-quant model before pack_model()")
    batches = batches_of(data, batch_size)
    device = device or next(qmodel.parameters()).device
    was_training = qmodel.training
    qmodel.eval()
    report = LNReparamReport()
    try:
        probe = torch.cat([b.to(device) for b in batches[:PROBE_IMAGES]])[:PROBE_IMAGES]  # batches hold >= 1 image
        consumers = find_consumers(qmodel, probe)
        for name, m in qmodel.named_modules():
            if isinstance(m, nn.LayerNorm) and name not in consumers:
                report.skipped[name] = "no quantized Linear reads its output"
        plan = {}
        for ln_name, names in consumers.items():
            layers = [qmodel.get_submodule(n) for n in names]
            reason = _skip_reason(qmodel.get_submodule(ln_name), layers)
            if reason:
                report.skipped[ln_name] = reason
                continue
            quants = [q for q in map(_static_quantizer, layers) if q is not None]
            plan[ln_name] = (layers, min(quants, key=lambda q: q.bits))  # the narrowest grid decides
        if not plan:
            return report
        qparams = _channel_qparams(qmodel, {n: q for n, (_, q) in plan.items()}, batches, device, seed)
        ref = _float_output(qmodel, probe)
        tol = FLOAT_RTOL * max(float(ref.abs().max()), 1e-6)
        for ln_name, (layers, _) in plan.items():
            ln = qmodel.get_submodule(ln_name)
            # a bias-less reader cannot take the zero-point shift: scales only for this LayerNorm
            use_zp = all(layer.bias is not None for layer in layers)
            saved = _snapshot(ln, layers)
            ratios = _fold(ln, layers, *qparams[ln_name], use_zp)
            err = float((_float_output(qmodel, probe) - ref).abs().max())
            if not err <= tol:
                for t, old in saved:
                    t.copy_(old)
                report.skipped[ln_name] = (f"folding changed the float output by {err:.3g} (> {tol:.3g}): its output "
                                           f"has readers other than the Linear layers {consumers[ln_name]}")
                continue
            report.folded[ln_name] = list(consumers[ln_name])
            report.ratio_range[ln_name] = ratios
    finally:
        qmodel.train(was_training)
    for ln_name, reason in report.skipped.items():
        log.info("LayerNorm %s not reparameterized: %s", ln_name, reason)
    return report


def apply_configured(qmodel: nn.Module, data, batch_size: int = 32, device=None) -> LNReparamReport | None:
    """:func:`reparameterize_layernorms` when the model's ``QuantConfig.ln_reparam`` asks for it (the one
    switch), recording the outcome in its quantize report; None when off."""
    info = model_info(qmodel)
    cfg = info.config
    if cfg is None or not getattr(cfg, "ln_reparam", False):
        return None
    report = reparameterize_layernorms(qmodel, data, batch_size, device, seed=cfg.seed)
    if info.report is not None:
        info.report.ln_reparam.update({k: ", ".join(v) for k, v in report.folded.items()})
        info.report.ln_reparam.update({k: f"skipped: {v}" for k, v in report.skipped.items()})
    return report
