"""The float range each activation quantizer of a packed model can represent, from its scale and zero
point: codes ``0 .. 2**bits - 1`` map to ``(code - zero_point) * scale``."""
from __future__ import annotations

from torch import nn

from ..formats import code_max


def _kind(quant) -> str:
    from ..nn.attention import FixedRangeActQuantizer, HeadActQuantizer

    if quant.per_token:
        return "per-token (dynamic)"
    if isinstance(quant, HeadActQuantizer):
        return "per-head"
    if isinstance(quant, FixedRangeActQuantizer):
        return "fixed"
    return "per-tensor"


def activation_ranges(packed: nn.Module) -> list[dict]:
    """One row per activation quantizer, in module order: ``name`` (the quantizer's module path),
    ``layer`` (its owner), ``bits``, ``kind``, and for static ones ``low`` / ``high`` (over heads:
    the widest), ``scale`` and ``zero_point`` (lists, one per head or a single entry); dynamic
    per-token quantizers have no fixed range (``low`` / ``high`` None)."""
    from ..nn.quantizers import ActQuantizer

    rows = []
    for name, quant in packed.named_modules():
        if not isinstance(quant, ActQuantizer):
            continue
        row = {"name": name, "layer": name.rpartition(".")[0], "bits": quant.bits, "kind": _kind(quant),
               "symmetric": quant.symmetric, "low": None, "high": None, "scale": None, "zero_point": None}
        if not quant.per_token:
            scale = quant.scale.detach().float().cpu().reshape(-1)
            zero = quant.zero_point.detach().float().cpu().reshape(-1)
            low, high = -zero * scale, (code_max(quant.bits) - zero) * scale
            row.update(low=float(low.min()), high=float(high.max()), scale=[float(v) for v in scale],
                       zero_point=[int(v) for v in zero])
        rows.append(row)
    return rows
