"""Local assets: the CIFAR-10 data directory and the pretrained weights kept in it.

Registry models never download anything; their pretrained weights are files found here.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CIFAR10_ENV", "LOCAL_PRETRAINED", "REPO_PRETRAINED", "default_cifar10_dir", "local_pretrained"]

CIFAR10_ENV = "DFQKERN_CIFAR10_DIR"
# registry name -> file, relative to the shared data folder (the parent of default_cifar10_dir())
LOCAL_PRETRAINED = {
    "cifar10_resnet20": "cifar10/resnet20-12fca82f.th",
    "cifar10_convmixer_256_8": "models/convmixer_256_8/convmixer-256-8-p4-cifar10.pth",
}
# registry name -> (file relative to the repository root, the command that trains it): weights the bench
# scripts train and commit
REPO_PRETRAINED = {
    "cifar10_vit_qkv": ("bench/weights/cifar10_vit_qkv.safetensors", "python bench/train_cifar_vit.py --variant qkv"),
    "cifar10_vit_mha": ("bench/weights/cifar10_vit_mha.safetensors", "python bench/train_cifar_vit.py --variant mha"),
}


def default_cifar10_dir() -> Path:
    """$DFQKERN_CIFAR10_DIR, else ``<repo root>/../shared/data/cifar10``."""
    env = os.environ.get(CIFAR10_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def local_pretrained(name: str) -> Path:
    """The local pretrained-weights file of registry model ``name``."""
    if name in REPO_PRETRAINED:
        rel, command = REPO_PRETRAINED[name]
        path = Path(__file__).resolve().parents[1] / rel
        if not path.is_file():
            raise FileNotFoundError(f"pretrained=True: {name!r} has no trained weights here ({path} is missing); "
                                    f"train them with `{command}`, or pass checkpoint=")
        return path
    if name not in LOCAL_PRETRAINED:
        raise ValueError(f"pretrained=True: no pretrained weights are known for {name!r} "
                         f"(available: {sorted([*LOCAL_PRETRAINED, *REPO_PRETRAINED])}); pass checkpoint= instead")
    return default_cifar10_dir().parent / LOCAL_PRETRAINED[name]
