"""CIFAR-sized edge networks: ShuffleNetV2- and MobileNetV2-style, written here (not library classes).

The layouts follow the published architectures (Ma et al. 2018, Sandler et al. 2018) adapted to
32x32 inputs the usual way (3x3 stride-1 stem, no max-pool, so the stages run at 32/16/8/4 px).
Their blocks are deliberately *not* registered anywhere: calibration must find them as blocks
from their structure (split / concat / residual around the convolutions), as it would a user's copy.
"""
from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits the channels and transforms one half; stride 2 transforms
    the whole input along two branches (both with a depthwise 3x3). Concat, then channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin, relu=False),
                                         *_conv_bn(cin, half, 1))
            b2_in = cin
        else:
            if cin != cout:
                raise ValueError("a stride-1 ShuffleUnit keeps its width")
            b2_in = half
        self.branch2 = nn.Sequential(*_conv_bn(b2_in, half, 1), *_conv_bn(half, half, 3, stride, groups=half, relu=False),
                                     *_conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class CifarShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs; ``widths`` are the stem, three stage and last-conv channels (x0.5: 24/48/96/192/1024)."""

    def __init__(self, num_classes: int = 10, widths=(24, 48, 96, 192, 1024), repeats=(4, 8, 4)):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0], 3))
        stages, cin = [], widths[0]
        for cout, n in zip(widths[1:4], repeats):
            stages.append(nn.Sequential(ShuffleUnit(cin, cout, 2), *[ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(*_conv_bn(cin, widths[4], 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.stages(self.stem(x)))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), depthwise 3x3 (ReLU6), 1x1 project (linear); residual
    when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels, repeats, stride) of MobileNetV2, strides adapted to 32x32 inputs
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def _width(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs with a width multiplier (stem stride 1)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 0.5, last_channels: int = 1280):
        super().__init__()
        cin = _width(32 * width_mult)
        blocks: list[nn.Module] = []
        for t, c, n, s in MOBILENETV2_SETTINGS:
            cout = _width(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.stem = nn.Sequential(nn.Conv2d(3, _width(32 * width_mult), 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(_width(32 * width_mult)), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                                  nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def conv_mixer(dim: int = 256, depth: int = 8, kernel: int = 9, patch: int = 4, num_classes: int = 10) -> nn.Sequential:
    """ConvMixer (Trockman & Kolter 2022) in the module layout of the public CIFAR-10 checkpoints
    (kentaroy47/vision-transformers-cifar10): BatchNorm after every GELU, so none can be folded."""
    def block() -> nn.Sequential:
        return nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"), nn.GELU(),
                                   nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))

    return nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(dim),
                         *[block() for _ in range(depth)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(dim, num_classes))
