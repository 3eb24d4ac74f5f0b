"""Small CIFAR-10 vision transformers (patch 4, class token, pre-LayerNorm blocks, GELU MLP, MHSA).

Two variants with the same computation and size, for the two attention families dfqkern quantizes:

* ``qkv``: timm-style blocks whose attention has one fused ``qkv`` Linear (:class:`QKVAttention`);
* ``mha``: torch's own ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (``norm_first``,
  GELU), i.e. ``nn.MultiheadAttention`` and the encoder layer's eval fast path.

Registered as ``cifar10_vit_qkv`` / ``cifar10_vit_mha`` (:mod:`dfqkern.models`); weights trained by
``bench/train_cifar_vit.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("qkv", "mha")


class QKVAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), QKVAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CifarViT(nn.Module):
    """ViT for 32x32 images: ``patch``x``patch`` patch embedding, class token, learned position
    embedding, ``depth`` pre-norm blocks, final LayerNorm, linear head on the class token."""

    def __init__(self, variant: str = "qkv", num_classes: int = 10, dim: int = 128, depth: int = 6,
                 num_heads: int = 4, mlp_ratio: float = 2.0, patch: int = 4, img_size: int = 32):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if img_size % patch:
            raise ValueError(f"img_size={img_size} must be a multiple of patch={patch}")
        self.variant = variant
        hidden = int(dim * mlp_ratio)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, dim))
        if variant == "qkv":
            self.blocks = nn.Sequential(*[Block(dim, num_heads, hidden) for _ in range(depth)])
        else:
            layer = nn.TransformerEncoderLayer(dim, num_heads, hidden, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
