"""Tiny random-init models and data for the calibration tests (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfqkern.config import QuantConfig
from dfqkern.models import CifarBasicBlock
from dfqkern.quantize import quantize_model


class TinyCNN(nn.Module):
    """Stem conv-BN-ReLU, two CIFAR basic blocks (one downsampling), pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer = nn.Sequential(CifarBasicBlock(8, 8), CifarBasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))




def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so folding matters
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.fixture
def randomize_bn():
    """``randomize_bn(model, generator)``: non-trivial BatchNorm statistics, in place."""
    return _randomize_bn


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        _randomize_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def tiny_vit() -> nn.Module:
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    return timm_vit.VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                                      num_heads=2, mlp_ratio=2.0).eval()


@pytest.fixture
def vit_images() -> torch.Tensor:
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def quantize():
    """``quantize(model, wbits=4, abits=4, **QuantConfig fields)`` -> fake-quant model (a coarse 20-point
    MSE observer grid keeps the tests fast)."""
    def make(model: nn.Module, wbits: int = 4, abits: int | None = 4, **kw) -> nn.Module:
        return quantize_model(model, QuantConfig(weight_bits=wbits, act_bits=abits, **{"grid": 20, **kw}))
    return make


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test in this folder runs on one thread (``one_thread`` in tests/conftest.py)."""
