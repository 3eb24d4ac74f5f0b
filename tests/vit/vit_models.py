"""Tiny random-weight attention models of every kind dfqkern.nn.attention handles (CPU, seconds).

A plain module (not only a conftest) so the fresh processes of the reload tests rebuild them by name."""
from __future__ import annotations

import pytest
import torch

from dfqkern.vit_nets import CifarViT

# name -> (factory building the float model, input size). Factories are module-level functions so a
# fresh process (the reload tests) can rebuild the same architecture by name.


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                             mlp_ratio=2.0)


def timm_swin():
    """Two stages of two blocks: the second block of each stage has shifted windows (the mask path)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                           num_classes=10)


def torchvision_vit():
    """torchvision's VisionTransformer (vit_b_16's class) at a tiny size: nn.MultiheadAttention inside."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def vit_qkv():
    return CifarViT("qkv", dim=32, depth=2, num_heads=2)


def vit_mha():
    return CifarViT("mha", dim=32, depth=2, num_heads=2)


MODELS = {"timm_vit": (timm_vit, 16), "timm_swin": (timm_swin, 32), "torchvision_vit": (torchvision_vit, 32),
          "vit_qkv": (vit_qkv, 32), "vit_mha": (vit_mha, 32)}


def build(name: str, seed: int = 0):
    """``(float model in eval mode, images)`` for ``name`` in MODELS, deterministic in ``seed``."""
    factory, size = MODELS[name]
    if name.startswith("timm"):
        pytest.importorskip("timm", reason="timm is an optional dependency (dfqkern[models])")
    if name.startswith("torchvision"):
        pytest.importorskip("torchvision", reason="torchvision is an optional dependency")
    torch.manual_seed(seed)
    model = factory().eval()
    # random-init ViTs have near-zero logits; larger weights give the attention maps some structure
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model, torch.randn(24, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
