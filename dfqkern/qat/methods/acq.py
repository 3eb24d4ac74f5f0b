"""ACQ (Li et al., Pattern Recognition 2024): attention-centre conditioned generation and a consistency penalty.

Each image is conditioned on its class and on an attention-centre position ``p`` in [-0.5, 0.5]^2
((y, x), image coordinates in [-1, 1]), embedded by a linear layer and added to the generator's
conditioned noise. Generator loss terms beyond GDFQ's, on the teacher's last feature point:
attention-centre matching ``acm_weight`` x mean_i ||centre(A(x_i)) - p_i||^2 (centre of mass of the
spatial attention sum_c f^2); a pair term: the batch is two halves sharing (class, p) with different
noise, and ``adv_weight`` x (-mean_i mean |A(x_i) - A(x_i')|) pushes the pair's attention maps apart
so the generator cannot ignore the noise; the consistency penalty ``consistency_weight`` x
mean (A_eval(x) - A_train(x))^2 between the teacher's attention with running BatchNorm statistics and
with the batch's own (running statistics left untouched).
Choices where the paper leaves room: the L1 form of the pair term and the centre range.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..features import attention_centre, attention_distribution
from .base import Batch, Method, one_hot

CENTRE_RANGE = 0.5


@dataclass(frozen=True)
class ACQOptions:
    acm_weight: float = 1.0
    adv_weight: float = 0.1
    consistency_weight: float = 1.0

    def __post_init__(self):
        for name in ("acm_weight", "adv_weight", "consistency_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@contextmanager
def batch_statistics_bn(model: nn.Module):
    """BatchNorm layers normalize with the batch's statistics; running statistics stay as they were."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    bns = [m for m in model.modules() if isinstance(m, kinds)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    try:
        for m in bns:
            m.train()
            m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
        yield
    finally:
        for m, (training, momentum, nbt) in zip(bns, saved):
            m.train(training)
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


class ACQ(Method):
    name = "acq"
    summary = "attention-centre conditioned generator, paired diversity term, eval/train consistency penalty"
    Options = ACQOptions
    uses_features = True

    @classmethod
    def check_config(cls, config):
        if config.batch_size % 2:
            raise ValueError(f"acq pairs images: batch_size must be even, got {config.batch_size}")

    def build_generator(self, teacher):
        gen = super().build_generator(teacher)
        gen.position = nn.Linear(2, gen.latent_dim)  # the attention-centre embedding
        return gen

    def sample(self, n, latent_dim, rng, device):
        if n % 2:
            raise ValueError(f"acq pairs images: batch_size must be even, got {n}")
        half = n // 2
        labels = torch.randint(0, self.num_classes, (half,), generator=rng).repeat(2)
        pos = ((torch.rand(half, 2, generator=rng) * 2 - 1) * CENTRE_RANGE).repeat(2, 1)
        z = torch.randn(n, latent_dim, generator=rng)
        return Batch(z.to(device), one_hot(labels, self.num_classes).to(device), labels.to(device),
                     {"position": pos.to(device)})

    def generate(self, generator, batch):
        return generator(batch.z, batch.targets, generator.position(batch.extra["position"]))

    def generator_loss(self, batch, images, t):
        loss, logs = super().generator_loss(batch, images, t)
        f = t.features[-1]
        if self.opts.acm_weight > 0:
            acm = (attention_centre(f) - batch.extra["position"]).pow(2).sum(dim=1).mean()
            loss = loss + self.opts.acm_weight * acm
            logs["acm"] = acm.item()
        if self.opts.adv_weight > 0:
            a = attention_distribution(f)
            half = len(a) // 2
            adv = -(a[:half] - a[half:]).abs().mean()
            loss = loss + self.opts.adv_weight * adv
            logs["pair"] = adv.item()
        if self.opts.consistency_weight > 0:
            with batch_statistics_bn(self.teacher_module):
                f_train = self.teacher(images).features[-1]
            cons = (attention_distribution(f) - attention_distribution(f_train)).pow(2).mean()
            loss = loss + self.opts.consistency_weight * cons
            logs["consistency"] = cons.item()
        return loss, logs
