"""Deployment latency: a packed CIFAR-10 ResNet-20 against its ONNX (onnxruntime) and .pt2 (AOTInductor) exports and fp32.

One command::

    python bench/deploy_latency_cifar10.py        # writes bench/results/deploy_latency_<cpu>.{json,md}

For each setting (W8A8, W4A8; first / last layer 8-bit) the pretrained ResNet-20 is quantized with the
MSE observer on 256 real training images (``dfqkern quantize``), packed, exported with ``dfqkern export``
to ONNX QDQ and to ``.pt2``, then ``dfqkern bench``'s harness (:func:`dfqkern.benchmark.run_bench`)
times, in one process and one run per setting: the packed model (dfqkern CPU kernels), the same model
through ``dfqkern.compile`` (graph mode, ``dfqkern bench --compile``), the float model
(torch eager, fp32), the ONNX file in onnxruntime (``dfqkern.export.onnx.onnxruntime_session``) and the
``.pt2`` package, at each batch size (warm-up, then median and minimum of the repeats). Top-1 on the
dev images of the packed model and of the ONNX file in onnxruntime is listed beside (issue 20: equal
within 0.1 point). Latency depends on the machine and its load: the table names the CPU, its ISA and
the 1-minute load average before and after each setting.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

OMP_POLICY_AT_START = os.environ.get("OMP_WAIT_POLICY", "default")

# torch (and its OpenMP runtime) loads before bench/common.py sets OMP_WAIT_POLICY=PASSIVE for the
# accuracy benchmarks: latency is measured under the OpenMP default a user gets (PASSIVE made every
# row here 2-4x slower: sleeping workers wake late for each small parallel region).
import torch  # noqa: E402,I001

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import machine  # noqa: E402
import ort_int8  # noqa: E402
from onnx_agreement_cifar10 import compare_with_onnxruntime  # noqa: E402

from dfqkern.benchmark import COMPILED, run_bench  # noqa: E402
from dfqkern.cli import main as dfqkern_cli  # noqa: E402

SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8)}
MODEL, CHECKPOINT = "cifar10_resnet20", "resnet20-12fca82f.th"
ORT_INT8 = "onnxruntime-int8"
ROWS = ("packed", COMPILED, ORT_INT8, "onnxruntime", "pt2", "float")
ROW_NAMES = {"packed": "dfqkern packed (CPU kernels)", COMPILED: "dfqkern packed, dfqkern.compile",
             ORT_INT8: "onnxruntime int8 (its own quantize_static of the fp32 model)",
             "onnxruntime": "onnxruntime running dfqkern's QDQ export", "pt2": "AOTInductor .pt2 export",
             "float": "torch fp32 eager"}
VS_ORT = ("packed", COMPILED)  # the rows compared with onnxruntime's own int8 model in their own column
NOT_RUN = "not run"  # a row this setting's run did not time (runs older than the row)


def cli(*args: str) -> None:
    rc = dfqkern_cli([str(a) for a in args])
    if rc:
        raise SystemExit(f"dfqkern {' '.join(map(str, args))} failed with exit code {rc}")


def run_setting(setting: str, args, data_dir: Path) -> dict:
    wbits, abits = SETTINGS[setting]
    work = args.work_dir / setting
    ckpt, onnx, pt2 = work / "packed", work / "model.onnx", work / "model.pt2"
    if not ckpt.is_dir():
        cli("quantize", "--model", MODEL, "--checkpoint", data_dir / CHECKPOINT, "--calib-data",
            data_dir / common.TRAIN_IMAGES, "--num-calib", 256, "--method", "observer", "--wbits", wbits,
            "--abits", abits, "--out", ckpt, "--overwrite")
    if not onnx.is_file():
        cli("export", ckpt, "--format", "onnx", "--out", onnx, "--overwrite")
    if not pt2.is_file():
        cli("export", ckpt, "--format", "pt2", "--out", pt2, "--overwrite")
    from dfqkern.io import load_quantized
    from dfqkern.model_info import model_info

    packed = load_quantized(ckpt)
    dev = common.dev_set(data_dir, model_info(packed).input_spec)
    with common.Timer() as t:
        bench = run_bench(ckpt, float_model=MODEL, batch_sizes=args.batch_sizes, repeats=args.repeats,
                          warmup=args.warmup, onnx=onnx, pt2=pt2, threads=args.threads, progress=args.progress,
                          compile=True)
        peer = time_ort_int8(args, data_dir, work, dev)
    bench["rows"] += peer.pop("rows")
    agree = compare_with_onnxruntime(packed, onnx, dev)
    return {"setting": setting, "bench": bench, "load": t.load, "top1_packed": agree["top1_packed"],
            "top1_onnxruntime": agree["top1_onnxruntime"], **peer, "finished": common.now()}


def time_ort_int8(args, data_dir: Path, work: Path, dev) -> dict:
    """onnxruntime's own int8 model of the fp32 ResNet-20 (bench/ort_int8.py: quant_pre_process + quantize_static,
    MinMax on 256 random real training images), timed like the other rows at each batch size, with its top-1."""
    from dfqkern.benchmark import measure
    from dfqkern.data import calibration_tensor
    from dfqkern.model_info import model_info

    fp = common.open_net("resnet20")
    spec = model_info(fp).input_spec
    calib = calibration_tensor(common.train_set(data_dir, spec), 256, seed=0)
    model = ort_int8.float_onnx(fp, calib[:1], dynamic_batch=True)
    sess, int8, convs = ort_int8.quantize_int8(model, calib, work / "ort-int8", args.threads)
    if int8 < convs:
        raise SystemExit(f"onnxruntime ran only {int8} of {convs} Convs as QLinearConv: not an int8 peer")
    rows = []
    for b in args.batch_sizes:
        x = torch.randn(b, *spec.input_size, generator=torch.Generator().manual_seed(b)).numpy()
        timing = measure(lambda: sess.run(None, {"x": x}), warmup=args.warmup, repeats=args.repeats)
        rows.append({"model": ORT_INT8, "batch_size": b, **timing.to_dict()})
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dev, batch_size=common.EVAL_BATCH):
        correct += int((torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).argmax(1) == y).sum())
        total += len(y)
    return {"rows": rows, "top1_ort_int8": round(100.0 * correct / total, 2), "ort_int8_convs": [int8, convs]}


def missing_rows(row: dict) -> list[str]:
    """The rows of ROWS a stored setting was timed without (runs before --compile lack the compiled one)."""
    timed = {x["model"] for x in row["bench"]["rows"]}
    return [kind for kind in ROWS if kind not in timed]


def _cell(x: dict | None) -> str:
    if x is None:
        return NOT_RUN
    return f"error: {x['error'][:60]}" if "error" in x else f"{x['median_ms']:.3f} / {x['min_ms']:.3f}"


def _vs_ort(by: dict, kind: str, b: int) -> str:
    """onnxruntime int8 median / ``kind`` median at batch ``b``; blank where either is missing."""
    x, o = by.get((kind, b), {}), by.get((ORT_INT8, b), {})
    return f"{o['median_ms'] / x['median_ms']:.2f}x" if "median_ms" in x and "median_ms" in o else "-"


def _compiled_note(data: dict) -> str:
    diffs = [x["max_abs_diff_vs_packed"] for r in data["rows"].values() for x in r["bench"]["rows"]
             if x["model"] == COMPILED and "max_abs_diff_vs_packed" in x]
    if not diffs:
        return f"`{ROW_NAMES[COMPILED]}`: {NOT_RUN} in these runs (they predate it)."
    modes = {s: sorted({x.get("source", "dfqkern.compile(graph)") for x in r["bench"]["rows"] if x["model"] == COMPILED})
             for s, r in data["rows"].items()}
    used = "; ".join(f"{s}: {', '.join(m)}" for s, m in modes.items() if m)
    return (f"`{ROW_NAMES[COMPILED]}`: the packed model's layers called from one captured `torch.fx` graph (`graph`: "
            f"each layer's packed_forward; `frozen`: each conv one C++ call with its residual add / ReLU fused); its "
            f"logits differ from the packed row's by at most {max(diffs):g} (the same kernels in the same order). "
            f"Mode per setting: {used}.")


def render_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# Deployment latency: CIFAR-10 ResNet-20, packed vs its exports vs fp32 ({meta['cpu']})", "",
             f"{common.generated_by(__file__)} CPU: {meta['cpu']}; dfqkern ISA {meta['isa']}; torch threads "
             f"{meta['threads']} (onnxruntime intra-op threads the same), OpenMP wait policy "
             f"{meta.get('omp_wait_policy', 'default')}; {meta['machine']}. Per setting one "
             f"`dfqkern bench` run (`dfqkern.benchmark.run_bench`): inputs random, warm-up {meta['warmup']} calls "
             f"(the first call excluded), then median / min of {meta['repeats']} calls, `torch.inference_mode`. "
             f"Quantized with the MSE observer on 256 real training images, first / last layer 8-bit; top-1 on "
             f"the {data.get('dev_images', 5000)} dev images. Latency depends on the load: the 1-minute load "
             f"average before / after each setting is listed.", ""]
    lines += common.table_head("setting", "batch", *[f"{ROW_NAMES[r]} ms (median / min)" for r in ROWS],
                               *[f"{'compiled' if k == COMPILED else k} vs onnxruntime int8 (median)" for k in VS_ORT],
                               "top-1 packed / onnxruntime int8 / onnxruntime on the export %", "load")
    for setting in SETTINGS:
        r = data["rows"].get(setting)
        if r is None:
            continue
        by = {(x["model"], x["batch_size"]): x for x in r["bench"]["rows"]}
        for b in r["bench"]["batch_sizes"]:
            cells = [_cell(by.get((kind, b))) for kind in ROWS] + [_vs_ort(by, kind, b) for kind in VS_ORT]
            load = "/".join(f"{v:.1f}" for v in r["load"])
            lines.append(f"| {setting} | {b} | " + " | ".join(cells) +
                         f" | {r['top1_packed']:.2f} / {r.get('top1_ort_int8', '-')} / {r['top1_onnxruntime']:.2f} "
                         f"| {load} |")
    lines += ["", "`packed vs onnxruntime int8` = onnxruntime int8 median / packed median (> 1: dfqkern's packed "
              "model is faster); `compiled vs onnxruntime int8` the same for the `dfqkern.compile` row. The onnxruntime "
              "int8 peer is onnxruntime's own flow on the fp32 model (`quant_pre_process`, `quantize_static`: QDQ, "
              "per-channel int8 weights, uint8 activations, MinMax on 256 random real training images; checked to run "
              "every Conv as a QLinearConv, bench/ort_int8.py). `onnxruntime running dfqkern's QDQ export` runs the "
              "packed model's own export (its weights dequantized to float convs: not an int8 peer). "
              + _compiled_note(data) + " Model sizes and peak memory per row are in the JSON beside this file."]
    return common.document(lines, meta)


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--batch-sizes", type=common.comma_list(item=int), default="1,8")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    cpu_text = machine.cpu_name()
    common.add_run_flags(p, f"deploy_latency_{machine.slug(cpu_text)}",
                         work_dir=("the quantized checkpoints and exports are kept", "bench-deploy"))
    args = p.parse_args(argv)
    data_dir = common.cifar10_dir(args.data_dir)
    for f in (CHECKPOINT, common.TRAIN_IMAGES, common.DEV_IMAGES):
        if not (data_dir / f).is_file():
            raise SystemExit(f"--data-dir: {data_dir / f} is missing")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = common.Results(out, render_markdown, fresh=args.fresh, empty={"rows": {}})
    results.data["meta"] = common.run_meta(args.threads, cpu=cpu_text, isa=machine.dfqkern_isa(), repeats=args.repeats, warmup=args.warmup)
    results.data["meta"]["omp_wait_policy"] = OMP_POLICY_AT_START
    for setting in SETTINGS:
        missing = missing_rows(results.rows[setting]) if setting in results.rows else []
        if missing:  # resuming keeps only settings timed with every row; this one is timed again
            print(f"re-run {setting}: it was timed without {', '.join(missing)}", flush=True)
            del results.rows[setting]
        results.row(setting, lambda s=setting: run_setting(s, args, data_dir),
                    lambda r: f"top-1 packed {r['top1_packed']:.2f}, onnxruntime {r['top1_onnxruntime']:.2f}")
    results.save()
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
