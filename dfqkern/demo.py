"""``dfqkern demo``: the whole data-free job on an embedded default, offline, on 2 CPU cores.

Trains (once, cached) a small BatchNorm CNN on scikit-learn's bundled 8x8 digits, then forgets
the training data: calibration images come from inverting the model's own BatchNorm statistics
with mixup soft labels. It quantizes at W8A8 (observer), W4A4 and W2A4 (QDrop reconstruction),
packs, saves, reloads the packed checkpoints and reports FP vs quantized accuracy on held-out
digits, checkpoint size and packed batch-1 latency, and writes a ``dfqkern report`` of the run
(skipped, with a line saying why, without matplotlib).
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
from .model_info import model_info

# (scheme, calibration method): observer ranges only at 8 bits, reconstruction below
DEMO_SCHEMES = (("w8a8", "observer"), ("w4a4", "qdrop"), ("w2a4", "qdrop"))


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


LATENCY_REPEATS, LATENCY_WARMUP = 50, 5


def batch_latency_ms(model, x) -> tuple[float, float]:
    """(median, min) latency in ms of ``model(x)``, timed by ``dfqkern bench``'s harness (the first call and
    the warm-up are not timed); on a busy machine the median shows the contention, the min the kernels."""
    from .benchmark import measure

    with torch.inference_mode():
        t = measure(lambda: model(x), warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS)
    return t.median_ms, t.min_ms


def run_demo(out: str | os.PathLike | None = None, schemes=DEMO_SCHEMES, seed: int = 0, progress: bool = True,
             num_synthetic: int = 256, gen_iters: int = 200, calib_iters: int = 300, print_fn=print) -> list[dict]:
    from .calib import CalibConfig, calibrate
    from .data import digits_dataset
    from .datagen.store import load_synthetic
    from .formats import QuantScheme
    from .pipeline import generate_bn_inversion, tensor_transform

    model = train_digits_model(seed=seed, progress=progress)
    x_test, y_test = digits_dataset("test", seed).tensors
    fp_acc = _accuracy(model, x_test, y_test)
    out_root = Path(out) if out else Path(tempfile.mkdtemp(prefix="dfqkern-demo-"))
    # Data-free from here on: synthetic images from BN-statistics inversion with mixup soft labels.
    syn_dir = generate_bn_inversion(model, out_root / "synthetic", num_synthetic, method="dgh", label_mode="mixup",
                                    iters=gen_iters, batch_size=64, seed=seed)
    syn = load_synthetic(syn_dir, transform=tensor_transform(model_info(model).input_spec))
    x_calib = torch.stack([syn[i][0] for i in range(len(syn))])
    fp_ms, fp_min_ms = batch_latency_ms(model, x_test[:1])
    rows = []
    for name, method in schemes:
        s = QuantScheme.parse(name)
        q = quantize_model(model, QuantConfig(weight_bits=s.wbits, act_bits=s.abits, seed=seed))
        calibrate_activations(q, x_calib, progress=False)
        if method != "observer":
            q = calibrate(q, model, x_calib, CalibConfig(method=method, iters=calib_iters, seed=seed,
                                                          progress=progress))
        pack_model(q)
        ckpt = save_quantized(q, out_root / f"digits_cnn_{name}", overwrite=True)
        reloaded = load_quantized(ckpt)
        summ = checkpoint_summary(ckpt)
        packed_ms, packed_min_ms = batch_latency_ms(reloaded, x_test[:1])
        rows.append({"scheme": name, "method": method, "fp_top1": fp_acc,
                     "quant_top1": _accuracy(reloaded, x_test, y_test), "checkpoint": str(ckpt),
                     "checkpoint_bytes": summ["checkpoint_bytes"], "float_bytes": summ["float_bytes"],
                     "packed_ms": packed_ms, "packed_min_ms": packed_min_ms, "float_ms": fp_ms,
                     "float_min_ms": fp_min_ms})
    print_fn(f"digits_cnn, {len(y_test)} held-out digits; calibrated on {len(x_calib)} synthetic images "
             f"(BN inversion, mixup labels; no training data)")
    print_fn(f"{'scheme':6} {'method':8} {'FP top-1':>9} {'quant top-1':>12} {'drop':>6} {'ckpt KiB':>9} "
             f"{'float KiB':>10} {'packed ms (min)':>16} {'float ms (min)':>15}")
    for r in rows:
        print_fn(f"{r['scheme']:6} {r['method']:8} {r['fp_top1']:8.2f}% {r['quant_top1']:11.2f}% "
                 f"{r['fp_top1'] - r['quant_top1']:6.2f} {r['checkpoint_bytes'] / 1024:9.1f} "
                 f"{r['float_bytes'] / 1024:10.1f} {r['packed_ms']:8.3f} ({r['packed_min_ms']:.3f}) "
                 f"{r['float_ms']:7.3f} ({r['float_min_ms']:.3f})")
    print_fn(f"latency: batch 1, {torch.get_num_threads()} thread(s), median (min) of {LATENCY_REPEATS} calls after "
             f"{LATENCY_WARMUP} untimed warm-up calls, as `dfqkern bench` times them; a busy machine shows in the "
             f"median, not the min")
    print_fn(f"packed checkpoints and the synthetic set (samples.png) in {out_root}")
    write_demo_report(out_root, model, x_calib, syn_dir, rows, print_fn)
    return rows


def write_demo_report(out_root: Path, model, x_calib, syn_dir, rows: list[dict], print_fn=print) -> Path | None:
    """``dfqkern report`` of the demo's checkpoints into ``out_root/report`` (the accuracies measured
    above, SQNR against the trained float model on 16 synthetic images); None, with a line saying so,
    when matplotlib (the ``report`` extra) is missing."""
    from .report import ReportJob, require_matplotlib, write_report
    from .report.write import REPORT_HTML, REPORT_MD

    try:
        require_matplotlib()
    except ImportError as e:
        print_fn(f"report skipped: {e}")
        return None
    summaries = [{"out": r["checkpoint"], "method": r["method"], "fp_top1": r["fp_top1"], "quant_top1": r["quant_top1"],
                  "drop": round(r["fp_top1"] - r["quant_top1"], 2)} for r in rows]
    out = write_report(ReportJob(run=out_root, out=out_root / "report", overwrite=True, float_model=model,
                                 float_label="digits_cnn as trained by the demo", calib_images=x_calib, num_calib=16,
                                 synthetic=syn_dir, summaries=summaries))
    print_fn(f"report: {out / REPORT_MD} (+ PNGs) and {out / REPORT_HTML} (self-contained)")
    return out
