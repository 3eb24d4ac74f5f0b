"""TexQ (Chen et al., NeurIPS 2023): texture-feature calibration centres and mixup knowledge distillation.

Calibration centres: before training, one calibration image per class is inverted from the
teacher (pixels, Adam at ``centre_lr`` for ``centre_iters`` steps on GDFQ's BNS loss + the class's
cross-entropy); its texture energy distribution at every feature point (each channel's share of
mean_hw f^2, :func:`~dfqkern.qat.features.channel_energy`) is the class centre. The generator
adds ``centre_weight`` x mean_i sum_l ||E_l(x_i) - (t_i @ C_l)||^2 (t_i the image's target, so
a one-hot target picks its class centre). Mixup distillation: a fraction ``mixup_fraction`` of the
student's batch is replaced by ``lam x_i + (1 - lam) x_j`` (j a random partner, lam ~ U(0, 1) per
image), with targets mixed the same way, and the teacher is run again on the mixed batch.
Choices where the paper leaves room: the energy-share texture feature, lam ~ U(0, 1) (Beta(1, 1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..features import channel_energy
from ..losses import bns_loss
from .base import Method, StudentBatch, TeacherOutput


@dataclass(frozen=True)
class TexQOptions:
    centre_iters: int = 200
    centre_lr: float = 0.1
    centre_weight: float = 1.0
    mixup_fraction: float = 0.5

    def __post_init__(self):
        if self.centre_iters < 1:
            raise ValueError(f"centre_iters must be >= 1, got {self.centre_iters}")
        if not self.centre_lr > 0:
            raise ValueError(f"centre_lr must be > 0, got {self.centre_lr}")
        if not self.centre_weight >= 0:
            raise ValueError(f"centre_weight must be >= 0, got {self.centre_weight}")
        if not 0.0 <= self.mixup_fraction <= 1.0:
            raise ValueError(f"mixup_fraction must be in [0, 1], got {self.mixup_fraction}")


def texture_centre_loss(features, centres, targets: torch.Tensor) -> torch.Tensor:
    terms = [(channel_energy(f) - targets @ c).pow(2).sum(dim=1) for f, c in zip(features, centres)]
    return torch.stack(terms).sum(dim=0).mean()


def mixup(images: torch.Tensor, targets: torch.Tensor, n_mix: int, rng: torch.Generator):
    """(images, targets, partner, lam): the first ``n_mix`` rows mixed with random partners."""
    n = len(images)
    partner = torch.randperm(n, generator=rng)[:n_mix]
    lam = torch.rand(n_mix, generator=rng)
    out, tgt = images.clone(), targets.clone()
    lam_x = lam.to(images.device).reshape(-1, *([1] * (images.dim() - 1)))
    out[:n_mix] = lam_x * images[:n_mix] + (1 - lam_x) * images[partner.to(images.device)]
    lam_t = lam.to(targets.device).reshape(-1, 1)
    tgt[:n_mix] = lam_t * targets[:n_mix] + (1 - lam_t) * targets[partner.to(targets.device)]
    return out, tgt, partner, lam


class TexQ(Method):
    name = "texq"
    summary = "texture-energy calibration centres guide the generator; mixup distillation"
    Options = TexQOptions
    uses_features = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.centres: list[torch.Tensor] = []

    def needs_bn(self):
        return True  # the calibration images are inverted from the BN statistics

    def setup(self, teacher, generator, rng, device):
        k = self.num_classes
        x = torch.randn(k, *self.image_shape, generator=rng).to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.opts.centre_lr)
        labels = torch.arange(k, device=device)
        for _ in range(self.opts.centre_iters):
            t = self.teacher(x)
            loss = bns_loss(t.bn_inputs, self.bn_layers) + F.cross_entropy(t.logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            self.centres = [channel_energy(f) for f in self.teacher(x.detach()).features]

    def generator_loss(self, batch, images, t):
        loss, logs = super().generator_loss(batch, images, t)
        if self.opts.centre_weight > 0:
            tex = texture_centre_loss(t.features, self.centres, batch.targets)
            loss = loss + self.opts.centre_weight * tex
            logs["texture"] = tex.item()
        return loss, logs

    def student_batch(self, batch, images, t, rng):
        n_mix = int(round(self.opts.mixup_fraction * len(images)))
        if n_mix == 0:
            return super().student_batch(batch, images, t, rng)
        x, targets, _, _ = mixup(images.detach(), batch.targets, n_mix, rng)
        with torch.no_grad():
            tm = self.teacher(x)
        return StudentBatch(x, targets, TeacherOutput(tm.logits, tm.features, []))

    def state_tensors(self):
        return {f"centre.{i}": c for i, c in enumerate(self.centres)}

    def load_state_tensors(self, state):
        self.centres = [state[f"centre.{i}"] for i in range(len(state))]
