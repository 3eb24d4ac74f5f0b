"""A trained QAT generator's samples as a SyntheticSet (``--calib-data synthetic:DIR`` reads it back)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .generator import ConditionalGenerator


@torch.no_grad()
def save_generated_set(generator: ConditionalGenerator, out_dir: str, num_images: int, *, mean: Sequence[float],
                       std: Sequence[float], seed: int = 0, batch_size: int = 64, shard_size: int = 256,
                       overwrite: bool = False) -> Path:
    """``num_images`` images from ``generator`` (classes dealt in turn, one-hot targets, noise from ``seed``)
    written as a SyntheticSet in ``out_dir``; images are de-normalized with ``mean`` / ``std`` (the model's
    input normalization) and stored as 8-bit PNGs. The generator runs in eval mode (running BN statistics)."""
    from .._version import __version__
    from ..datagen.store import SyntheticSetWriter, to_uint8, to_unit_range

    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    k = generator.num_classes
    labels = [i % k for i in range(num_images)]
    entries = [{"classes": [c], "weights": [1.0], "seed": seed} for c in labels]
    config = {"source": "qat-generator", "seed": seed, "num_images": num_images, "mean": list(map(float, mean)),
              "std": list(map(float, std)), "generator_sha256": _state_digest(generator)}
    meta = {"source": "qat-generator", "generator": {"id": "qat/conditional", "library": "dfqkern",
                                                     "version": __version__},
            "class_names": None, "num_classes": k, "label_type": "soft",
            "normalization": {"mean": config["mean"], "std": config["std"], "clamped": True}}
    writer = SyntheticSetWriter(out_dir, entries=entries, config=config, meta=meta,
                                channels=generator.image_shape[0], shard_size=shard_size, overwrite=overwrite)
    device = generator.embedding.weight.device
    rng = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, num_images, batch_size):
            idx = list(range(start, min(num_images, start + batch_size)))
            z = torch.randn(len(idx), generator.latent_dim, generator=rng).to(device)
            targets = torch.nn.functional.one_hot(torch.tensor([labels[i] for i in idx]), k).float().to(device)
            extra = generator.position(torch.zeros(len(idx), 2, device=device)) if hasattr(generator, "position") \
                else None
            images = to_uint8(to_unit_range(generator(z, targets, extra), mean, std))
            for i, img in zip(idx, images):
                writer.write_image(i, img)
        for s in range(writer.num_shards):
            writer.finish_shard(s)
    finally:
        generator.train(was_training)
    return writer.finalize()


def _state_digest(module: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
