"""Train a small CIFAR-10 ViT (dfqkern.vit_nets) on 2 CPU cores: the float model the ViT benchmarks quantize.

    python bench/train_cifar_vit.py --variant qkv                      # the ~90-minute run (--epochs auto)
    python bench/train_cifar_vit.py --variant mha --epochs 10
    python bench/train_cifar_vit.py --variant qkv --smoke-seconds 60 --train-limit 4096 --out-dir /tmp/vit

Patch 4, class token, pre-LayerNorm, GELU MLP, multi-head self-attention (``qkv``: fused timm-style
projection; ``mha``: nn.TransformerEncoder). AdamW with linear warmup then cosine decay, label
smoothing, random crop (4-px zero padding) and horizontal flip. ``--epochs auto`` (the default) times
20 training steps and takes as many epochs as fit in ``--budget-min`` minutes (the cosine schedule
needs the count up front; it is recorded in the resume state). The training JPEGs are decoded once
into a uint8 tensor kept in memory. Every epoch ends with a resume state
(``<out>/cifar10_vit_<variant>.resume.pt``, weights-only torch file): rerunning the same command
after a kill continues from the last finished epoch. The training log
(``cifar10_vit_<variant>.log.jsonl``: one JSON line per epoch: loss, accuracy, images/s, minutes,
and the dev top-1 when evaluated) and the final weights (``cifar10_vit_<variant>.safetensors``,
dev top-1 in the metadata; what ``create_model("cifar10_vit_<variant>", pretrained=True)`` reads)
are written beside each other, atomically. ``--smoke-seconds`` trains that long, prints the
throughput and writes nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dfqkern.data import default_cifar10_dir, open_dataset  # noqa: E402
from dfqkern.models import create_model  # noqa: E402
from train_edge_cifar10 import augment, decode_uint8  # noqa: E402  (one crop / flip, one decoder)
from dfqkern.model_info import model_info

WEIGHTS_DIR = ROOT / "bench" / "weights"
VARIANTS = ("qkv", "mha")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=VARIANTS, default="qkv")
    p.add_argument("--epochs", default="auto", help="an int, or 'auto': as many as fit in --budget-min (default)")
    p.add_argument("--budget-min", type=float, default=85.0, help="training minutes --epochs auto plans for")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=2, help="dev top-1 every N epochs (and after the last)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: ../shared/data/cifar10)")
    p.add_argument("--out-dir", default=str(WEIGHTS_DIR))
    p.add_argument("--train-limit", type=int, default=None, help="decode only the first N training images")
    p.add_argument("--smoke-seconds", type=float, default=None,
                   help="train this long, print images/s and the epoch estimate, write nothing")
    args = p.parse_args(argv)
    if args.epochs != "auto":
        try:
            args.epochs = int(args.epochs)
        except ValueError:
            p.error(f"--epochs must be an int or 'auto', got {args.epochs!r}")
        if args.epochs < 1:
            p.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.budget_min > 0:
        p.error(f"--budget-min must be > 0, got {args.budget_min}")
    for name in ("batch_size", "threads", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or not 0 <= args.label_smoothing < 1:
        p.error("--lr must be > 0, --weight-decay and --warmup-epochs >= 0, --label-smoothing in [0, 1)")
    if args.train_limit is not None and args.train_limit < args.batch_size:
        p.error(f"--train-limit must be >= --batch-size ({args.batch_size}), got {args.train_limit}")
    if args.smoke_seconds is not None and not args.smoke_seconds > 0:
        p.error(f"--smoke-seconds must be > 0, got {args.smoke_seconds}")
    data_dir = Path(args.data_dir) if args.data_dir else default_cifar10_dir()
    for f in ("cifar10_train_jpeg.tar.gz", "cifar10_test_dev_jpeg.tar.gz"):
        if not (data_dir / f).is_file():
            p.error(f"--data-dir: {data_dir / f} does not exist")
    args.data_dir = data_dir
    return args


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _fingerprint(args) -> str:
    """What a resume state must agree on (the schedule and the data), so a changed command starts over."""
    keys = ("variant", "budget_min" if args.epochs == "auto" else "epochs", "batch_size", "lr", "weight_decay",
            "warmup_epochs", "label_smoothing", "seed", "train_limit")
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode()).hexdigest()


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, x_u8: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x_u8), batch_size):
        x = (x_u8[i:i + batch_size].float() / 255 - mean) / std
        correct += int((model(x).argmax(1) == y[i:i + batch_size]).sum())
    model.train()
    return 100.0 * correct / len(x_u8)


def plan_epochs(model, x_all, y_all, args, mean, std, steps_per_epoch: int, steps: int = 20) -> int:
    """Epochs that fit in ``args.budget_min``, from the time of ``steps`` training steps on a copy of the
    model (the real run starts from the untouched initialisation); 8 % is kept for the dev evaluations."""
    import copy

    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(12345)
    t0 = None
    for s in range(steps + 2):
        if s == 2:  # the first steps allocate
            t0 = time.time()
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        x = (augment(x_all[idx], gen).float() / 255 - mean) / std
        loss = F.cross_entropy(probe(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    epoch_s = (time.time() - t0) / steps * steps_per_epoch
    epochs = max(1, int(0.92 * args.budget_min * 60 / epoch_s))
    print(f"--epochs auto: {epoch_s / 60:.1f} min per epoch measured -> {epochs} epochs in {args.budget_min} min")
    return epochs


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    arch = f"cifar10_vit_{args.variant}"
    out_dir = Path(args.out_dir)
    weights, log_path, resume_path = (out_dir / f"{arch}.safetensors", out_dir / f"{arch}.log.jsonl",
                                      out_dir / f"{arch}.resume.pt")
    model = create_model(arch)
    spec = model_info(model).input_spec
    mean, std = torch.tensor(spec.mean).reshape(1, 3, 1, 1), torch.tensor(spec.std).reshape(1, 3, 1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{arch}: {n_params / 1e6:.2f} M parameters ({4 * n_params / 2 ** 20:.1f} MiB float32)")

    train = open_dataset(args.data_dir / "cifar10_train_jpeg.tar.gz")
    if args.train_limit is not None:  # evenly spread: the archive is ordered by class
        stride = max(1, len(train) // args.train_limit)
        train = torch.utils.data.Subset(train, list(range(0, len(train), stride))[:args.train_limit])
    t_decode = time.time()
    x_all, y_all = decode_uint8(train)
    print(f"decoded {len(x_all)} training images in {time.time() - t_decode:.0f} s")

    steps_per_epoch = len(x_all) // args.batch_size
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on norms, biases, tokens, position embedding
        (no_decay if p.dim() < 2 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, elapsed = 0, 0.0
    fingerprint = _fingerprint(args)
    resumed = False
    if args.smoke_seconds is None and resume_path.is_file():
        state = torch.load(resume_path, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start_epoch, elapsed, args.epochs = int(state["epoch"]), float(state["elapsed"]), int(state["epochs"])
            resumed = True
            print(f"resuming after epoch {start_epoch} of {args.epochs} ({elapsed / 60:.1f} min trained)")
        else:
            print(f"{resume_path} is from another command (different settings): starting over")
    if args.epochs == "auto":
        args.epochs = plan_epochs(model, x_all, y_all, args, mean, std, steps_per_epoch) \
            if args.smoke_seconds is None else 1
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    if not resumed and args.smoke_seconds is None:
        print(f"training {args.epochs} epochs of {steps_per_epoch} steps")

    dev_x = dev_y = None
    model.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x = (augment(x_all[idx], gen).float() / 255 - mean) / std
            logits = model(x)
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
            if args.smoke_seconds is not None and time.time() - t0 >= args.smoke_seconds:
                rate = seen / (time.time() - t0)
                budget_epochs = 0.92 * args.budget_min * 60 / (50_000 / rate)
                print(json.dumps({"smoke_steps": s + 1, "images_per_s": round(rate, 1), "loss": round(loss.item(), 4),
                                  "seconds_per_epoch_50k": round(50_000 / rate), "epochs_in_budget": round(
                                      budget_epochs, 1)}))
                return
            if s % 50 == 0:
                print(f"epoch {epoch + 1} step {s}/{steps_per_epoch} loss {loss.item():.3f} "
                      f"{seen / (time.time() - t0):.0f} img/s", flush=True)
        dt = time.time() - t0
        elapsed += dt
        rec = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4), "train_acc": round(100 * correct / seen, 2),
               "lr_end": lr_at((epoch + 1) * steps_per_epoch - 1, total, warmup, args.lr),
               "images_per_s": round(seen / dt, 1), "minutes": round(elapsed / 60, 2)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            if dev_x is None:
                dev_x, dev_y = decode_uint8(open_dataset(args.data_dir / "cifar10_test_dev_jpeg.tar.gz"))
            rec["dev_top1"] = round(evaluate(model, dev_x, dev_y, mean, std), 2)
        print(json.dumps(rec), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps({"arch": arch, **rec}) + "\n")
        _atomic_torch_save({"fingerprint": fingerprint, "model": model.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "epoch": epoch + 1, "epochs": args.epochs, "elapsed": elapsed},
                           resume_path)

    model.eval()
    if dev_x is None:
        dev_x, dev_y = decode_uint8(open_dataset(args.data_dir / "cifar10_test_dev_jpeg.tar.gz"))
    top1 = evaluate(model, dev_x, dev_y, mean, std)
    from safetensors.torch import save_file

    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"arch": arch, "epochs": str(args.epochs), "seed": str(args.seed), "dev_top1": f"{top1:.2f}",
                        "train_minutes": f"{elapsed / 60:.1f}", "settings": json.dumps(vars(args), default=str)})
    os.replace(tmp, weights)
    resume_path.unlink(missing_ok=True)
    print(f"{arch}: dev top-1 {top1:.2f} % after {args.epochs} epochs ({elapsed / 60:.1f} min); wrote {weights}")


if __name__ == "__main__":
    main()
