"""The GPU benchmark's records, goals and table (markdown + json). Plain Python: no torch, runs on CPU.

The GPU benchmarks (bench/test_bench_gpu_kernels.py, bench/test_bench_gpu_models.py) append one
JSON line per measurement to ``<out>/gpu_records.jsonl`` as they go, so a crash or a timeout keeps
what was measured before it. This module turns those records into ``gpu_bench.md`` and
``gpu_bench.json``, one row per ratio, each ratio between two measurements of the same process
("run"), with the goal that applies to it and whether it is met::

    python3 bench/gpu_tables.py runs/gpu/gpu_records.jsonl runs/gpu

Records (``kind``):

* ``env``: ``device``, ``capability`` ([major, minor]), ``torch``, ``triton``, ``cuda``.
* ``peak``: ``name``, ``value``: ``copy`` in GB/s (bytes read + written), ``fp16 matmul`` / ``int8 matmul``
  in T(FL)OP/s.
* ``time``: ``section``, ``case``, ``impl``, ``us`` (median µs), ``role`` (``baseline`` or ``dfqkern``);
  dfqkern rows name what they are compared with in ``vs`` (impl labels of the same run, section and
  case) and may carry ``bytes`` (the fewest bytes the op must move), ``m``, ``batch``, ``scheme``,
  ``backend``, ``path``.
* ``memory``: like ``time`` with ``bytes`` instead of ``us`` (section ``memory``).
* ``error``: ``section``, ``case``, ``impl``, ``error``: a measurement that raised (shown as FAILED).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RECORDS_FILE = "gpu_records.jsonl"
TABLE_STEM = "gpu_bench"

# Baseline labels: the benchmarks record baselines under these names and the goals below refer to them.
FP16_CUBLAS = "fp16 F.linear (cuBLAS)"
BF16_CUBLAS = "bf16 F.linear (cuBLAS)"
CUDNN_FP16 = "fp16 F.conv2d (cuDNN, channels-last)"
FP16_EAGER = "fp16 eager"
FP16_COMPILE = "fp16 torch.compile"
ROOFLINE = "copy bandwidth (roofline)"
ROOFLINE_MAX_M = 16  # achieved bandwidth is reported (and judged) where the packed weights dominate the bytes

SECTIONS = {  # table order and titles
    "linear": "Packed Linear (activation quantization + GEMM, fp16 in / out)",
    "conv": "Implicit-GEMM Conv2d W4A8 (ResNet-50 3x3, channels-last fp16 in / out)",
    "fake-quant fwd": "Fused fake-quant, forward (per-channel, 8-bit)",
    "fake-quant fwd+bwd": "Fused fake-quant, forward + LSQ backward",
    "adaround fwd+bwd": "Fused AdaRound, forward + backward (4-bit)",
    "attention": "Exact int32 attention matmul (matmul_int, ViT-B q.k^T and attn.v) vs fp16 torch.matmul",
    "model": "Whole models (random weights), packed W4A8 vs fp16",
    "memory": "GPU memory of the model",
}
FUSED_SECTIONS = ("fake-quant fwd", "fake-quant fwd+bwd", "adaround fwd+bwd")
A8_SCHEMES = ("w4a8", "w2a8")


def impl_label(backend: str, scheme: str, path: str | None = None) -> str:
    """Name of a packed-kernel row, e.g. ``cuda W4A4 [int4 mma]``; the A4 goal finds the A8 row by it."""
    return f"{backend} {scheme.upper()}" + (f" [{path} mma]" if path else "")


def a8_label(rec: dict) -> str:
    """The A8 row an A4 row of the same backend and weight width is compared with."""
    return impl_label(rec["backend"], rec["scheme"].split("a")[0] + "a8")


# ----------------------------------------------------------------------------- goals

def _sm(env: dict) -> int | None:
    cap = env.get("capability")
    return None if not cap else 10 * int(cap[0]) + int(cap[1])


def _int4_tensor_cores(env: dict) -> str | None:
    sm = _sm(env)
    if sm is None:
        return "GPU unknown"
    return None if 80 <= sm < 90 else f"sm_{sm} has no int4 tensor-core mma (the goal is for sm_80-sm_89)"


@dataclass(frozen=True)
class Goal:
    text: str
    bound: float
    applies: Callable[[dict, str], bool]  # (dfqkern record, vs label)
    strict: bool = False  # ratio > bound rather than >=
    not_here: Callable[[dict], str | None] = lambda env: None  # why the goal means nothing on this GPU

    def met(self, ratio: float) -> bool:
        return ratio > self.bound if self.strict else ratio >= self.bound


GOALS = (
    Goal(">= 1.5x fp16 cuBLAS (M <= 64)", 1.5,
         lambda r, vs: r["section"] == "linear" and r.get("scheme") in A8_SCHEMES and r.get("m", 1 << 30) <= 64
         and vs == FP16_CUBLAS),
    Goal(">= 70 % of copy bandwidth (M <= 16)", 0.70,
         lambda r, vs: r["section"] == "linear" and r.get("scheme") in A8_SCHEMES and vs == ROOFLINE),
    Goal(">= 1.3x the A8 path (int4 tensor cores)", 1.3,
         lambda r, vs: r["section"] == "linear" and r.get("path") == "int4" and vs == a8_label(r),
         not_here=_int4_tensor_cores),
    Goal(">= 1.5x cuDNN fp16 (batch 1-8)", 1.5,
         lambda r, vs: r["section"] == "conv" and r.get("scheme") == "w4a8" and r.get("batch", 1 << 30) <= 8
         and vs == CUDNN_FP16),
    Goal(">= 5x the torch ops", 5.0, lambda r, vs: r["section"] in FUSED_SECTIONS),
    Goal("faster than fp16 eager (batch 1)", 1.0,
         lambda r, vs: r["section"] == "model" and r.get("batch") == 1 and vs == FP16_EAGER, strict=True),
)


# ----------------------------------------------------------------------------- records

def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line (one short write: a killed run leaves at most one torn last line)."""
    line = json.dumps(record, sort_keys=True, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def load_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The records of a jsonl file and the number of unreadable lines skipped (a torn last line)."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and "kind" in rec:
                records.append(rec)
            else:
                bad += 1
    return records, bad


# ----------------------------------------------------------------------------- rows

def _env(records: list[dict]) -> dict:
    envs = [r for r in records if r["kind"] == "env"]
    env = dict(envs[0]) if envs else {}
    env.pop("kind", None)
    env.pop("run", None)
    devices = sorted({str(e.get("device")) for e in envs})
    if len(devices) > 1:
        env["warning"] = f"records come from several devices: {devices}"
    return env


def _peaks(records: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r["kind"] == "peak":
            out.setdefault(r.get("run", ""), {})[r["name"]] = float(r["value"])
    return out


def _verdict(rec: dict, vs: str, ratio: float | None, env: dict) -> tuple[str, str]:
    for goal in GOALS:
        if not goal.applies(rec, vs):
            continue
        why = goal.not_here(env)
        if why:
            return goal.text, f"n/a ({why})"
        if ratio is None:
            return goal.text, "n/a (nothing to compare with in this run)"
        return goal.text, "yes" if goal.met(ratio) else "NO"
    return "", ""


def build_rows(records: list[dict]) -> list[dict]:
    """One row per (dfqkern measurement, what it is compared with), in table order."""
    env = _env(records)
    peaks = _peaks(records)
    index: dict[tuple, dict] = {}
    for r in records:
        if r["kind"] in ("time", "memory"):
            index[(r.get("run", ""), r["section"], r["case"], r["impl"])] = r
    rows = []
    for r in records:
        if r["kind"] == "error":
            rows.append(dict(section=r["section"], case=r["case"], impl=r["impl"], run=r.get("run", ""),
                             value=None, vs="", vs_value=None, ratio=None, unit="", goal="",
                             met="FAILED: " + str(r.get("error", "?"))[:160]))
            continue
        if r["kind"] not in ("time", "memory") or r.get("role") != "dfqkern":
            continue
        value_key = "us" if r["kind"] == "time" else "bytes"
        comparisons = list(r.get("vs", ()))
        if (r["section"] == "linear" and r.get("bytes") and r.get("m", 1 << 30) <= ROOFLINE_MAX_M):
            comparisons.append(ROOFLINE)
        for vs in comparisons:
            base = index.get((r.get("run", ""), r["section"], r["case"], vs))
            if vs == ROOFLINE:
                copy = peaks.get(r.get("run", ""), {}).get("copy")
                achieved = r["bytes"] / (r["us"] * 1e-6) / 1e9  # GB/s
                ratio, vs_value, unit = (achieved / copy if copy else None), copy, "%"
            else:
                vs_value = None if base is None else base[value_key]
                ratio = None if not vs_value or not r[value_key] else vs_value / r[value_key]
                unit = "x"
            goal, met = _verdict(r, vs, ratio, env)
            rows.append(dict(section=r["section"], case=r["case"], impl=r["impl"], run=r.get("run", ""),
                             value=r[value_key], vs=vs, vs_value=vs_value, ratio=ratio, unit=unit, goal=goal,
                             met=met))
    order = {s: i for i, s in enumerate(SECTIONS)}
    rows.sort(key=lambda row: order.get(row["section"], len(order)))  # stable: measurement order within a section
    return rows


def summarize(rows: list[dict]) -> dict:
    per_goal = {g.text: {"met": 0, "missed": 0, "n/a": 0} for g in GOALS}
    failed = 0
    for row in rows:
        if row["met"].startswith("FAILED"):
            failed += 1
        elif row["goal"]:
            key = "met" if row["met"] == "yes" else "missed" if row["met"] == "NO" else "n/a"
            per_goal[row["goal"]][key] += 1
    total = {k: sum(v[k] for v in per_goal.values()) for k in ("met", "missed", "n/a")}
    return {"goals": per_goal, "total": total, "failed_measurements": failed}


# ----------------------------------------------------------------------------- rendering

def _num(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "MiB":
        return f"{v / 2 ** 20:.1f}"
    if unit == "GB/s":
        return f"{v:.0f} GB/s"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _ratio(row: dict) -> str:
    if row["ratio"] is None:
        return "-"
    return f"{100 * row['ratio']:.0f} %" if row["unit"] == "%" else f"{row['ratio']:.2f}x"


def render_markdown(records: list[dict], rows: list[dict], summary: dict, skipped_lines: int = 0) -> str:
    env = _env(records)
    peaks = _peaks(records)
    cap = env.get("capability")
    lines = [f"# GPU benchmark: {env.get('device', 'unknown GPU')}" + (f" (sm_{cap[0]}{cap[1]})" if cap else ""), ""]
    lines.append(f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), triton {env.get('triton', '-')}.")
    for run, p in sorted(peaks.items()):
        desc = ", ".join(f"{k} {v:.0f} {'GB/s' if k == 'copy' else 'T(FL)OP/s'}" for k, v in sorted(p.items()))
        lines.append(f"Peaks measured in run `{run}`: {desc}.")
    lines += ["",
              "Every ratio compares two measurements of the same process (run): speed-up = the baseline's time / the "
              "row's time; roofline = the bytes the op must move / its time, over the measured copy bandwidth; "
              "memory = the baseline's bytes / the row's. Timing (bench/gpu_timing.py, one method for every row): "
              "CUDA events around each call after warm-up calls, L2 flushed before each repetition, median.", ""]
    if env.get("warning"):
        lines += [f"**Warning: {env['warning']}**", ""]
    t = summary["total"]
    lines.append(f"Goals: {t['met']} met, {t['missed']} missed, {t['n/a']} n/a; "
                 f"{summary['failed_measurements']} measurement(s) failed.")
    lines += ["", "| goal | met | missed | n/a |", "|---|---:|---:|---:|"]
    for text, c in summary["goals"].items():
        lines.append(f"| {text} | {c['met']} | {c['missed']} | {c['n/a']} |")
    if skipped_lines:
        lines += ["", f"({skipped_lines} unreadable record line(s) skipped: a run was cut off mid-write.)"]
    for section, title in SECTIONS.items():
        srows = [r for r in rows if r["section"] == section]
        if not srows:
            continue
        unit = "MiB" if section == "memory" else "µs"
        lines += ["", f"## {title}", "",
                  f"| case | impl | {unit} | vs | vs {unit} | ratio | goal | met? |",
                  "|---|---|---:|---|---:|---:|---|---|"]
        for r in srows:
            vs_unit = "GB/s" if r["vs"] == ROOFLINE else unit
            lines.append(f"| {r['case']} | {r['impl']} | {_num(r['value'], unit)} | {r['vs']} | "
                         f"{_num(r['vs_value'], vs_unit)} | {_ratio(r)} | {r['goal']} | {r['met']} |")
    return "\n".join(lines) + "\n"


def _atomic_write(files: dict[Path, str]) -> None:
    """Write every file to a temporary name first, then rename them all: an error leaves the old files."""
    tmps: dict[Path, Path] = {}
    try:
        for path, text in files.items():
            tmps[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmps[path].write_text(text, encoding="utf-8")
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def write_tables(records: list[dict], out_dir: str | os.PathLike, skipped_lines: int = 0) -> tuple[Path, Path]:
    """Write ``gpu_bench.md`` and ``gpu_bench.json`` into ``out_dir``, never half-written (see _atomic_write)."""
    out = Path(out_dir)
    rows = build_rows(records)
    summary = summarize(rows)
    md = render_markdown(records, rows, summary, skipped_lines)
    js = json.dumps({"env": _env(records), "peaks": _peaks(records), "summary": summary, "rows": rows,
                     "goals": [{"text": g.text, "bound": g.bound} for g in GOALS],
                     "skipped_record_lines": skipped_lines}, indent=1, allow_nan=False)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{TABLE_STEM}.md", out / f"{TABLE_STEM}.json"
    _atomic_write({json_path: js + "\n", md_path: md})
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render the GPU benchmark records into gpu_bench.md / gpu_bench.json.")
    p.add_argument("records", help=f"the records file ({RECORDS_FILE})")
    p.add_argument("out_dir", help="where gpu_bench.md and gpu_bench.json go")
    args = p.parse_args(argv)
    try:
        records, bad = load_records(args.records)
    except OSError as e:
        print(f"gpu_tables: cannot read {args.records}: {e}", file=sys.stderr)
        return 1
    if not any(r["kind"] in ("time", "memory", "error") for r in records):
        print(f"gpu_tables: no benchmark measurements in {args.records}", file=sys.stderr)
        return 1
    md_path, _ = write_tables(records, args.out_dir, bad)
    print(md_path.read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
