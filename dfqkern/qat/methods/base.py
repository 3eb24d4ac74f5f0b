"""What every QAT method is made of, with GDFQ's behaviour as the defaults.

A method decides (1) how a batch is sampled (latent codes, targets, extra conditions), (2) the
generator's loss on the teacher's view of the generated images, (3) what the student is shown and
(4) the student's loss, plus optional hooks (before the student's optimizer step; state saved
with every checkpoint). The engine (:mod:`dfqkern.qat.engine`) owns the loop, the optimizers, the
schedules and the checkpoints; a method module holds only what makes the method distinctive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..generator import ConditionalGenerator
from ..losses import bns_loss, kd_kl, soft_cross_entropy


@dataclass(frozen=True)
class NoOptions:
    """This method has no options of its own."""


@dataclass
class Batch:
    """One sampled batch: latent codes, soft/one-hot targets [N, K], the dominant class, method extras."""

    z: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class TeacherOutput:
    logits: torch.Tensor
    features: list | None  # at the method's feature points (None when the method uses none)
    bn_inputs: list  # input of every teacher BatchNorm layer


@dataclass
class StudentBatch:
    """What the student trains on: inputs, targets, and the teacher's (detached) outputs on them."""

    inputs: torch.Tensor
    targets: torch.Tensor
    teacher: TeacherOutput


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).float()


class Method:
    name = "gdfq"
    summary = ""
    Options = NoOptions
    uses_features = False  # the engine taps teacher / student features at feature_names

    def __init__(self, config, options, num_classes: int, image_shape):
        self.cfg, self.opts = config, options
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        self.teacher = None  # set by the engine: callable x -> TeacherOutput (features at feature_names)
        self.teacher_module: nn.Module | None = None  # the float model itself (eval mode, frozen)
        self.bn_layers: list = []
        self.feature_names: list[str] = []

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse engine settings this method cannot run with (called by QATConfig, before any work)."""

    # ------------------------------------------------------------------ generator side

    def needs_bn(self) -> bool:
        """Whether the teacher's BatchNorm inputs are captured (GDFQ's BNS loss)."""
        return self.cfg.bns_weight > 0

    def latent_dim(self, teacher: nn.Module) -> int:
        return self.cfg.latent_dim

    def build_generator(self, teacher: nn.Module) -> ConditionalGenerator:
        return ConditionalGenerator(self.num_classes, self.image_shape, self.latent_dim(teacher),
                                    self.cfg.generator_width)

    def setup(self, teacher: nn.Module, generator: ConditionalGenerator, rng: torch.Generator, device) -> None:
        """Once before training (not on resume: method state is restored from the checkpoint instead)."""

    def sample(self, n: int, latent_dim: int, rng: torch.Generator, device) -> Batch:
        """GDFQ: uniform random labels, one-hot targets, standard normal noise."""
        labels = torch.randint(0, self.num_classes, (n,), generator=rng)
        z = torch.randn(n, latent_dim, generator=rng)
        return Batch(z.to(device), one_hot(labels, self.num_classes).to(device), labels.to(device))

    def generate(self, generator: ConditionalGenerator, batch: Batch) -> torch.Tensor:
        return generator(batch.z, batch.targets)

    def generator_loss(self, batch: Batch, images: torch.Tensor, t: TeacherOutput) -> tuple[torch.Tensor, dict]:
        """GDFQ: target cross-entropy of the teacher + ``bns_weight`` x BNS loss."""
        ce = self.target_loss(t.logits, batch)
        bns = bns_loss(t.bn_inputs, self.bn_layers) if self.cfg.bns_weight > 0 else torch.zeros(())
        return ce + self.cfg.bns_weight * bns, {"g_ce": ce.item(), "bns": bns.item()}

    def target_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return soft_cross_entropy(logits, batch.targets)

    # ------------------------------------------------------------------ student side

    def student_batch(self, batch: Batch, images: torch.Tensor, t: TeacherOutput, rng: torch.Generator) -> StudentBatch:
        """The generated images (detached) and the teacher's outputs already computed on them."""
        feats = None if t.features is None else [f.detach() for f in t.features]
        return StudentBatch(images.detach(), batch.targets,
                            TeacherOutput(t.logits.detach(), feats, []))

    def student_loss(self, sb: StudentBatch, logits: torch.Tensor, features) -> tuple[torch.Tensor, dict]:
        """GDFQ: ``ce_weight`` x cross-entropy to the targets + ``kd_weight`` x T^2 KL(teacher || student)."""
        ce = soft_cross_entropy(logits, sb.targets)
        kl = kd_kl(logits, sb.teacher.logits, self.cfg.temperature)
        return self.cfg.ce_weight * ce + self.cfg.kd_weight * kl, {"s_ce": ce.item(), "kl": kl.item()}

    def before_student_step(self, student: nn.Module, lr: float) -> dict:
        """Called after the student's backward, before its optimizer step (``lr``: the weights' current lr)."""
        return {}

    # ------------------------------------------------------------------ checkpoint state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass
