"""quantize_model: fold BatchNorm, swap attention / Linear / Conv2d for quantized twins, observe ranges, pack."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .config import LayerQuant, QuantConfig
from .nn import ActQuantizer, QuantConv2d, QuantLayer, QuantLinear, WeightQuantizer
from .nn.attention import (ATTENTION_KINDS, QuantAttentionBase, SwappedModule, disable_nested_fast_path, kind_of,
                           looks_like_attention)
from .nn.conv import unsupported_reason
from .nn.observe import batches_of, observe_activations
from .model_info import model_info, set_info

log = logging.getLogger(__name__)

# Module type -> factory(module, LayerQuant, QuantConfig, name). Extend to quantize more layer types.
HANDLERS: dict[type, Callable[..., QuantLayer]] = {
    nn.Linear: QuantLinear.from_float,
    nn.Conv2d: QuantConv2d.from_float,
}
# Attention modules are swapped (by kind: dfqkern.nn.attention.ATTENTION_KINDS, the one registry, also read
# by io when a checkpoint is loaded) before the layers, so their Linear children are quantized by HANDLERS
# like any other; their matmul quantizers get the activation bits of the input projection afterwards.


@dataclass
class QuantReport:
    """What quantize_model did: per-layer bits, BatchNorms folded, modules left in float and why."""

    layers: dict[str, LayerQuant] = field(default_factory=dict)
    folded_bn: dict[str, str] = field(default_factory=dict)  # bn name -> conv name
    unhandled: dict[str, str] = field(default_factory=dict)  # module name -> reason
    attention: dict[str, str] = field(default_factory=dict)  # swapped module name -> kind (ATTENTION_KINDS)
    ln_reparam: dict[str, str] = field(default_factory=dict)  # LayerNorm -> readers folded into, or "skipped: why"

    def to_dict(self) -> dict:
        return {"layers": {k: {"weight_bits": v.weight_bits, "act_bits": v.act_bits} for k, v in self.layers.items()},
                "folded_bn": dict(self.folded_bn), "unhandled": dict(self.unhandled),
                "attention": dict(self.attention), "ln_reparam": dict(self.ln_reparam)}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``root``'s submodule ``name`` (dotted) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ----------------------------------------------------------------------------- BatchNorm folding

def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{bn_name: conv_name}`` for every BatchNorm2d fed only by a Conv2d whose output nothing else uses.

    Found from the traced graph (torch.fx), not from names, so any wiring is handled correctly;
    a model fx cannot trace is left unfolded (with a warning).
    """
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "do not fold"
        log.warning("BatchNorm folding skipped: torch.fx could not trace the model (%s)", e)
        return {}
    mods = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs[node.target] = src.target
    # a conv reached by several call sites (shared module) must not be folded
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return {bn: conv for bn, conv in pairs.items() if counts[bn] == 1 and counts[conv] == 1}


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold eval-mode BatchNorm2d into the preceding Conv2d in place; returns ``{bn_name: conv_name}``."""
    pairs = find_conv_bn_pairs(model)
    for bn_name, conv_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:  # batch-statistics BN cannot be folded
            continue
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias)
        set_module(model, bn_name, nn.Identity())
    return pairs


# ----------------------------------------------------------------------------- swapping

def swap_attention(model: nn.Module, report: QuantReport | None = None,
                   cfg: QuantConfig | None = None) -> dict[str, str]:
    """Replace every handled attention module (and ``nn.TransformerEncoderLayer``) by its explicit twin, in
    place, outermost first; returns ``{name: kind}`` of the swaps. Unsupported configurations and attention-like
    modules no kind handles are recorded in ``report.unhandled`` (their matmuls stay float)."""
    swapped: dict[str, str] = {}
    refused: set[str] = set()
    while True:
        target = None
        for name, m in model.named_modules():
            if not name or name in refused or isinstance(m, SwappedModule):
                continue
            kind = kind_of(m)
            if kind is None:
                continue
            if cfg is not None and cfg.is_skipped(name):
                reason = "skipped by config"
            else:
                reason = ATTENTION_KINDS[kind].unsupported(m)
            if reason:
                refused.add(name)
                if report is not None:
                    report.unhandled[name] = reason
                continue
            target = (name, m, kind)
            break
        if target is None:
            break
        name, m, kind = target
        set_module(model, name, ATTENTION_KINDS[kind].build(m, kind))
        swapped[name] = kind
    if swapped:
        disable_nested_fast_path(model)
    if report is not None:
        report.attention.update(swapped)
        for name, m in model.named_modules():
            if name and name not in refused and looks_like_attention(m) and kind_of(m) is None:
                report.unhandled[name] = (f"{type(m).__name__} is an attention module with no quantized handler: "
                                          f"its q.k^T / attn.v matmuls run in float")
    return swapped


def init_attention_quantizers(model: nn.Module, cfg: QuantConfig, report: QuantReport | None = None) -> int:
    """Give each swapped attention module without matmul quantizers those of its input projection's
    activation bits; one whose projection has float activations stays float and is reported. Returns how
    many got quantizers."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantAttentionBase) or m.bits is not None:
            continue
        proj = m.input_projection()
        bits = proj.lq.act_bits if isinstance(proj, QuantLayer) else None
        if bits is None:
            if report is not None:
                report.unhandled[name] = (f"{type(m).__name__} matmuls left in float: its input projection has no "
                                          f"activation quantization (weight-only or skipped)")
            continue
        m.init_quantizers(bits, cfg)
        n += 1
    return n


def attach_attention_quantizers(model: nn.Module) -> int:
    """Swap any handled attention module of a quantized ``model`` still in float and give it quantizers
    (idempotent; :func:`quantize_model` already did this for the models it made). Returns how many."""
    cfg = model_info(model).config
    before = {n for n, m in model.named_modules() if isinstance(m, QuantAttentionBase) and m.bits is not None}
    swap_attention(model)
    if cfg is None:
        layer = next((m for m in model.modules() if isinstance(m, QuantLayer)), None)
        cfg = layer.cfg if layer is not None else QuantConfig()
    init_attention_quantizers(model, cfg)
    return sum(1 for n, m in model.named_modules()
               if isinstance(m, QuantAttentionBase) and m.bits is not None and n not in before)


_PASS_THROUGH = (nn.Dropout, nn.Identity)  # modules between a GELU and the Linear reading its output


def post_gelu_linears(model: nn.Module) -> set[str]:
    """Names of the Linear layers whose input is a GELU output, found by structure: the child registered
    right before the Linear in its parent (dropout / identity skipped) is an ``nn.GELU`` (timm / dfqkern
    ``Mlp``'s fc2, torchvision ``MLPBlock[3]``), or the Linear is the ``linear2`` of a (swapped)
    ``nn.TransformerEncoderLayer`` with GELU activation."""
    import torch.nn.functional as F

    from .nn.attention import QuantTransformerEncoderLayer

    found = set()
    for pname, parent in model.named_modules():
        prefix = f"{pname}." if pname else ""
        if isinstance(parent, (nn.TransformerEncoderLayer, QuantTransformerEncoderLayer)):
            act = parent.activation
            if act is F.gelu or isinstance(act, nn.GELU):
                found.add(prefix + "linear2")
            continue
        before = None
        for cname, child in parent.named_children():
            if isinstance(child, nn.Linear) and isinstance(before, nn.GELU):
                found.add(prefix + cname)
            if not isinstance(child, _PASS_THROUGH):
                before = child
    return found


def _candidates(model: nn.Module, cfg: QuantConfig, report: QuantReport) -> list[tuple[str, nn.Module]]:
    """Quantizable (name, module) pairs in execution-ish (registration) order; records what is skipped."""
    inside_mha = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):  # not swapped (unsupported): torch reads its weights functionally
            report.unhandled.setdefault(name, "nn.MultiheadAttention uses its projection weights functionally")
            inside_mha.update(f"{name}.{c}" for c, _ in m.named_modules() if c)
    out = []
    for name, m in model.named_modules():
        if not name or name in inside_mha:
            continue
        if type(m) in HANDLERS:
            if cfg.is_skipped(name):
                report.unhandled[name] = "skipped by config"
                continue
            reason = unsupported_reason(m) if isinstance(m, nn.Conv2d) else None
            if reason:
                report.unhandled[name] = reason
                continue
            out.append((name, m))
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, nn.LSTM, nn.GRU)):
            report.unhandled[name] = f"{type(m).__name__} has no quantized handler"
    return out


def quantize_model(model: nn.Module, config: QuantConfig | None = None, inplace: bool = False,
                   backend: str | None = None) -> nn.Module:
    """A copy of ``model`` with Linear / Conv2d layers swapped for QuantLinear / QuantConv2d (fake-quant mode).

    BatchNorm is folded first (``config.fold_bn``); attention modules are replaced by quantized twins
    (:mod:`dfqkern.nn.attention`: timm ViT / Swin attention, ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``) whose q.k^T and attn.v operands are quantized.
    Weight quantizers are initialised from the
    weights right away; activation quantizers need data: :func:`calibrate_activations`. The
    report (``model_info(model).report``) lists per-layer bits and every module left in float.
    ``backend`` forces one kernel backend for the quantized layers (:func:`set_backend`).
    """
    cfg = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        from .kernels import Backend

        Backend.parse(backend)  # a bad name fails before the model is copied
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    report = QuantReport()
    if cfg.fold_bn:
        report.folded_bn = fold_batchnorm(qmodel)
    swap_attention(qmodel, report, cfg)
    cands = _candidates(qmodel, cfg, report)
    post_gelu = post_gelu_linears(qmodel) if cfg.gelu_act_bits is not None else set()
    for i, (name, m) in enumerate(cands):
        lq = cfg.resolve(name, m, is_first=i == 0, is_last=i == len(cands) - 1, post_gelu=name in post_gelu)
        set_module(qmodel, name, HANDLERS[type(m)](m, lq, cfg, name))
        report.layers[name] = lq
    init_attention_quantizers(qmodel, cfg, report)
    for name, reason in report.unhandled.items():
        log.info("left in float: %s (%s)", name, reason)
    set_info(qmodel, report=report, config=cfg)
    if backend is not None:
        set_backend(qmodel, backend)
    return qmodel


def quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer))


def calibrate_activations(model: nn.Module, data, batch_size: int = 32, device=None, progress: bool = True) -> nn.Module:
    """Observer calibration: run ``data`` (a tensor of inputs or an iterable of batches) and set activation ranges.

    With ``QuantConfig.ln_reparam`` the LayerNorm outputs are reparameterized first
    (:mod:`dfqkern.calib.ln_reparam`), so their ranges are observed on the folded model."""
    from .calib.ln_reparam import apply_configured  # calib sits beside quantize and imports it

    batches = batches_of(data, batch_size)
    apply_configured(model, batches, batch_size, device)
    return observe_activations(model, batches, device, progress)


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Force kernel ``backend`` ('reference', 'cpu', 'triton', 'cuda'; ``None``: dispatch picks by device
    and ``$DFQKERN_BACKEND``) for every quantized layer and quantizer of ``model``; strict: a backend that
    cannot serve a call raises instead of falling back."""
    from .kernels import Backend

    name = None if backend is None else Backend.parse(backend).value
    for m in model.modules():
        if isinstance(m, (QuantLayer, ActQuantizer, WeightQuantizer, QuantAttentionBase)):
            m.backend = name
    return model


def pack_model(model: nn.Module) -> nn.Module:
    """Pack every quantized layer in place (deployment mode; the float weights are dropped).

    Every layer is checked first, so a model with a layer no kernel runs is left untouched.
    """
    refused = {name: reason for name, layer in quant_layers(model) if (reason := layer.unpackable_reason())}
    attns = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAttentionBase)]
    refused.update({name: reason for name, m in attns if (reason := m.unpackable_reason())})
    if refused:
        name, reason = next(iter(refused.items()))
        more = f" (and {len(refused) - 1} more layers)" if len(refused) > 1 else ""
        raise ValueError(f"cannot pack layer {name!r}{more}: {reason}")
    for _, layer in quant_layers(model):
        layer.pack()
    for _, m in attns:
        m.pack()
    return model
