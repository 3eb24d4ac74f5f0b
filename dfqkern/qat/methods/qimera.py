"""Qimera (Choi et al., NeurIPS 2021): boundary samples from superposed class embeddings.

A fraction ``mix_fraction`` of every batch is conditioned on ``sum_k lambda_k E[y_k]`` over
``mix_classes`` distinct random classes with Dirichlet(1) weights lambda, and its target is the
soft label ``sum_k lambda_k onehot(y_k)`` (the generator's cross-entropy and the student's both use
it). The superposed embedding passes a disentanglement mapping layer (DML, a linear layer trained
with the generator) before it conditions the noise, and the embeddings start from the teacher's
classifier weights (extracted embedding initialization) when ``eei``; the latent width is then the
classifier's input width.
Choices where the paper leaves room: the DML starts as the identity; the rest of the batch is
sampled as in GDFQ (one-hot).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Batch, Method, one_hot


@dataclass(frozen=True)
class QimeraOptions:
    mix_fraction: float = 0.5
    mix_classes: int = 2
    dml: bool = True
    eei: bool = True

    def __post_init__(self):
        if not 0.0 <= self.mix_fraction <= 1.0:
            raise ValueError(f"mix_fraction must be in [0, 1], got {self.mix_fraction}")
        if self.mix_classes < 2:
            raise ValueError(f"mix_classes must be >= 2, got {self.mix_classes}")


def last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def superposed_targets(n: int, num_classes: int, k: int, rng: torch.Generator) -> torch.Tensor:
    """[n, num_classes]: for each row, Dirichlet(1) weights over k distinct random classes."""
    if k > num_classes:
        raise ValueError(f"mix_classes ({k}) exceeds the number of classes ({num_classes})")
    classes = torch.rand(n, num_classes, generator=rng).argsort(dim=1)[:, :k]
    w = -torch.log(torch.rand(n, k, generator=rng).clamp_min(1e-12))  # Exp(1) draws, normalized: Dirichlet(1)
    w = w / w.sum(dim=1, keepdim=True)
    return torch.zeros(n, num_classes).scatter_(1, classes, w)


class Qimera(Method):
    name = "qimera"
    summary = "superposed class embeddings for boundary samples, disentanglement mapping, soft labels"
    Options = QimeraOptions

    def latent_dim(self, teacher):
        fc = last_linear(teacher)
        if self.opts.eei and fc is not None and fc.out_features == self.num_classes:
            return fc.in_features
        return self.cfg.latent_dim

    def build_generator(self, teacher):
        gen = super().build_generator(teacher)
        fc = last_linear(teacher)
        if self.opts.eei and fc is not None and fc.out_features == self.num_classes:
            with torch.no_grad():
                gen.embedding.weight.copy_(fc.weight)
        if self.opts.dml:
            dml = nn.Linear(gen.latent_dim, gen.latent_dim)
            with torch.no_grad():
                dml.weight.copy_(torch.eye(gen.latent_dim))
                dml.bias.zero_()
            gen.mapping = dml
        return gen

    def sample(self, n, latent_dim, rng, device):
        labels = torch.randint(0, self.num_classes, (n,), generator=rng)
        targets = one_hot(labels, self.num_classes)
        n_mix = int(round(self.opts.mix_fraction * n))
        if n_mix:
            targets[:n_mix] = superposed_targets(n_mix, self.num_classes, self.opts.mix_classes, rng)
            labels[:n_mix] = targets[:n_mix].argmax(dim=1)
        z = torch.randn(n, latent_dim, generator=rng)
        return Batch(z.to(device), targets.to(device), labels.to(device), {"mixed": n_mix})
