"""Train the CIFAR-10 edge networks (ShuffleNetV2-x0.5, MobileNetV2-x0.35) briefly on 2 CPU cores.

    python bench/train_edge_cifar10.py --arch cifar10_shufflenetv2_x0_5 --epochs 4
    python bench/train_edge_cifar10.py --arch cifar10_mobilenetv2_x0_35 --epochs 5

Their only job is to be meaningful float models of the depthwise / channel-shuffle families for the
calibration benchmark (bench/accuracy_edge_cifar10.py), not to be state of the art: SGD + one-cycle
learning rate, random crop and flip, a few epochs. The 50,000 training JPEGs are decoded once into a
uint8 tensor. Weights land in ``bench/weights/<arch>.safetensors`` (written atomically, with the dev
top-1 in the metadata).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfqkern.data import build_transform, default_cifar10_dir, open_dataset  # noqa: E402
from dfqkern.evaluation import evaluate_top1  # noqa: E402
from dfqkern.models import create_model  # noqa: E402
from dfqkern.model_info import model_info

WEIGHTS_DIR = ROOT / "bench" / "weights"


def decode_uint8(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms.functional import pil_to_tensor

    xs, ys = [], []
    for i in tqdm(range(len(dataset)), desc="decode", mininterval=2.0):
        img, label = dataset[i]
        xs.append(pil_to_tensor(img.convert("RGB")))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-px zero-padded image, random horizontal flip (uint8 in, uint8 out)."""
    b = len(x)
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(b, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(b, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=["cifar10_shufflenetv2_x0_5", "cifar10_mobilenetv2_x0_35"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else default_cifar10_dir()
    model = create_model(args.arch)
    spec = model_info(model).input_spec
    mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
    x_all, y_all = decode_uint8(open_dataset(data_dir / "cifar10_train_jpeg.tar.gz"))
    steps_per_epoch = len(x_all) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-5, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.25)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=5.0)
        for s in bar:
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x = (augment(x_all[idx], gen).float() / 255 - mean) / std
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if s % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    dev = open_dataset(data_dir / "cifar10_test_dev_jpeg.tar.gz", build_transform(spec),
                       labels_csv=data_dir / "cifar10_test_dev_labels.csv")
    top1 = evaluate_top1(model, dev, batch_size=500)["top1"]
    minutes = (time.time() - t0) / 60
    print(f"{args.arch}: dev top-1 {top1:.2f} % after {args.epochs} epochs ({minutes:.1f} min)")
    from safetensors.torch import save_file

    out = Path(args.out) if args.out else WEIGHTS_DIR / f"{args.arch}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"arch": args.arch, "epochs": str(args.epochs), "seed": str(args.seed),
                        "dev_top1": f"{top1:.2f}", "train_minutes": f"{minutes:.1f}"})
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
