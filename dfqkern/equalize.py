"""Cross-layer equalization (CLE) and high-bias absorption on a float model, before ``quantize_model``.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction". For two
layers joined by a positively homogeneous path (``f(x / s) = f(x) / s`` per channel, ``s > 0``:
ReLU, identity, max-pool), dividing output channel ``i`` of the first by ``s_i`` and multiplying input
channel ``i`` of the second by ``s_i`` leaves the function unchanged; ``s_i = sqrt(r1_i * r2_i) / r2_i``
makes both per-channel weight ranges ``sqrt(r1_i * r2_i)``. Ranges are taken on the BatchNorm-folded
weights, which are what :func:`~dfqkern.quantize.quantize_model` quantizes; a chain conv -> depthwise
conv -> conv is equalized pair by pair until the scales settle (the paper's iteration).

The model keeps its modules (a packed checkpoint must rebuild from the registry architecture): the
first layer's channel scale goes into its BatchNorm's gamma and beta (or into its weight and bias
when it has none); nothing is added.

Pairs are found by data flow (torch.fx), not by call order: call order cannot see that an output also
feeds a residual add or a second consumer, which is exactly what makes a pair unsafe. A pair is
refused (and reported with the reason) when any node between the layers has more than one user, a
node is not positively homogeneous (GELU, SiLU, add, concat, flatten, ...), a BatchNorm sits after the
activation, a module is called twice, or the shapes do not line up.

ReLU6 is ``min(relu(x), 6)``: the clip at 6 does not scale. It is crossed only under the ``bounded``
policy and only when the first layer has a BatchNorm: its output is taken to stay within
``beta + k|gamma|`` (``k = bound_sigmas``, the paper's Gaussian assumption, as for bias absorption).
A channel whose bound reaches 6 keeps scale 1; another gets ``s_i >= bound_i / 6`` so neither the old
nor the new clip is ever reached. This is exact whenever the pre-activation stays under its bound.

Guard (``guard_bits``): the paper's pair scale maximises the product of the two layers' per-tensor
precisions, and a layer coupled to two pairs (the depthwise conv of conv -> dw -> conv) takes the spread
of both neighbours. On a net whose channel ranges are already even that trades the depthwise layer's
precision for its neighbours' and costs accuracy (CIFAR MobileNetV2-x0.35: depthwise per-tensor 4-bit
weight SQNR 20 -> 15 dB in the last blocks, W4 per-tensor top-1 68.3 -> 57.7 with activations in
float). So each chain of coupled pairs is kept only when it lowers the chain's weight-quantization
noise (:func:`weight_noise`, summed over its BatchNorm-folded layers, at ``guard_bits`` bits on a
per-tensor grid: what CLE exists for); otherwise it is restored and reported. ``guard_bits=None`` keeps every chain (the paper).

High-bias absorption (optional): a BatchNorm output ``y_i`` is taken to stay above
``c_i = max(0, beta_i - k|gamma_i|)``, so ``relu(y) = relu(y - c) + c``; ``c`` leaves the first layer's
beta and enters the second layer's bias as ``W2 c``. Only into a layer without zero padding (at a
padded border the constant would be wrong) that has a bias or a folded BatchNorm to carry it.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .formats import WEIGHT_BITS, check_bits

log = logging.getLogger(__name__)

RELU6_POLICIES = ("bounded", "skip")


@dataclass(frozen=True)
class EqualizeConfig:
    """Options of :func:`equalize_model` (the one place their defaults live).

    ``sweeps``: at most this many passes over all pairs (a chain of three layers couples its two
    pairs); stops early once no scale moves by more than ``tolerance`` (relative). ``relu6``: see the
    module docstring. ``bound_sigmas``: ``k`` of the BatchNorm bound ``beta +- k|gamma|``.
    ``absorb_bias``: high-bias absorption after equalization. ``equalize``: False runs only absorption.
    ``guard_bits``: keep a chain of coupled pairs only if it lowers the chain's weight-quantization
    noise at this width (module docstring; ``None``: keep all, as the paper).
    """

    equalize: bool = True
    absorb_bias: bool = False
    relu6: str = "bounded"
    bound_sigmas: float = 3.0
    sweeps: int = 100
    tolerance: float = 1e-6
    guard_bits: int | None = QuantConfig.weight_bits

    def __post_init__(self):
        if self.relu6 not in RELU6_POLICIES:
            raise ValueError(f"relu6 must be one of {RELU6_POLICIES}, got {self.relu6!r}")
        if isinstance(self.bound_sigmas, bool) or not isinstance(self.bound_sigmas, (int, float)) \
                or not self.bound_sigmas > 0:
            raise ValueError(f"bound_sigmas must be > 0, got {self.bound_sigmas!r}")
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or self.sweeps < 1:
            raise ValueError(f"sweeps must be a positive int, got {self.sweeps!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance!r}")
        if self.guard_bits is not None:
            check_bits(self.guard_bits, WEIGHT_BITS, "guard_bits")


@dataclass
class LayerPair:
    """Two layers joined by a positively homogeneous path. ``bn``: the first layer's folded BatchNorm;
    ``second_bn``: the second's; ``clip``: the path's upper clip (``inf`` for ReLU / identity);
    ``pooled``: the path holds a max-pool (absorption does not cross it)."""

    first: str
    second: str
    bn: str | None
    second_bn: str | None
    clip: float
    pooled: bool

    @property
    def name(self) -> str:
        return f"{self.first} -> {self.second}"


@dataclass
class EqualizeReport:
    """What :func:`equalize_model` did. ``skipped``: ``{layer or pair: reason}``; ``clipped_channels``:
    per ReLU6 pair, channels whose scale the bound kept at 1 or raised; ``absorbed``: per pair, the
    channels whose bias moved."""

    equalized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    clipped_channels: dict[str, int] = field(default_factory=dict)
    absorbed: dict[str, int] = field(default_factory=dict)
    sweeps: int = 0
    reverted: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"equalized": list(self.equalized), "skipped": dict(self.skipped),
                "clipped_channels": dict(self.clipped_channels), "absorbed": dict(self.absorbed),
                "sweeps": self.sweeps, "reverted": dict(self.reverted)}


# ----------------------------------------------------------------------------- graph: what a node does

LAYER_TYPES = (nn.Conv2d, nn.Linear)


def node_kind(node, modules: dict[str, nn.Module]) -> tuple[str, tuple[float, float] | None]:
    """``(kind, bounds)`` of an fx node: kind ``layer`` / ``bn`` / ``act`` (``bounds``: its output clip
    ``(lo, hi)``, ``lo`` 0 or -inf) / ``maxpool`` / ``avgpool`` / ``flatten`` / ``other``."""
    inf = math.inf
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, LAYER_TYPES):
            return "layer", None
        if isinstance(m, nn.BatchNorm2d):
            return "bn", None
        if isinstance(m, nn.ReLU):
            return "act", (0.0, inf)
        if isinstance(m, nn.Hardtanh) and m.min_val == 0:  # ReLU6 is Hardtanh(0, 6)
            return "act", (0.0, float(m.max_val))
        if isinstance(m, (nn.Identity, nn.Dropout)):  # eval mode: dropout is the identity
            return "act", (-inf, inf)
        if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            return "maxpool", None
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return "avgpool", None
        if isinstance(m, nn.Flatten):
            return "flatten", None
        return "other", None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return "act", (0.0, inf)
        if node.target is F.relu6:
            return "act", (0.0, 6.0)
        if node.target in (F.max_pool2d, F.adaptive_max_pool2d):
            return "maxpool", None
        if node.target is F.adaptive_avg_pool2d:
            return "avgpool", None
        if node.target is torch.flatten:
            return "flatten", None
        return "other", None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "act", (0.0, inf)
        if node.target == "flatten":
            return "flatten", None
    return "other", None


def describe(node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules.get(node.target)).__name__})"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def trace(model: nn.Module):
    """The torch.fx graph of ``model`` and how often each module is called, or ``(None, reason)``."""
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "do not touch the model"
        return None, f"torch.fx could not trace the model ({type(e).__name__}: {e})"
    return gm.graph, None


def module_calls(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def find_layer_pairs(model: nn.Module, relu6: str = "bounded") -> tuple[list[LayerPair], dict[str, str]]:
    """Every pair CLE can rescale exactly, in graph order, and ``{layer: why not}`` for the rest."""
    from .quantize import find_conv_bn_pairs

    graph, why = trace(model)
    if graph is None:
        return [], {"<model>": why}
    mods = dict(model.named_modules())
    calls = module_calls(graph)
    folded = {conv: bn for bn, conv in find_conv_bn_pairs(model).items()}  # what quantize_model will fold
    pairs, skipped = [], {}
    for node in graph.nodes:
        if node_kind(node, mods)[0] != "layer":
            continue
        name = node.target
        pair, reason = _follow(node, mods, calls, folded, relu6)
        if pair is None:
            skipped[name] = reason
        else:
            pairs.append(pair)
    return pairs, skipped


def _follow(node, mods, calls, folded, relu6):
    """The pair that starts at layer ``node``, or ``(None, reason)``."""
    name = node.target
    if calls[name] != 1:
        return None, "module called more than once"
    bn, clip, pooled, cur = None, math.inf, False, node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            what = "the model output" if not users else f"{len(users)} consumers"
            return None, f"output of {describe(cur, mods)} feeds {what}"
        nxt = users[0]
        kind, bounds = node_kind(nxt, mods)
        if kind == "layer":
            break
        if kind == "bn":
            if cur is not node or folded.get(name) != nxt.target:
                return None, f"{describe(nxt, mods)} is not folded into {name} (a BatchNorm after the activation " \
                             f"does not commute with the channel scale)"
            bn = nxt.target
        elif kind == "act":
            lo, hi = bounds
            if lo != 0 and lo != -math.inf:
                return None, f"{describe(nxt, mods)} is not positively homogeneous"
            if hi != math.inf:
                if clip != math.inf:
                    return None, "two clipping activations in a row"
                clip = hi
        elif kind == "maxpool":
            pooled = True
        else:
            return None, f"{describe(nxt, mods)} is not a positively homogeneous per-channel op"
        cur = nxt
    second = nxt.target
    m1, m2 = mods[name], mods[second]
    if calls[second] != 1:
        return None, f"{second} is called more than once"
    if type(m1) is not type(m2):
        return None, f"{type(m1).__name__} -> {type(m2).__name__} (only Conv2d -> Conv2d and Linear -> Linear)"
    channels = m1.out_channels if isinstance(m1, nn.Conv2d) else m1.out_features
    takes = m2.in_channels if isinstance(m2, nn.Conv2d) else m2.in_features
    if channels != takes:
        return None, f"{name} gives {channels} channels, {second} takes {takes}"
    if clip != math.inf:
        if relu6 == "skip":
            return None, f"clipping activation (at {clip:g}) and relu6='skip'"
        if bn is None:
            return None, f"clipping activation (at {clip:g}) without a BatchNorm to bound the pre-activation"
    if bn is not None and not mods[bn].affine:
        return None, f"BatchNorm {bn} has no affine parameters to carry the scale"
    if bn is not None and mods[bn].running_var is None:
        return None, f"BatchNorm {bn} has no running statistics"
    return LayerPair(name, second, bn, folded.get(second), clip, pooled), None


# ----------------------------------------------------------------------------- ranges and scales

def fold_factor(bn: nn.BatchNorm2d | None, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Per-channel factor BatchNorm folding multiplies a conv's output channel by (gamma / std)."""
    if bn is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    std = torch.sqrt(bn.running_var + bn.eps)
    return (bn.weight if bn.affine else torch.ones_like(std)) / std


def input_channel_index(m: nn.Module) -> torch.Tensor:
    """For every ``[out, in_per_group]`` weight position, the input channel it reads (grouped convs)."""
    if isinstance(m, nn.Linear):
        return torch.arange(m.in_features).expand(m.out_features, -1)
    cin_g, cout_g = m.in_channels // m.groups, m.out_channels // m.groups
    group = torch.arange(m.out_channels) // cout_g
    return group[:, None] * cin_g + torch.arange(cin_g)[None, :]


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1], -1)


def output_ranges(m: nn.Module, bn) -> torch.Tensor:
    """max |w| per output channel of the BatchNorm-folded weight."""
    w = m.weight.detach()
    f = fold_factor(bn, w.shape[0], w)
    return (w.reshape(w.shape[0], -1).abs().amax(1) * f.abs())


def input_ranges(m: nn.Module, bn) -> torch.Tensor:
    """max |w| per input channel of the BatchNorm-folded weight (every output that reads it)."""
    w = m.weight.detach()
    f = fold_factor(bn, w.shape[0], w).abs()
    per = _flat(w).abs().amax(2) * f[:, None]  # [out, in_per_group]
    channels = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
    out = torch.zeros(channels, dtype=w.dtype, device=w.device)
    return out.scatter_reduce(0, input_channel_index(m).reshape(-1).to(w.device), per.reshape(-1), "amax")


def bn_upper_bound(bn: nn.BatchNorm2d, k: float) -> torch.Tensor:
    return bn.bias.detach() + k * bn.weight.detach().abs()


def pair_scales(model: nn.Module, pair: LayerPair, bound: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``s_i = sqrt(r1_i * r2_i) / r2_i`` (1 for a dead channel), made safe for the pair's clip given
    ``bound``, the current upper bound of the pre-activation: returns the scales and how many channels
    the clip changed."""
    m1, m2 = model.get_submodule(pair.first), model.get_submodule(pair.second)
    bn1 = model.get_submodule(pair.bn) if pair.bn else None
    bn2 = model.get_submodule(pair.second_bn) if pair.second_bn else None
    r1, r2 = output_ranges(m1, bn1), input_ranges(m2, bn2)
    live = (r1 > 0) & (r2 > 0)
    s = torch.where(live, torch.sqrt(r1 * r2) / torch.where(live, r2, torch.ones_like(r2)), torch.ones_like(r1))
    changed = 0
    if pair.clip != math.inf:  # new pre-activation y / s must stay under the clip: y <= clip * min(s, 1)
        safe = torch.where(bound < pair.clip, torch.maximum(s, bound / pair.clip), torch.ones_like(s))
        changed = int((safe != s).sum())
        s = safe
    return s, changed


@torch.no_grad()
def preactivation_bounds(model: nn.Module, pairs: list[LayerPair], k: float, data=None,
                         batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Upper bound of the pre-activation of every clipped pair: ``beta + k|gamma|`` of its BatchNorm,
    raised to the largest value seen on ``data`` when given."""
    clipped = [p for p in pairs if p.clip != math.inf]
    bounds = {p.name: bn_upper_bound(model.get_submodule(p.bn), k).clone() for p in clipped}
    if data is None or not clipped:
        return bounds
    from .nn.observe import batches_of

    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p.bn).register_forward_hook(
        lambda mod, args, out, name=p.name: seen.__setitem__(name, torch.maximum(
            seen.get(name, torch.full((out.shape[1],), -math.inf, device=out.device)), out.detach().amax((0, 2, 3)))))
        for p in clipped]
    try:
        device = next(model.parameters()).device
        for x in batches_of(data, batch_size):
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.maximum(b, seen[name].to(b)) if name in seen else b for name, b in bounds.items()}


@torch.no_grad()
def apply_scales(model: nn.Module, pair: LayerPair, s: torch.Tensor) -> None:
    """First layer's output channel i / s_i (through its BatchNorm when it has one), second's input * s_i."""
    m1, m2 = model.get_submodule(pair.first), model.get_submodule(pair.second)
    if pair.bn is not None:
        bn = model.get_submodule(pair.bn)
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        m1.weight.div_(s.reshape(-1, *([1] * (m1.weight.dim() - 1))))
        if m1.bias is not None:
            m1.bias.div_(s)
    mult = s[input_channel_index(m2).to(s.device)]  # [out, in_per_group]
    m2.weight.mul_(mult.reshape(*mult.shape, *([1] * (m2.weight.dim() - 2))))


# ----------------------------------------------------------------------------- guard

def chains(pairs: list[LayerPair]) -> list[list[LayerPair]]:
    """Pairs grouped by shared layers (connected components): scales of one chain are coupled."""
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for p in pairs:
        parent[root(p.first)] = root(p.second)
    groups: dict[str, list[LayerPair]] = {}
    for p in pairs:
        groups.setdefault(root(p.first), []).append(p)
    return list(groups.values())


def chain_state(model: nn.Module, chain: list[LayerPair]) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every tensor equalization may change in the chain's layers and BatchNorms."""
    names = {n for p in chain for n in (p.first, p.second, p.bn, p.second_bn) if n}
    return {n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()} for n in names}


def weight_noise(w: torch.Tensor, bits: int) -> float:
    """Mean over output channels of ``||w_c - Q(w_c)||^2 / ||w_c||^2``, ``Q`` one per-tensor asymmetric
    min-max grid of ``bits`` bits. Channels count alike (not by energy): a channel with a small range is
    what per-tensor quantization loses and what CLE is for, however little energy it holds."""
    lo, hi = float(w.min()), float(w.max())
    if hi <= lo:
        return 0.0
    step = (hi - lo) / (2 ** bits - 1)
    q = torch.round((w - lo) / step) * step + lo
    flat, err = w.reshape(w.shape[0], -1), (w - q).reshape(w.shape[0], -1)
    energy = flat.pow(2).sum(1)
    live = energy > 0
    return float((err.pow(2).sum(1)[live] / energy[live]).mean()) if bool(live.any()) else 0.0


def chain_noise(model: nn.Module, chain: list[LayerPair], bits: int) -> float:
    """Summed relative weight-quantization noise of the chain's BatchNorm-folded layers."""
    bn_of = {}
    for p in chain:
        bn_of[p.first] = p.bn
        bn_of[p.second] = p.second_bn
    total = 0.0
    for name, bn_name in bn_of.items():
        m = model.get_submodule(name)
        w = m.weight.detach()
        f = fold_factor(model.get_submodule(bn_name) if bn_name else None, w.shape[0], w)
        total += weight_noise(w * f.reshape(-1, *([1] * (w.dim() - 1))), bits)
    return total


# ----------------------------------------------------------------------------- absorption

def _zero_padded(m: nn.Module) -> bool:
    """True when zero padding makes a constant input channel non-constant at the borders."""
    if isinstance(m, nn.Linear):
        return False
    from .nn.conv import conv_padding

    pad = conv_padding(m)
    return pad is None or any(pad)


@torch.no_grad()
def absorb_high_bias(model: nn.Module, pair: LayerPair, k: float, bound: torch.Tensor | None = None
                     ) -> tuple[int, str | None]:
    """Move ``c = max(0, beta - k|gamma|)`` from the first layer's BatchNorm into the second layer's
    bias; returns (channels moved, reason when refused)."""
    if pair.bn is None:
        return 0, "no BatchNorm statistics on the first layer"
    if pair.pooled:
        return 0, "a pooling layer sits between the two layers"
    m2 = model.get_submodule(pair.second)
    if _zero_padded(m2):
        return 0, f"{pair.second} zero-pads its input (the constant would be wrong at the borders)"
    if pair.second_bn is None and m2.bias is None:
        return 0, f"{pair.second} has neither a bias nor a folded BatchNorm to take the shift"
    bn = model.get_submodule(pair.bn)
    beta, spread = bn.bias, k * bn.weight.abs()
    c = torch.clamp(beta - spread, min=0)
    if pair.clip != math.inf:  # relu6(y) - c == relu6(y - c) only while y stays under the clip too
        c = torch.where(bound < pair.clip, c, torch.zeros_like(c))
    moved = int((c > 0).sum())
    if moved == 0:
        return 0, None
    mult = c[input_channel_index(m2).to(c.device)]
    shift = (_flat(m2.weight) * mult[..., None]).sum((1, 2))  # W2 applied to the constant c
    bn.bias.sub_(c)
    if pair.second_bn is not None:  # the conv output shift passes through the folded BatchNorm
        bn2 = model.get_submodule(pair.second_bn)
        bn2.bias.add_(shift * fold_factor(bn2, shift.numel(), shift))
    else:
        m2.bias.add_(shift)
    return moved, None


# ----------------------------------------------------------------------------- entry point

def equalize_model(model: nn.Module, config: EqualizeConfig | None = None, inplace: bool = False,
                   data=None) -> nn.Module:
    """A copy of ``model`` (eval mode) with cross-layer equalization and, if asked, high-bias absorption.

    ``data`` (optional inputs): pre-activations seen on it raise the BatchNorm bound of ReLU6 pairs
    (see the module docstring); nothing else uses data. The report
    (``model.dfqkern_equalize_report``, an :class:`EqualizeReport`) lists the pairs equalized and every
    layer skipped with the reason. Run before :func:`~dfqkern.quantize.quantize_model`.
    """
    cfg = config or EqualizeConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    report = EqualizeReport()
    pairs, report.skipped = find_layer_pairs(model, cfg.relu6)
    with torch.no_grad():
        bounds = preactivation_bounds(model, pairs, cfg.bound_sigmas, data)
        if cfg.equalize and pairs:
            groups = chains(pairs)
            saved = [(chain_state(model, c), chain_noise(model, c, cfg.guard_bits) if cfg.guard_bits else 0.0,
                      {p.name: bounds[p.name].clone() for p in c if p.name in bounds}) for c in groups]
            for sweep in range(1, cfg.sweeps + 1):
                moved = 0.0
                for pair in pairs:
                    s, changed = pair_scales(model, pair, bounds.get(pair.name))
                    apply_scales(model, pair, s)
                    if pair.name in bounds:
                        bounds[pair.name] /= s
                        report.clipped_channels[pair.name] = changed
                    moved = max(moved, float((s - 1).abs().max()))
                report.sweeps = sweep
                if moved <= cfg.tolerance:
                    break
            kept = set()
            for chain, (state, before, chain_bounds) in zip(groups, saved):
                after = chain_noise(model, chain, cfg.guard_bits) if cfg.guard_bits else 0.0
                if cfg.guard_bits and after > before:
                    for name, tensors in state.items():
                        model.get_submodule(name).load_state_dict(tensors, strict=False)
                    bounds.update(chain_bounds)
                    for p in chain:
                        report.clipped_channels.pop(p.name, None)
                    report.reverted[" , ".join(p.name for p in chain)] = (
                        f"{cfg.guard_bits}-bit per-tensor weight noise would rise {before:.4g} -> {after:.4g}")
                else:
                    kept.update(p.name for p in chain)
            report.equalized = [p.name for p in pairs if p.name in kept]
        if cfg.absorb_bias:
            for pair in pairs:
                n, why = absorb_high_bias(model, pair, cfg.bound_sigmas, bounds.get(pair.name))
                if why:
                    report.skipped[f"{pair.name} (bias absorption)"] = why
                elif n:
                    report.absorbed[pair.name] = n
    for name, why in report.skipped.items():
        log.info("equalization skipped %s: %s", name, why)
    for name, why in report.reverted.items():
        log.info("equalization reverted %s: %s", name, why)
    model.dfqkern_equalize_report = report
    return model
