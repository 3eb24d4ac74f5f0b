"""Tiny random models for the QAT tests (CPU, one thread, seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfqkern.config import QuantConfig
from dfqkern.models import CifarBasicBlock
from dfqkern.quantize import calibrate_activations, quantize_model
from model_helpers import randomize_bn

IMAGE_SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    """Stem conv-BN-ReLU, one CIFAR basic block, pool, linear: BN to invert, a block to tap."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = CifarBasicBlock(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.block(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyNet(), torch.Generator().manual_seed(1), weight=0.5, bias=0.1).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(32, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def make_student(teacher, images):
    """``make_student(wbits=4, abits=4)``: the teacher quantized and observer-calibrated."""
    def make(wbits: int = 4, abits: int = 4, **kw):
        q = quantize_model(teacher, QuantConfig(weight_bits=wbits, act_bits=abits, grid=20, **kw))
        calibrate_activations(q, images, progress=False)
        return q
    return make


@pytest.fixture
def tiny_qat():
    """``tiny_qat(method="gdfq", **fields)``: a QATConfig small enough for a unit test."""
    from dfqkern.qat import QATConfig

    def make(method: str = "gdfq", **kw):
        base = dict(method=method, epochs=2, iters=2, batch_size=8, latent_dim=16, generator_width=16,
                    warmup_epochs=0, progress=False)
        return QATConfig(**{**base, **kw})
    return make


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test in this folder runs on one thread (``one_thread`` in tests/conftest.py)."""
