"""The one timing method of the GPU benchmarks, and the recorder their rows go through.

:func:`time_ms` times every row, Triton, CUDA and baseline alike: ``warmup`` untimed calls, then per
repetition a 256 MiB buffer is zeroed (so weights come from DRAM, not L2, as for a layer that runs
after others) and a pair of CUDA events is recorded around one call; all repetitions are queued,
then one ``torch.cuda.synchronize``; the median of the event times is returned. Host work that
fits under the flush (some tens of µs) is hidden, as in ``triton.testing.do_bench``;
whole-model rows, where Python runs between kernels, include what does not.

:class:`Recorder` appends the rows to ``$DFQKERN_BENCH_DIR/gpu_records.jsonl`` (default ``runs/gpu``);
``bench/gpu_tables.py`` turns them into the table.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_tables  # noqa: E402  (bench/gpu_tables.py: the record format)

FLUSH_BYTES = 256 << 20
_flush = {}


def _flush_buffer():
    import torch

    dev = torch.cuda.current_device()
    if dev not in _flush:
        _flush[dev] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return _flush[dev]


def time_ms(fn, warmup: int = 10, reps: int = 50, flush: bool = True, device: str = "cuda") -> float:
    """Median milliseconds of ``fn()`` (see the module doc). ``device="cpu"`` times with the host clock
    instead: it lets the CPU tests check the warm-up / repetition / median logic."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device == "cpu":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import torch

    buf = _flush_buffer() if flush else None
    pairs = []
    for _ in range(reps):
        if buf is not None:
            buf.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def env_record() -> dict:
    import torch

    try:
        from importlib.metadata import version

        triton_version = version("triton")  # no import needed for a version
    except Exception:
        triton_version = None
    cap = list(torch.cuda.get_device_capability())
    return {"kind": "env", "device": torch.cuda.get_device_name(), "capability": cap, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version}


def measure_peaks() -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written, 1 GiB fp16 copy), fp16 and int8 8192^3 matmul rates
    (T(FL)OP/s). A peak that cannot be measured here is left out (its roofline cells show "-")."""
    import torch

    def copy():
        src = torch.randn(1 << 29, device="cuda", dtype=torch.float16)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / (time_ms(lambda: dst.copy_(src), 3, 10, flush=False) * 1e-3) / 1e9

    s = 8192

    def fp16():
        a = torch.randn(s, s, device="cuda", dtype=torch.float16)
        return 2 * s ** 3 / (time_ms(lambda: torch.matmul(a, a), 3, 10, flush=False) * 1e-3) / 1e12

    def int8():
        a8 = torch.randint(-128, 128, (s, s), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-128, 128, (s, s), device="cuda", dtype=torch.int8).t()  # column-major: the fast layout
        return 2 * s ** 3 / (time_ms(lambda: torch._int_mm(a8, b8), 3, 10, flush=False) * 1e-3) / 1e12

    peaks = {}
    for name, fn in (("copy", copy), ("fp16 matmul", fp16), ("int8 matmul", int8)):
        try:
            peaks[name] = fn()
        except Exception as e:  # e.g. torch._int_mm missing on this build
            print(f"gpu_timing: peak {name!r} not measured: {type(e).__name__}: {e}", file=sys.stderr)
    return peaks


class Recorder:
    """Appends records tagged with this process's ``run`` to the records file."""

    def __init__(self, run: str, out_dir: str | os.PathLike | None = None):
        self.run = run
        out = Path(out_dir or os.environ.get("DFQKERN_BENCH_DIR", "runs/gpu"))
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / gpu_tables.RECORDS_FILE

    def __call__(self, **record) -> dict:
        record["run"] = self.run
        gpu_tables.append_record(self.path, record)
        return record

    def measure(self, fn, *, section: str, case: str, impl: str, role: str = "dfqkern", check=None,
                warmup: int = 10, reps: int = 50, **fields) -> float:
        """Time ``fn`` (after ``check()``, a correctness assertion) and record it; on an exception record an
        ``error`` row (so the table shows the failure) and re-raise."""
        try:
            if check is not None:
                check()
            us = time_ms(fn, warmup, reps) * 1e3
        except Exception as e:
            self(kind="error", section=section, case=case, impl=impl, error=f"{type(e).__name__}: {e}"[:300])
            raise
        self(kind="time", section=section, case=case, impl=impl, role=role, us=us, **fields)
        return us
