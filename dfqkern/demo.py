"""``dfqkern demo``: the whole job on an embedded default, offline, in about a minute on 2 CPU cores.

Trains (once, cached) a small BatchNorm CNN on scikit-learn's bundled 8x8 digits, quantizes it
with observer calibration at W8A8 and W4A8, packs, saves, reloads the packed checkpoint and
reports FP vs quantized accuracy on held-out digits and the checkpoint size.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import QuantConfig
from .io import checkpoint_summary, load_quantized, save_quantized
from .quantize import calibrate_activations, pack_model, quantize_model

DEMO_SCHEMES = ("w8a8", "w4a8")


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("DFQKERN_CACHE_DIR") or user_cache_dir("dfqkern"))


def train_digits_model(epochs: int = 30, seed: int = 0, progress: bool = True) -> torch.nn.Module:
    """The demo's float model: loaded from the cache, or trained (seeded) and cached atomically."""
    from safetensors.torch import load_file, save_file

    from .data import digits_dataset
    from .models import create_model

    model = create_model("digits_cnn")
    path = cache_dir() / f"digits_cnn_e{epochs}_s{seed}.safetensors"
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:  # noqa: BLE001 - a broken cache entry is retrained, not fatal
            path.unlink(missing_ok=True)
    torch.manual_seed(seed)
    x, y = digits_dataset("train", seed).tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train digits_cnn", disable=not progress, leave=False):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model


def _accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def run_demo(out: str | os.PathLike | None = None, schemes=DEMO_SCHEMES, seed: int = 0, progress: bool = True,
             print_fn=print) -> list[dict]:
    from .data import digits_dataset
    from .formats import QuantScheme

    model = train_digits_model(seed=seed, progress=progress)
    x_test, y_test = digits_dataset("test", seed).tensors
    x_calib = digits_dataset("train", seed).tensors[0][:256]
    fp_acc = _accuracy(model, x_test, y_test)
    out_root = Path(out) if out else Path(tempfile.mkdtemp(prefix="dfqkern-demo-"))
    rows = []
    for name in schemes:
        s = QuantScheme.parse(name)
        q = quantize_model(model, QuantConfig(weight_bits=s.wbits, act_bits=s.abits, seed=seed))
        calibrate_activations(q, x_calib, progress=False)
        pack_model(q)
        ckpt = save_quantized(q, out_root / f"digits_cnn_{name}", overwrite=True)
        reloaded = load_quantized(ckpt)
        summ = checkpoint_summary(ckpt)
        rows.append({"scheme": name, "fp_top1": fp_acc, "quant_top1": _accuracy(reloaded, x_test, y_test),
                     "checkpoint": str(ckpt), "checkpoint_bytes": summ["checkpoint_bytes"],
                     "float_bytes": summ["float_bytes"]})
    print_fn(f"digits_cnn on {len(y_test)} held-out digits (observer calibration on {len(x_calib)} train images)")
    print_fn(f"{'scheme':8} {'FP top-1':>9} {'quant top-1':>12} {'drop':>6} {'ckpt KiB':>9} {'float KiB':>10}")
    for r in rows:
        print_fn(f"{r['scheme']:8} {r['fp_top1']:8.2f}% {r['quant_top1']:11.2f}% {r['fp_top1'] - r['quant_top1']:6.2f}"
                 f" {r['checkpoint_bytes'] / 1024:9.1f} {r['float_bytes'] / 1024:10.1f}")
    print_fn(f"packed checkpoints in {out_root}")
    return rows
