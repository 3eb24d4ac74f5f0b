"""``dfqkern bench``: latency and memory of a packed checkpoint against its float model, on this machine.

Every row is timed the same way (:func:`measure`): under ``torch.inference_mode``, the first call
and the rest of the warm-up are run and not counted (the first call pays one-time costs: kernel
weight layouts, lazy initialisation, allocator growth), then each of ``repeats`` calls is timed
alone (``time.perf_counter``, the device synchronised around it) and the median and minimum
reported. The first call's time is reported beside them, so the cost it hides stays visible.

Memory (:func:`memory_probe`), per row and batch size, above what the process held before the
row's calls (the model itself is reported apart as ``model_bytes``: its parameters and buffers, or
the size of an onnx / pt2 file):
- CUDA: ``torch.cuda.max_memory_allocated`` over the calls minus ``memory_allocated`` before them;
- CPU (Linux): growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the calls, above the resident set before them, after glibc's
  ``malloc_trim`` returned the free heap pages. Memory the allocator still reuses unseen is not
  counted, so it is a lower bound; without /proc (not Linux) it is None.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from .model_info import model_info

__all__ = ["Timing", "measure", "memory_probe", "parse_batch_sizes", "check_bench_args", "run_bench",
           "format_table", "FLOAT_SAME", "FLOAT_NONE", "COMPILED"]

FLOAT_SAME, FLOAT_NONE = "same", "none"  # --float: the checkpoint's own architecture, or no float row
DEFAULT_REPEATS, DEFAULT_WARMUP = 30, 5


@dataclass
class Timing:
    first_call_s: float  # the first warm-up call: reported, never part of the statistics
    times_s: list[float]  # one per timed repeat

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times_s)

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "first_call_ms": 1e3 * self.first_call_s,
                "repeats": len(self.times_s)}


def measure(fn: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[], None] = lambda: None,
            on_call: Callable[[], None] = lambda: None) -> Timing:
    """Time ``fn()``: ``warmup`` calls (>= 1, the first of them timed apart), then ``repeats`` timed calls.
    ``sync`` waits for the device (CUDA); ``on_call`` runs after every call (a progress bar)."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got warmup={warmup}, repeats={repeats}")
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    on_call()
    for _ in range(warmup - 1):
        fn()
        sync()
        on_call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        on_call()
    return Timing(first, times)


# ----------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    # give freed heap pages back to the OS first, or memory freed by earlier rows is reused unseen
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


CPU_MEM_METHOD = "peak RSS growth after malloc_trim (VmHWM reset via /proc/self/clear_refs), lower bound"
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated growth"


class memory_probe:
    """``with memory_probe(device) as probe: ...`` then ``probe.peak_bytes`` (None where it cannot be measured)
    and ``probe.method``: the extra memory the block needed at its peak (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = CUDA_MEM_METHOD if self.device.type == "cuda" else CPU_MEM_METHOD

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._base = _proc_status_kib("VmRSS") if _reset_peak_rss() else None
            if self._base is None:
                self.method = "unavailable (needs Linux /proc/self/clear_refs)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            peak = _proc_status_kib("VmHWM")
            self.peak_bytes = None if peak is None else max(0, peak - self._base) * 1024
        return False


# ----------------------------------------------------------------------------- arguments

def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``: positive integers, comma-separated, no repeats."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"batch sizes (--batch-sizes) must be comma-separated positive integers such as 1,8; "
                         f"got {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"batch sizes (--batch-sizes) must be distinct positive integers, got {text!r}")
    return sizes


def check_bench_args(checkpoint, batch_sizes, repeats: int, warmup: int, device: str, onnx=None, pt2=None,
                     threads: int | None = None) -> torch.device:
    """Everything checkable before a model is loaded; errors name the command-line argument."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise ValueError(f"CHECKPOINT_DIR {str(checkpoint)!r} is not a directory (a packed checkpoint written by "
                         f"dfqkern quantize / save_quantized)")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes (--batch-sizes) must be positive integers, got {batch_sizes!r}")
    if repeats < 1:
        raise ValueError(f"repeats (--repeats) must be >= 1, got {repeats}")
    if warmup < 1:
        raise ValueError(f"warmup (--warmup) must be >= 1 (the first call pays one-time costs and is never "
                         f"timed), got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads (--threads) must be >= 1, got {threads}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device (--device) {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device (--device) {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device (--device) must be cpu or cuda, got {device!r}")
    for flag, path in (("--onnx", onnx), ("--pt2", pt2)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {str(path)!r} is not a file")
    if onnx is not None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("--onnx needs onnxruntime, which is not installed (pip install onnxruntime, or "
                             "dfqkern's onnx extra)") from None
    if pt2 is not None and dev.type != "cpu":
        raise ValueError(f"--pt2 is benchmarked on the CPU only (the package is compiled for one device); got "
                         f"--device {device}")
    return dev


# ----------------------------------------------------------------------------- runners

def _onnx_runner(path, threads: int):
    import numpy as np

    from .export.onnx import onnxruntime_session

    # the session that computes what dfqkern computes (no bias rounding, no int8 MatMulNBits inputs),
    # so the latency row and the accuracy numbers describe the same model
    session = onnxruntime_session(path, threads=threads)
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(np.asarray(session.run(None, {name: x.detach().cpu().numpy()})[0]))

    return run


def _pt2_runner(path):
    from .export.pt2 import load_pt2

    loaded = load_pt2(path)

    def run(x):
        out = loaded(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


COMPILED, COMPILED_MODE = "packed-compiled", "frozen"  # the --compile row: dfqkern.compile(packed) (its default)


def _compiled_runner(packed: nn.Module):
    """``dfqkern.compile(packed)``, or, where it cannot capture the model, a runner that raises why, so the row
    records the error as an exported file's row does (fallback=False: a silent eager fallback would time the
    packed model twice under the compiled row's name)."""
    from .runtime_compile import compile as compile_model

    try:
        return compile_model(packed, mode=COMPILED_MODE, fallback=False)
    except Exception as e:  # noqa: BLE001 - any capture failure is this row's result
        why = f"dfqkern.compile(mode={COMPILED_MODE!r}) failed: {type(e).__name__}: {e}"

        def failed(x):
            raise RuntimeError(why)

        return failed


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_bench(checkpoint, float_model: str | None = FLOAT_SAME, batch_sizes=(1, 8), repeats: int = DEFAULT_REPEATS,
              warmup: int = DEFAULT_WARMUP, device: str = "cpu", onnx=None, pt2=None, threads: int | None = None,
              progress: bool = True, trust_unverified: bool = False, seed: int = 0, compile: bool = False) -> dict:
    """Latency and memory of the packed ``checkpoint`` and, in the same run, of the float model
    (``float_model``: ``"same"`` = the checkpoint's recorded architecture rebuilt by
    :func:`dfqkern.models.create_model` with random weights, a model name, or ``"none"``/None), an
    onnxruntime session of ``onnx``, a ``pt2`` package and, with ``compile``, ``dfqkern.compile(packed)``
    (captured before any timing; its outputs are checked against the packed row's), at each batch size.
    Returns the JSON dict."""
    from .io import load_quantized

    batch_sizes = tuple(batch_sizes)
    dev = check_bench_args(checkpoint, batch_sizes, repeats, warmup, device, onnx, pt2, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    packed = load_quantized(checkpoint, device=dev, trust_unverified=trust_unverified)
    spec = model_info(packed).input_spec
    if spec is None:
        raise ValueError(f"CHECKPOINT_DIR {str(checkpoint)!r} records no input_spec, so the input size is unknown")
    rows: list[tuple[str, str, Callable, int]] = [
        ("packed", str(checkpoint), packed, _nbytes(packed))]
    if compile:  # the same tensors as the packed model: same model_bytes
        rows.append((COMPILED, f"dfqkern.compile({COMPILED_MODE})", _compiled_runner(packed), _nbytes(packed)))
    fname = None if float_model is None or str(float_model).lower() == FLOAT_NONE else str(float_model)
    if fname is not None:
        from .models import create_model

        arch = model_info(packed).arch if fname.lower() == FLOAT_SAME else fname
        if not arch:
            raise ValueError(f"--float same: CHECKPOINT_DIR {str(checkpoint)!r} records no architecture; "
                             f"name the float model or pass --float none")
        try:
            fmodel = create_model(arch, num_classes=model_info(packed).arch_kwargs.get("num_classes")).to(dev).eval()
        except (ValueError, ImportError) as e:
            raise ValueError(f"--float {fname}: cannot build float model {arch!r}: {e}") from e
        rows.append(("float", arch, fmodel, _nbytes(fmodel)))
    if onnx is not None:
        rows.append(("onnxruntime", str(onnx), _onnx_runner(onnx, torch.get_num_threads()),
                     Path(onnx).stat().st_size))
    if pt2 is not None:
        rows.append(("pt2", str(pt2), _pt2_runner(pt2), Path(pt2).stat().st_size))

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, *spec.input_size, generator=gen).to(dev) for b in batch_sizes}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows) * len(batch_sizes) * (warmup + repeats), desc="dfqkern bench", unit="call",
               disable=not progress, leave=False)
    results, mem_method = [], None
    with torch.inference_mode(), bar:
        reference = {}  # packed outputs, to check the exported rows against (taken after its timing)
        for kind, source, fn, model_bytes in rows:
            for b, x in inputs.items():
                bar.set_postfix_str(f"{kind} batch {b}")
                error = None
                try:
                    with memory_probe(dev) as mem:
                        timing = measure(lambda fn=fn, x=x: fn(x), warmup=warmup, repeats=repeats, sync=sync,
                                         on_call=bar.update)
                except Exception as e:  # noqa: BLE001 - an exported file that cannot run a batch size is a row
                    if kind == "packed" or kind == "float":
                        raise
                    error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                row = {"model": kind, "source": source, "batch_size": b, "model_bytes": model_bytes}
                if error is None:
                    row.update(timing.to_dict(), peak_mem_bytes=mem.peak_bytes)
                    mem_method = mem.method
                    if kind == "packed":
                        reference[b] = fn(x)
                    elif b in reference and kind != "float":
                        diff = fn(x).to(dev).float() - reference[b].float()
                        row["max_abs_diff_vs_packed"] = diff.abs().max().item()
                else:
                    row["error"] = error
                results.append(row)
    by_key = {(r["model"], r["batch_size"]): r for r in results}
    for r in results:  # float median / this median at the same batch size: > 1 means faster than float
        f = by_key.get(("float", r["batch_size"]))
        if f is not None and "median_ms" in r and "median_ms" in f:
            r["speedup_vs_float"] = f["median_ms"] / r["median_ms"]
    from ._version import __version__

    return {
        "checkpoint": str(checkpoint), "arch": model_info(packed).arch, "scheme": model_info(packed).config.scheme_name,
        "device": str(dev), "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "dfqkern_version": __version__, "batch_sizes": list(batch_sizes), "input_size": list(spec.input_size),
        "warmup": warmup, "repeats": repeats, "mem_method": mem_method,
        "timing": "torch.inference_mode; first call and warm-up excluded; per-call time.perf_counter"
                  + (" with cuda synchronize" if dev.type == "cuda" else ""),
        "rows": results,
    }


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.2f}"


def format_table(result: dict) -> str:
    """The small table ``dfqkern bench`` prints."""
    w = max([12] + [len(r["model"]) for r in result["rows"]])  # "packed-compiled" is wider than the rest
    lines = [f"{result['checkpoint']}: {result['arch']} {result['scheme']} on {result['device']}, "
             f"{result['threads']} thread(s); warm-up {result['warmup']} (first call excluded), median / min of "
             f"{result['repeats']}",
             f"{'model':{w}} {'batch':>5} {'median ms':>10} {'min ms':>9} {'1st call ms':>11} {'vs float':>8} "
             f"{'peak MiB':>9} {'model MiB':>11}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['model']:{w}} {r['batch_size']:>5}  error: {r['error']}")
            continue
        speed = f"{r['speedup_vs_float']:.2f}x" if "speedup_vs_float" in r else "-"
        lines.append(f"{r['model']:{w}} {r['batch_size']:>5} {r['median_ms']:10.3f} {r['min_ms']:9.3f} "
                     f"{r['first_call_ms']:11.3f} {speed:>8} {_mib(r['peak_mem_bytes']):>9} "
                     f"{_mib(r['model_bytes']):>11}")
    lines.append(f"peak: {result['mem_method']}, above the process before each row's calls; model: its tensors "
                 f"(packed and {COMPILED}, float) or its file (onnxruntime, pt2)")
    return "\n".join(lines)
