"""``dfqkern`` command line: argument parsing only; the work lives in the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ._version import __version__
from .model_info import model_info


TRUST_HELP = ("accept a packed checkpoint without config_sha256 / weights_sha256 (written by an older dfqkern); "
              "a hash that is present and wrong is refused regardless")


def _bits_or_none(text: str):
    return None if text.lower() in ("none", "float", "fp") else int(text)


BACKEND_HELP = ("kernel backend of the quantized layers: reference, cpu, triton or cuda (default: picked by device "
                "and $DFQKERN_BACKEND); a forced backend raises rather than falls back")


def _backend(text: str) -> str:
    from .kernels import Backend

    try:
        return Backend.parse(text).value
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default 4)")
    g.add_argument("--abits", type=_bits_or_none, default=8,
                   help="activation bits: 4, 8 or 'none' (default 8; 2 and 3 calibrate in fake-quant through the API "
                        "but have no packed kernel)")
    g.add_argument("--all-layers", action="store_true", help="quantize first and last layer like the rest "
                   "(default: keep them at 8 bits)")
    g.add_argument("--weight-observer", choices=("minmax", "mse"), default="mse")
    g.add_argument("--act-observer", choices=("minmax", "mse"), default="mse")
    g.add_argument("--symmetric-weights", action="store_true")
    g.add_argument("--per-token", action="store_true", help="dynamic per-token activation quantization")
    g.add_argument("--attn-granularity", choices=("per_tensor", "per_head"), default="per_tensor",
                   help="static scales of attention's q / k / v: one per tensor or one per head (default per_tensor)")
    g.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave matching layers in float")
    g.add_argument("--vit-ln-reparam", action="store_true",
                   help="RepQ-ViT: calibrate LayerNorm outputs per channel and fold the ranges into the LayerNorm and "
                        "the Linear layers reading it, so their per-tensor quantizers act per channel (ViTs)")
    g.add_argument("--gelu-abits", type=int, choices=(4, 8),
                   help="activation bits of the Linear layers reading a GELU output (a ViT's fc2 / linear2; default: "
                        "--abits); 8 with --abits 4 removes the largest W4A4 ViT error source")
    g.add_argument("--seed", type=int, default=0)


def _config(args):
    from .config import QuantConfig

    return QuantConfig(weight_bits=args.wbits, act_bits=args.abits, weight_symmetric=args.symmetric_weights,
                       act_granularity="per_token" if args.per_token else "per_tensor",
                       attn_granularity=args.attn_granularity,
                       weight_observer=args.weight_observer, act_observer=args.act_observer,
                       first_last_bits=None if args.all_layers else 8, skip=tuple(args.skip), seed=args.seed,
                       ln_reparam=args.vit_ln_reparam, gelu_act_bits=args.gelu_abits)


def _emit(result, json_out):
    text = json.dumps(result, indent=2, sort_keys=True)
    if json_out:
        from .pipeline import write_json

        write_json(result, json_out)
    print(text)


def _check_json_out(args) -> None:
    if args.json_out:  # before the work, not after it
        from .outputs import check_output_file

        check_output_file(args.json_out, "--json-out")


def cmd_quantize(args) -> int:
    from .pipeline import QuantizeJob, run_quantize

    _check_json_out(args)
    job = QuantizeJob(model=args.model, calib_data=args.calib_data, out=args.out, config=_config(args),
                      checkpoint=args.checkpoint, pretrained=args.pretrained, num_classes=args.num_classes,
                      num_calib=args.num_calib, method=args.method, iters=args.iters, batch_size=args.batch_size,
                      eval_data=args.eval_data, eval_limit=args.eval_limit, overwrite=args.overwrite,
                      device=args.device, resume=not args.no_resume, backend=args.backend,
                      equalize=args.equalize, absorb_bias=args.absorb_bias, equalize_relu6=args.equalize_relu6,
                      bias_correction=args.bias_correction, act_correction=args.act_correction,
                      pd_weight=args.pd_weight)
    _emit(run_quantize(job), args.json_out)
    return 0


def _key_values(items, flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_finetune(args) -> int:
    from .qat import QATConfig
    from .qat.job import FinetuneJob, run_finetune

    _check_json_out(args)
    qat = {"method": args.method, "epochs": args.epochs, "iters": args.iters, "batch_size": args.batch_size,
           "warmup_epochs": args.warmup_epochs, "schedule": args.schedule, "seed": args.seed,
           "options": _key_values(args.set, "--set")}
    qat.update({k: v for k, v in (("student_lr", args.lr), ("generator_lr", args.generator_lr),
                                  ("temperature", args.temperature), ("replay_weight", args.replay_weight))
                if v is not None})
    job = FinetuneJob(model=args.model, calib_data=args.calib_data, out=args.out, config=_config(args),
                      qat=QATConfig(**qat), checkpoint=args.checkpoint, pretrained=args.pretrained,
                      num_classes=args.num_classes, num_calib=args.num_calib, start=args.start,
                      start_iters=args.start_iters, eval_data=args.eval_data, eval_limit=args.eval_limit,
                      overwrite=args.overwrite, device=args.device, resume=not args.no_resume, backend=args.backend,
                      samples_out=args.samples_out, num_samples=args.num_samples)
    _emit(run_finetune(job), args.json_out)
    return 0


def cmd_eval(args) -> int:
    from .pipeline import evaluate_on

    if bool(args.model) == bool(args.quantized):
        raise SystemExit("dfqkern eval: give exactly one of --model (float) or --quantized (packed checkpoint dir)")
    _check_json_out(args)
    if args.quantized:
        from .io import load_quantized

        model = load_quantized(args.quantized, device=args.device, trust_unverified=args.trust_unverified)
    else:
        from .models import create_model

        model = create_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                             pretrained=args.pretrained)
    if args.backend is not None:
        from .quantize import set_backend

        set_backend(model, args.backend)
    res = evaluate_on(model, args.data, args.limit, args.batch_size, args.device)
    res.update(model=args.model or args.quantized, data=args.data)
    _emit(res, args.json_out)
    return 0


def cmd_info(args) -> int:
    from .io import checkpoint_summary

    s = checkpoint_summary(args.checkpoint, trust_unverified=args.trust_unverified)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"{s['path']}: arch={s['arch']} scheme={s['scheme']} (dfqkern {s['package_version']})")
    print(f"{'layer':40} {'kind':7} {'w':>2} {'a':>5}  shape")
    for name, r in s["layers"].items():
        print(f"{name:40} {r['kind']:7} {r['weight_bits']:>2} {str(r['act_bits']):>5}  {r['weight_shape']}")
    for name, why in s["unhandled"].items():
        print(f"{name:40} float   ({why})")
    print(f"size: {s['checkpoint_bytes'] / 1024:.1f} KiB packed vs {s['float_bytes'] / 1024:.1f} KiB float "
          f"({s['compression']:.2f}x smaller)")
    return 0


EXPORT_FORMATS = ("onnx", "pt2")
EXPORT_INSTALL = {"onnx": "pip install dfqkern[export]", "pt2": "torch with torch.export and AOTInductor"}


def _input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: ``C,H,W`` (batch 2 is added) or ``N,C,H,W``."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape takes C,H,W or N,C,H,W (positive ints), got {text!r}")
    return dims if len(dims) == 4 else (2, *dims)


def cmd_export(args) -> int:
    """Load a packed checkpoint and write it as ONNX (QDQ) or as a torch.export / AOTInductor package."""
    import torch

    if args.format != "onnx" and (args.opset is not None or args.target is not None):
        raise SystemExit("dfqkern export: --opset and --target apply to --format onnx only")
    from .export.paths import check_out_file

    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    try:  # before the checkpoint is loaded
        out = check_out_file(args.out, suffix, args.overwrite, why=f" for --format {args.format}", name="--out",
                             overwrite_hint="pass --overwrite")
    except (ValueError, OSError) as e:
        raise SystemExit(f"dfqkern export: {e}") from None
    try:  # the optional dependency is checked before the checkpoint is loaded
        if args.format == "onnx":
            from .export.onnx import export_onnx, require_onnx

            require_onnx()
        else:
            from .export.pt2 import export_pt2
    except ImportError as e:
        raise SystemExit(f"dfqkern export: --format {args.format} is not available: {e} "
                         f"(needs {EXPORT_INSTALL[args.format]})") from None
    from .io import load_quantized

    model = load_quantized(args.checkpoint, trust_unverified=args.trust_unverified)
    shape = args.input_shape
    if shape is None:
        spec = model_info(model).input_spec
        if spec is None:
            raise SystemExit(f"dfqkern export: {args.checkpoint!r} records no input spec; pass --input-shape C,H,W")
        shape = (2, *spec.input_size)
    example = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    if args.format == "onnx":
        path = export_onnx(model, out, example, opset=args.opset, target=args.target or "onnxruntime",
                           overwrite=args.overwrite)
    else:
        path = export_pt2(model, out, example, **({"overwrite": True} if args.overwrite else {}))
    print(f"wrote {path} ({args.format}, input {list(shape)}, batch dimension dynamic)")
    return 0


def _given(args, names) -> dict:
    """The generation options set on the command line; the others keep their config defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


BN_OPTIONS = ("method", "label_mode", "mixup_k", "iters", "batch_size", "seed", "ce_weight", "augment", "jitter",
              "input_prior_weight", "precision", "tv_weight", "l2_weight", "patch_weight", "kde_bandwidth")


def _gen_batch_size(text: str):
    """``--batch-size``: an int, or ``auto`` (fit the free GPU memory; the default on the CPU)."""
    from .datagen.config import AUTO_BATCH

    if text == AUTO_BATCH:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or {AUTO_BATCH!r}, got {text!r}") from None


def _check_generate(args) -> None:
    """What generate can check before a model is built or a pipeline loaded: a bad option must not
    fail after them, nor leave a run file in --out."""
    import dataclasses

    from .datagen.config import BNInversionConfig, DiffusionConfig
    from .outputs import check_output_dir

    if args.num_images < 1:
        raise ValueError(f"num_images (--num-images) must be >= 1, got {args.num_images}")
    if args.source == "bn-inversion":
        BNInversionConfig.build(**{k: v for k, v in _given(args, BN_OPTIONS).items() if v != "auto"})
    else:
        fields = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(DiffusionConfig)}
        if args.resolution is not None:
            fields.update(height=args.resolution, width=args.resolution)
        DiffusionConfig.build(**{k: v for k, v in fields.items() if v is not None})
        if args.batch_size not in (None, "auto") and args.batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be >= 1, got {args.batch_size}")
    check_output_dir(args.out, "--out", overwrite=True)  # an existing set is resumed


def _locked_out(command):
    """Check the arguments, then run ``command`` holding the lock on its --out (one writer at a time)."""
    import functools

    @functools.wraps(command)
    def run(args) -> int:
        from .outputs import OutputLock

        _check_generate(args)
        if getattr(args, "dry_run", False):  # prints the plan; writes nothing, so takes no lock
            return command(args)
        from .datagen.distributed import init_from_env, on_rank_zero, resolve_device

        init_from_env(resolve_device(args.device))  # under torchrun / accelerate: one group, one set
        with on_rank_zero(lambda: OutputLock(args.out, "--out")):  # the ranks write one --out together
            return command(args)

    return run


@_locked_out
def cmd_generate(args) -> int:
    from .datagen.config import parse_filters, pool_size

    from .datagen.distributed import resolve_device

    steps = parse_filters(args.filter)
    device = resolve_device(args.device)  # default: CUDA when available; cuda -> cuda:LOCAL_RANK
    model = None
    if args.model:
        from .models import create_model

        model = create_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                             pretrained=args.pretrained).to(device)
        if steps:  # a filter the model cannot score must fail before the pool is made
            from .datagen.filters import check_filter_model

            check_filter_model(model, steps)
    elif args.source == "bn-inversion" or steps:
        raise SystemExit(f"dfqkern generate: {'--filter' if steps else '--source bn-inversion'} needs --model")
    target, num = args.out, args.num_images
    if steps:  # over-generate a pool, then keep --num-images of it
        from .pipeline import pool_dir

        target, num = pool_dir(args.out), pool_size(args.num_images, steps)
        print(f"filters {', '.join(f'{s.kind}:{s.keep_fraction:g}' for s in steps)}: a pool of {num} images in "
              f"{target}, {args.num_images} kept in {args.out}")
    if args.source == "diffusion":
        if not args.pipeline:
            raise SystemExit("dfqkern generate: --source diffusion needs --pipeline (hub id or local directory)")
        from .datagen import generate_diffusion_set

        options = _given(args, ("prompt_mode", "mixup_k", "mixup_level", "seed", "guidance_scale", "steps",
                                "negative_prompt", "output_size", "classes", "batch_size", "precision"))
        if args.resolution is not None:
            options.update(height=args.resolution, width=args.resolution)
        if args.dry_run:
            from .datagen.diffusion import plan_diffusion

            print(plan_diffusion(args.pipeline, num_images=num, device=device, **options).describe())
            print("dry run: nothing generated")
            return 0
        out = generate_diffusion_set(target, args.pipeline, num_images=num, scheduler=args.scheduler,
                                     device=device, overwrite=args.overwrite, **options)
    else:
        from .pipeline import generate_bn_inversion, plan_bn_inversion

        options = _given(args, BN_OPTIONS)
        plan = plan_bn_inversion(model, None if args.overwrite else target, num, device=device,
                                 shard_size=args.shard_size, **options)
        print(plan.describe())
        if args.dry_run:
            print("dry run: nothing generated")
            return 0
        options["batch_size"] = plan.batch_size  # "auto" resolved once, as planned
        out = generate_bn_inversion(model, target, num, overwrite=args.overwrite, device=device,
                                    shard_size=plan.shard_size, **options)
    if steps:
        from .pipeline import filter_generated

        out = filter_generated(model, out, args.out, steps, args.num_images, overwrite=args.overwrite)
    print(f"synthetic set in {out} (use it with --calib-data synthetic:{out})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, seed=args.seed, progress=not args.quiet)
    return 0


def _batch_sizes(text: str) -> tuple[int, ...]:
    from .benchmark import parse_batch_sizes

    try:
        return parse_batch_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench(args) -> int:
    from .benchmark import check_bench_args, format_table, run_bench

    # before any model is loaded: the arguments, then the --json-out location
    check_bench_args(args.checkpoint, args.batch_sizes, args.repeats, args.warmup, args.device, args.onnx, args.pt2,
                     args.threads)
    _check_json_out(args)
    res = run_bench(args.checkpoint, float_model=args.float, batch_sizes=args.batch_sizes, repeats=args.repeats,
                    warmup=args.warmup, device=args.device, onnx=args.onnx, pt2=args.pt2, threads=args.threads,
                    progress=not args.quiet, trust_unverified=args.trust_unverified, compile=args.compile)
    print(format_table(res))
    if args.json_out:
        from .pipeline import write_json

        write_json(res, args.json_out)
    return 0


def _report_float_model(args):
    """The float model of ``report`` (for SQNR) as a factory, built after the arguments are checked; None
    without --model / --checkpoint / --pretrained. --model defaults to the checkpoint's architecture."""
    if not (args.model or args.checkpoint or args.pretrained):
        return None, None
    if not (args.checkpoint or args.pretrained):
        raise SystemExit(f"dfqkern report: --model {args.model} without --checkpoint or --pretrained has random "
                         f"weights; SQNR against it would mean nothing")

    def build():
        from .io import read_metadata
        from .models import create_model
        from .report.sources import find_checkpoints

        name, num_classes = args.model, args.num_classes
        if name is None or num_classes is None:  # what the (first) checkpoint was quantized from
            meta = read_metadata(find_checkpoints(args.run)[0], args.trust_unverified)
            name = name or meta["arch"]
            num_classes = num_classes or meta.get("arch_kwargs", {}).get("num_classes")
        return create_model(name, checkpoint=args.checkpoint, num_classes=num_classes, pretrained=args.pretrained)

    label = f"{args.model or 'the checkpoint architecture'}, {args.checkpoint or 'pretrained weights'}"
    return build, label


def cmd_report(args) -> int:
    from .report import require_matplotlib

    try:  # the optional dependency first, before any argument is acted on
        require_matplotlib()
    except ImportError as e:
        raise SystemExit(f"dfqkern report: {e}") from None
    from .report import ReportJob, write_report
    from .report.write import REPORT_HTML, REPORT_MD

    float_model, label = _report_float_model(args)
    job = ReportJob(run=args.run, out=args.out, format=args.format, overwrite=args.overwrite, float_model=float_model,
                    float_label=label, calib_data=args.calib_data, num_calib=args.num_calib,
                    synthetic=args.synthetic, num_samples=args.num_samples, summaries=args.summary or (),
                    eval_data=args.eval_data, eval_limit=args.eval_limit, trust_unverified=args.trust_unverified)
    out = write_report(job)
    files = [f for f, fmt in ((REPORT_MD, "md"), (REPORT_HTML, "html")) if args.format in (fmt, "both")]
    print(f"report of {len(job.checkpoints)} checkpoint(s) in {out}: {', '.join(files)} (+ report.json)")
    return 0


def _add_run_flags(p: argparse.ArgumentParser, out_help: str, resume_help: str) -> None:
    """Where a long job writes and runs: the flags quantize and finetune share."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-resume", action="store_true", help=resume_help)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", type=_backend, help=BACKEND_HELP)
    p.add_argument("--json-out")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import METHODS as QUANT_METHODS

    p = argparse.ArgumentParser(prog="dfqkern", description="Data-free quantization with packed low-bit kernels")
    p.add_argument("--version", action="version", version=f"dfqkern {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a packed checkpoint")
    q.add_argument("--model", required=True, help="registry name, timm:NAME or torchvision:NAME")
    q.add_argument("--checkpoint", help="float weights (state dict file, loaded weights-only)")
    q.add_argument("--pretrained", action="store_true", help="use the library's pretrained weights")
    q.add_argument("--num-classes", type=int)
    q.add_argument("--calib-data", required=True, help="image folder, tar(+labels csv), synthetic:DIR, or "
                   "bn-inversion:METHOD[:single|mixup] (data-free: generated now from the model's BatchNorm "
                   "statistics; for a ViT METHOD psaq or dfq-vit)")
    q.add_argument("--num-calib", type=int, default=256, help="calibration images (default 256)")
    q.add_argument("--method", default="observer", choices=QUANT_METHODS)
    q.add_argument("--iters", type=int, help="reconstruction iterations per block / layer")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--pd-weight", type=float, help="reconstruction methods: weight of PD-Quant's "
                   "prediction-difference term (KL of the float model's prediction to the float rest of the net fed "
                   "each unit's quantized output; costs a whole-model forward and backward per step; default "
                   "CalibConfig's, 0: off)")
    q.add_argument("--eval-data", help="also report FP vs quantized top-1 on this labelled data")
    q.add_argument("--eval-limit", type=int)
    _add_run_flags(q, "output checkpoint directory", "reconstruction methods: start over instead of resuming a "
                   "killed run from OUT.partial/ (kept while a run is unfinished, removed on success)")
    from .calib.bias_correction import BIAS_CORRECTION_MODES
    from .equalize import RELU6_POLICIES, EqualizeConfig

    qp = q.add_argument_group("pre-quantization steps (Nagel et al. 2019)")
    qp.add_argument("--equalize", action="store_true", help="cross-layer equalization of the float model first "
                    "(pairs joined by ReLU / identity; the summary lists pairs equalized and skipped)")
    qp.add_argument("--absorb-bias", action="store_true", help="high-bias absorption (BatchNorm statistics) first")
    qp.add_argument("--equalize-relu6", choices=RELU6_POLICIES, help="crossing ReLU6: bounded = only where the "
                    "pre-activation (BatchNorm bound, raised to what the calibration images reach) stays under 6, "
                    f"skip = never (default {EqualizeConfig.relu6})")
    qp.add_argument("--bias-correction", choices=BIAS_CORRECTION_MODES, default="none",
                    help="after observer calibration, remove each layer's mean output shift: analytic (from the "
                         "preceding BatchNorm) or empirical (on the calibration images)")
    from .calib.act_correction import MODES as ACT_CORRECTION_MODES

    qp.add_argument("--act-correction", choices=ACT_CORRECTION_MODES, default="none",
                    help="after calibration, DFQ-ViT's activation correction: each corrected layer's output channels "
                         "get the float model's mean (shift) or mean and std (affine) on the calibration images, "
                         "folded into the layer (packs as before)")
    _add_quant_flags(q)
    q.set_defaults(func=cmd_quantize)

    from .qat import METHODS as QAT_METHODS, QATConfig, SCHEDULES
    from .qat.methods import option_help

    ft = sub.add_parser("finetune",
                        help="data-free QAT: train a generator and the quantized model from the float one")
    ft.add_argument("--model", required=True, help="registry name, timm:NAME or torchvision:NAME")
    ft.add_argument("--checkpoint", help="float weights (state dict file, loaded weights-only)")
    ft.add_argument("--pretrained", action="store_true", help="use the library's pretrained weights")
    ft.add_argument("--num-classes", type=int)
    ft.add_argument("--method", default=QATConfig.method, choices=QAT_METHODS)
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a method option (repeatable): {option_help()}")
    ft.add_argument("--calib-data", required=True, help="data of the PTQ start (as for quantize; data-free: "
                    "synthetic:DIR or bn-inversion:dgh:mixup); QAT itself sees generated images only")
    ft.add_argument("--num-calib", type=int, default=256)
    ft.add_argument("--start", default="observer", choices=QUANT_METHODS,
                    help="PTQ start: observer ranges, or a reconstruction method (e.g. qdrop)")
    ft.add_argument("--start-iters", type=int, help="reconstruction iterations per unit of the start")
    ft.add_argument("--epochs", type=int, default=QATConfig.epochs)
    ft.add_argument("--iters", type=int, default=QATConfig.iters, help="iterations per epoch")
    ft.add_argument("--batch-size", type=int, default=QATConfig.batch_size)
    ft.add_argument("--warmup-epochs", type=int, default=QATConfig.warmup_epochs,
                    help="generator-only epochs first (GDFQ)")
    ft.add_argument("--schedule", choices=SCHEDULES, default=QATConfig.schedule)
    ft.add_argument("--lr", type=float, help=f"student weight lr (default {QATConfig.student_lr:g})")
    ft.add_argument("--generator-lr", type=float, help=f"(default {QATConfig.generator_lr:g})")
    ft.add_argument("--temperature", type=float, help=f"distillation temperature (default {QATConfig.temperature:g})")
    ft.add_argument("--replay-weight", type=float,
                    help=f"also distil on the start's calibration images at this weight (default "
                         f"{QATConfig.replay_weight:g}: generated images only)")
    ft.add_argument("--samples-out", help="also store generated images as a synthetic set in this directory")
    ft.add_argument("--num-samples", type=int, default=256)
    ft.add_argument("--eval-data", help="also report FP, start and final top-1 on this labelled data")
    ft.add_argument("--eval-limit", type=int)
    _add_run_flags(ft, "output checkpoint directory (packed, as quantize writes)", "start over instead of "
                   "resuming a killed run from OUT.qat/ (kept while a run is unfinished, removed on success)")
    _add_quant_flags(ft)
    ft.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="top-1 of a float model or a packed checkpoint")
    e.add_argument("--model")
    e.add_argument("--checkpoint")
    e.add_argument("--pretrained", action="store_true")
    e.add_argument("--num-classes", type=int)
    e.add_argument("--quantized", help="packed checkpoint directory")
    e.add_argument("--trust-unverified", action="store_true", help=TRUST_HELP)
    e.add_argument("--data", required=True, help="image folder or tar + labels csv")
    e.add_argument("--limit", type=int)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu")
    e.add_argument("--backend", type=_backend, help=BACKEND_HELP)
    e.add_argument("--json-out")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="layers, bits and size of a packed checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--trust-unverified", action="store_true", help=TRUST_HELP)
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export", help="write a packed checkpoint as ONNX (QDQ, for onnxruntime / TensorRT) or as a "
                                      "torch.export / AOTInductor .pt2 package")
    x.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="packed checkpoint directory")
    x.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    x.add_argument("--out", required=True, help="output file (.onnx or .pt2), written atomically")
    x.add_argument("--opset", type=int, help="ONNX opset, 13-21 (default 21: INT4 weights; 17 for --target tensorrt; "
                                             "below 21 4/3/2-bit weights are stored as int8)")
    x.add_argument("--target", choices=("onnxruntime", "tensorrt"),
                   help="ONNX consumer (default onnxruntime); tensorrt also requires symmetric quantization "
                        "(zero points 0) and stores every weight as int8")
    x.add_argument("--input-shape", type=_input_shape, metavar="C,H,W",
                   help="example input shape (default: the checkpoint's input spec, batch 2; the batch stays dynamic)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--trust-unverified", action="store_true", help=TRUST_HELP)
    x.set_defaults(func=cmd_export)

    import inspect

    from .datagen import generate_diffusion_set
    from .datagen.config import (AUGMENTS, DEFAULT_CE_WEIGHT, DEFAULT_INPUT_PRIOR_WEIGHT, DEFAULT_LABEL_MODE,
                                 DEFAULT_SHARD_SIZE, DEFAULT_TV_WEIGHT, DGH_MEMORY_FRACTION, FILTER_KINDS, LABEL_MODES, PRECISIONS)
    from .datagen.config import METHODS as BN_METHODS, BNInversionConfig as BN, DiffusionConfig as DC
    from .datagen.prompts import MIXUP_LEVELS, PROMPT_MODES

    diffusion_run = inspect.signature(generate_diffusion_set).parameters

    # Generation flags default to None: what is not given keeps the library's default (shown in the help).
    g = sub.add_parser("generate", help="make a synthetic calibration set (diffusion prompts or BN inversion)")
    g.add_argument("--source", choices=("diffusion", "bn-inversion"), required=True,
                   type=lambda s: "bn-inversion" if s == "inversion" else s,  # the name, same thing
                   help="bn-inversion (also spelled inversion): every inversion --method, the ViT ones included")
    g.add_argument("--out", required=True, help="output directory (resumes an unfinished set)")
    g.add_argument("--num-images", type=int, default=256)
    g.add_argument("--seed", type=int, help=f"(default {BN.default('seed')})")
    g.add_argument("--batch-size", type=_gen_batch_size,
                   help=f"an int, or auto: the largest batch that fits the free GPU memory (on the CPU the default; "
                        f"default: bn-inversion {BN.default('batch_size')}, "
                        f"diffusion {diffusion_run['batch_size'].default})")
    g.add_argument("--device", default=None, help="default: CUDA when available, else cpu; under torchrun / "
                   "accelerate a bare cuda is cuda:LOCAL_RANK")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"arithmetic of the forward: bn-inversion autocasts the model (default "
                        f"{BN.default('precision')}), diffusion loads the pipeline in it (default fp16 on CUDA, fp32 "
                        f"on the CPU); fp16 needs CUDA")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (images per rank, shards, batch size, memory estimate) and generate nothing")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--mixup-k", type=int, help="classes fused per prompt / soft label (mixup modes; default "
                   f"{BN.default('mixup_k')})")
    gd = g.add_argument_group("diffusion")
    gd.add_argument("--pipeline", help="diffusers text-to-image pipeline: hub id or local directory")
    gd.add_argument("--classes", help="imagenet, cifar10, cifar100 or a file of class names "
                    f"(default {diffusion_run['classes'].default})")
    gd.add_argument("--prompt-mode", choices=PROMPT_MODES, help=f"(default {DC.default('prompt_mode')})")
    gd.add_argument("--mixup-level", choices=MIXUP_LEVELS, help=f"(default {DC.default('mixup_level')})")
    gd.add_argument("--steps", type=int, help=f"(default {DC.default('steps')})")
    gd.add_argument("--guidance-scale", type=float, help=f"(default {DC.default('guidance_scale')})")
    gd.add_argument("--resolution", type=int, help="generation height = width (default: the pipeline's)")
    gd.add_argument("--output-size", type=int, help="resize / center-crop the images to this size")
    gd.add_argument("--negative-prompt")
    gd.add_argument("--scheduler")
    gb = g.add_argument_group("bn-inversion")
    gb.add_argument("--model", help="registry name, timm:NAME or torchvision:NAME (BatchNorm for the BN methods, "
                    "self-attention for psaq / dfq-vit); with --filter "
                    "also the classifier that scores the images")
    gb.add_argument("--checkpoint")
    gb.add_argument("--pretrained", action="store_true")
    gb.add_argument("--num-classes", type=int)
    gb.add_argument("--method", choices=BN_METHODS,
                    help="zeroq, genie (the papers' methods: no labels, zeroq's input prior, genie's swing on the "
                         "model's strided convs), genie-labels (dfqkern's conditional genie), hast, dgh; "
                         "for ViTs psaq (patch-similarity entropy), dfq-vit (psaq + easy-to-hard targets) "
                         f"(default {BN.default('method')})")
    gb.add_argument("--label-mode", choices=LABEL_MODES,
                    help="mixup: soft targets over --mixup-k classes (best with dgh; genie-labels does better with "
                         f"single); none: no targets (default per method: {DEFAULT_LABEL_MODE})")
    gb.add_argument("--iters", type=int, help=f"(default {BN.default('iters')})")
    gb.add_argument("--ce-weight", type=float,
                    help=f"weight of the target cross-entropy (default per label mode: {DEFAULT_CE_WEIGHT})")
    gb.add_argument("--input-prior-weight", type=float,
                    help=f"weight of ZeroQ's input prior (default per method: {DEFAULT_INPUT_PRIOR_WEIGHT}, else 0)")
    gb.add_argument("--tv-weight", type=float, help="weight of a total-variation image prior (smoother images; "
                    f"default per method: {DEFAULT_TV_WEIGHT}, else 0)")
    gb.add_argument("--l2-weight", type=float, help=f"weight of an L2 image prior (default {BN.default('l2_weight')})")
    gb.add_argument("--patch-weight", type=float, help="psaq / dfq-vit: weight of the patch-similarity entropy "
                    f"(default {BN.default('patch_weight')})")
    gb.add_argument("--kde-bandwidth", type=float, help="psaq / dfq-vit: kernel width of the similarity density "
                    f"(default {BN.default('kde_bandwidth')})")
    gb.add_argument("--augment", choices=AUGMENTS, help="images as the model sees them while inverting: dgh = "
                    "smoothing + random crop + flip, flip-shift = flip + circular shift (default none)")
    gb.add_argument("--jitter", type=int, help=f"max shift in pixels of --augment (default {BN.default('jitter')})")
    gb.add_argument("--shard-size", type=int,
                    help="images per shard, each inverted as one unit (dgh: its BN statistics are the shard's); "
                         f"default: dgh the whole set when it fits in {DGH_MEMORY_FRACTION:g} of the free memory "
                         f"(the estimate is printed), other methods {DEFAULT_SHARD_SIZE}")
    g.add_argument("--filter", action="append", metavar="KIND:KEEP_FRACTION",
                   help=f"GenQ filter ({', '.join(FILTER_KINDS)}; repeat or comma-join to chain): generate "
                        "NUM_IMAGES / (product of the fractions) images into OUT.pool, keep NUM_IMAGES in OUT "
                        "(needs --model)")
    g.set_defaults(func=cmd_generate)

    from .report import FORMATS as REPORT_FORMATS

    r = sub.add_parser("report", help="markdown / HTML report of a quantization run: accuracy, per-layer SQNR, "
                                      "activation ranges, bit policy, synthetic samples (pip install dfqkern[report])")
    r.add_argument("run", metavar="RUN", help="packed checkpoint directory, or a directory of them (a demo --out)")
    r.add_argument("--out", required=True, help="report directory, written atomically")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    r.add_argument("--format", choices=REPORT_FORMATS, default="both",
                   help="md: report.md + PNGs; html: one report.html with the PNGs embedded (default both)")
    r.add_argument("--trust-unverified", action="store_true", help=TRUST_HELP)
    rf = r.add_argument_group("float model (for SQNR; as quantize takes it)")
    rf.add_argument("--model", help="registry name, timm:NAME or torchvision:NAME (default: the checkpoint's)")
    rf.add_argument("--checkpoint", help="float weights (state dict file, loaded weights-only)")
    rf.add_argument("--pretrained", action="store_true", help="use the library's pretrained weights")
    rf.add_argument("--num-classes", type=int)
    rd = r.add_argument_group("data")
    rd.add_argument("--calib-data", help="images for the output SQNR and the ranges reached: image folder, "
                    "tar(+labels csv) or synthetic:DIR (default: the synthetic set, when there is one)")
    rd.add_argument("--num-calib", type=int, default=8, help="how many of them (default 8)")
    rd.add_argument("--synthetic", metavar="DIR", help="synthetic set shown as a sample grid (default: RUN.calib-data "
                    "of the quantize run, or a set inside RUN)")
    rd.add_argument("--num-samples", type=int, default=16, help="images in the sample grid (default 16)")
    rd.add_argument("--eval-data", help="also measure FP and quantized top-1 on this labelled data")
    rd.add_argument("--eval-limit", type=int)
    rd.add_argument("--summary", action="append", metavar="JSON",
                    help="what the run recorded (quantize's --json-out: accuracy, method, calibration); repeatable")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="train, quantize, pack, save and reload a small digits model (offline)")
    d.add_argument("--out", help="where to write the checkpoints (default: a temporary directory)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    from .benchmark import DEFAULT_REPEATS, DEFAULT_WARMUP

    b = sub.add_parser("bench", help="latency and memory of a packed checkpoint against its float model")
    b.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="packed checkpoint directory")
    b.add_argument("--float", default="same", metavar="MODEL",
                   help="float model timed in the same run: 'same' (the checkpoint's architecture, random weights), "
                        "a model name, or 'none' (default same)")
    b.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 8), metavar="B1,B2", help="(default 1,8)")
    b.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help=f"timed calls (default {DEFAULT_REPEATS})")
    b.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed calls first, >= 1 (default {DEFAULT_WARMUP})")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, help="torch (and onnxruntime) threads (default: torch's)")
    b.add_argument("--onnx", help="also time this ONNX file in onnxruntime (CPU)")
    b.add_argument("--pt2", help="also time this AOTInductor package (dfqkern export --format pt2; CPU)")
    b.add_argument("--compile", action="store_true", help="also time dfqkern.compile(model), row packed-compiled")
    b.add_argument("--trust-unverified", action="store_true", help=TRUST_HELP)
    b.add_argument("--json-out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except OSError as e:  # one line naming the path, not a traceback
        where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        print(f"dfqkern {args.command}: error: {f'{e.strerror}: {where}' if e.strerror and where else e}",
              file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"dfqkern {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
