"""GDFQ's conditional generator: noise times a (soft) label embedding -> an image in the model's input space.

Architecture as in GDFQ (Xu et al., ECCV 2020): ``z * cond`` -> Linear -> BN -> 2 x (upsample x2, 3x3
conv, BN, LeakyReLU 0.2) -> 3x3 conv -> tanh -> BN without affine (so images come out per-channel
normalized, like the teacher's inputs). GDFQ's BatchNorm eps of 0.8 in the upsampling stages is kept.

The condition is ``mapping(targets @ embedding)``: for a one-hot target that is the label embedding
E[y]; for a soft target sum_k lambda_k e_k it is Qimera's superposed embedding sum_k lambda_k E[y_k].
``mapping`` is the identity unless a method installs one (Qimera's disentanglement mapping layer).
``extra`` (ACQ's attention-centre embedding) is added after the product.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

GDFQ_BN_EPS = 0.8


class ConditionalGenerator(nn.Module):
    def __init__(self, num_classes: int, image_shape: Sequence[int], latent_dim: int = 100, width: int = 128):
        super().__init__()
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(f"image_shape must be (channels, height, width), got {tuple(image_shape)}")
        c, h, w = (int(s) for s in image_shape)
        if h % 4 or w % 4:
            raise ValueError(f"image_shape height and width must be multiples of 4 (two x2 upsampling stages), "
                             f"got {h}x{w}")
        if width < 2:
            raise ValueError(f"width must be >= 2 (the last stage has width // 2 channels), got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.image_shape, self.latent_dim = num_classes, (c, h, w), latent_dim
        self.h0, self.w0 = h // 4, w // 4
        self.embedding = nn.Embedding(num_classes, latent_dim)
        self.mapping: nn.Module = nn.Identity()
        self.fc = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, GDFQ_BN_EPS),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, GDFQ_BN_EPS), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, c, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(c, affine=False))
        self.width = width

    def condition(self, targets: torch.Tensor) -> torch.Tensor:
        """``mapping(targets @ E)`` for soft or one-hot ``targets`` of shape [batch, num_classes]."""
        if targets.dim() != 2 or targets.shape[1] != self.num_classes:
            raise ValueError(f"targets must be [batch, {self.num_classes}], got {tuple(targets.shape)}")
        return self.mapping(targets.to(self.embedding.weight.dtype) @ self.embedding.weight)

    def forward(self, z: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = z * self.condition(targets)
        if extra is not None:
            h = h + extra
        x = self.bn0(self.fc(h).reshape(len(z), self.width, self.h0, self.w0))
        return self.up(x)
