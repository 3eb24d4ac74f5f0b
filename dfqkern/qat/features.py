"""Intermediate features of teacher and student at the same module names, and maps computed from them.

Teacher (float, BatchNorm intact) and student (quantized copy, BatchNorm folded into the convs and
replaced by Identity under the same name) are compared where their outputs mean the same thing: the
outputs of residual blocks, or else of the folded BatchNorms (the student's folded conv output).
"""
from __future__ import annotations

import torch
from torch import nn
from ..model_info import model_info


def default_feature_names(student: nn.Module) -> list[str]:
    """Block outputs (the reconstruction units of kind block), else the folded BatchNorm names."""
    from ..calib import find_units

    names = [u.name for u in find_units(student) if u.kind == "block"]
    if not names:
        report = model_info(student).report
        names = list(report.folded_bn) if report is not None else []
    if not names:
        raise ValueError("no feature points found in the student (no residual block and no folded BatchNorm); "
                         "this method compares teacher and student features")
    return names


class FeatureTap:
    """Forward hooks keeping the output of each named module of the last forward (with its graph)."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"feature modules {missing} not found in {type(model).__name__}")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, out):
            self.outputs[name] = out
        return hook

    def features(self, detach: bool = False) -> list[torch.Tensor]:
        return [self.outputs[n].detach() if detach else self.outputs[n] for n in self.names]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """[N, H*W]: sum over channels of f^2, L2-normalized per sample (attention transfer's map)."""
    a = f.float().pow(2).sum(dim=1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """[N, C]: softmax over channels of the spatial mean of f^2."""
    return torch.softmax(f.float().pow(2).mean(dim=(2, 3)), dim=1)


def channel_energy(f: torch.Tensor) -> torch.Tensor:
    """[N, C]: each channel's share of the feature energy, mean_hw f^2 / sum_c mean_hw f^2 (TexQ's texture
    energy distribution)."""
    e = f.float().pow(2).mean(dim=(2, 3))
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


def attention_distribution(f: torch.Tensor) -> torch.Tensor:
    """[N, H, W]: sum over channels of f^2, normalized to sum 1 per sample."""
    a = f.float().pow(2).sum(dim=1)
    return a / a.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def attention_centre(f: torch.Tensor) -> torch.Tensor:
    """[N, 2]: (y, x) centre of mass of :func:`attention_distribution`, coordinates in [-1, 1]."""
    a = attention_distribution(f)
    h, w = a.shape[1:]
    ys = torch.linspace(-1, 1, h, device=a.device) if h > 1 else torch.zeros(1, device=a.device)
    xs = torch.linspace(-1, 1, w, device=a.device) if w > 1 else torch.zeros(1, device=a.device)
    return torch.stack([(a.sum(dim=2) * ys).sum(dim=1), (a.sum(dim=1) * xs).sum(dim=1)], dim=1)
