"""Measure the cause of the reconstruction collapse on a BN-folded network (issue 12's note).

    python bench/diagnostics/target_mismatch.py [--arch cifar10_shufflenetv2_x0_5 --checkpoint PATH]

For every quantized layer (the units of layer-wise reconstruction), compares the two candidate
reconstruction targets on real training images: the float model's module of the same name (what
``calibrate`` used before the fix) and the quantized model's own layer with quantization off (BatchNorm
folded in: what the quantized layer must reproduce). Also checks that folding BatchNorm (into
depthwise convs too) leaves the float model's outputs unchanged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dfqkern.calib.capture import ActivationStore, capture, quantization_disabled  # noqa: E402
from dfqkern.calib.units import find_units  # noqa: E402
from dfqkern.config import QuantConfig  # noqa: E402
from dfqkern.data import build_transform, calibration_tensor, default_cifar10_dir, open_dataset  # noqa: E402
from dfqkern.models import create_model  # noqa: E402
from dfqkern.quantize import quantize_model  # noqa: E402
from dfqkern.model_info import model_info


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="cifar10_shufflenetv2_x0_5")
    p.add_argument("--checkpoint", default=str(ROOT / "bench" / "weights" / "cifar10_shufflenetv2_x0_5.safetensors"))
    p.add_argument("--images", type=int, default=128)
    args = p.parse_args(argv)
    fp = create_model(args.arch, checkpoint=args.checkpoint)
    train = open_dataset(default_cifar10_dir() / "cifar10_train_jpeg.tar.gz", build_transform(model_info(fp).input_spec))
    x = calibration_tensor(train, args.images, seed=0)
    q = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=4))
    with torch.no_grad(), quantization_disabled(q):
        a, b = fp(x), q(x)
    print(f"BN folding: max |logit difference| {float((a - b).abs().max()):.2e} "
          f"(logits up to {float(a.abs().max()):.1f}); folded BatchNorms: {len(model_info(q).report.folded_bn)}")
    folded_convs = set(model_info(q).report.folded_bn.values())
    print("| layer | BN folded | rel. squared error of the old target |\n|---|---|---|")
    for unit in find_units(q, blockwise=False):
        with ActivationStore(1e9) as store, quantization_disabled(q):
            capture(q, unit.module, x, 64, store, output_name="right", module_name=unit.name)
            capture(fp, fp.get_submodule(unit.name), x, 64, store, output_name="old", module_name=unit.name)
            idx = torch.arange(len(x))
            right, old = store.rows("right", idx), store.rows("old", idx)
        rel = float((old - right).pow(2).sum() / right.pow(2).sum())
        print(f"| {unit.name} | {'yes' if unit.name in folded_convs else 'no'} | {rel:.3g} |")


if __name__ == "__main__":
    main()
