"""What the report tests build: the digits CNN (random weights, non-trivial BatchNorm statistics so
folding matters), its quantized copies, and a synthetic set with known mixup labels."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import dfqkern
from dfqkern.models import create_model

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# (classes, weights) of the synthetic images: mixup pairs and one single-class image
LABELS = [([3, 7], [0.6, 0.4]), ([1, 8], [0.75, 0.25]), ([5], [1.0])]


def float_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def write_synthetic(root: Path) -> Path:
    from dfqkern.datagen.store import SyntheticSetWriter

    entries = [{"classes": c, "weights": w} for c, w in LABELS]
    writer = SyntheticSetWriter(root, entries=entries, config={"source": "test", "label_mode": "mixup"},
                                meta={"source": "test", "class_names": CLASS_NAMES, "num_classes": 10,
                                      "generator": {"id": "test/solid"}, "label_type": "soft"},
                                channels=1, shard_size=8)
    for i in range(len(entries)):
        writer.write_image(i, torch.full((1, 8, 8), 40 * (i + 1), dtype=torch.uint8))
    writer.finish_shard(0)
    writer.finalize()
    return root


def quantize(fp: nn.Module, images: torch.Tensor, **config) -> nn.Module:
    """Fake-quant (unpacked) model: save_quantized packs a copy, the test keeps the float weights."""
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_observer="minmax", act_observer="minmax", **config))
    dfqkern.calibrate_activations(q, images, progress=False)
    return q
