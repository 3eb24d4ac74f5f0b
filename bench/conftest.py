"""Ratio tables for the pytest-benchmark suites in bench/ (printed at the end of a run).

A benchmark takes part when it sets ``benchmark.group`` and ``extra_info`` ``row`` (label) and
``role`` ('baseline', 'dfqkern' or 'floor'); the baseline with ``primary=True`` is the group's
reference for the ratio columns. Groups listed in :data:`TARGETS` also get a met / missed line.
The tables are written to ``$DFQKERN_BENCH_DIR/<module>.md`` (default ``runs/``) as well.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (torch-free: the timed runs keep their OpenMP setup)

# (group prefix, dfqkern row prefix, kind, bound[, peer row prefix]): kind 'speedup' = primary baseline
# (or the named peer row) / row >= bound, 'floor' = row / memory floor of the same weight width <= bound.
TARGETS = [
    ("linear M=1 K=N=4096", "dfqkern W4A8", "speedup", 2.0),
    ("linear M=1 K=N=4096", "dfqkern W4A8", "floor", 1.3),
    ("linear M=1 K=N=4096", "dfqkern W2A8", "speedup", 3.0),
    ("linear M=1 K=N=4096", "dfqkern W4A8", "speedup", 1.3, "onnxruntime MatMulNBits W4"),
    ("linear M=1 K=N=4096", "dfqkern W2A8", "speedup", 1.3, "onnxruntime MatMulNBits W2"),
    ("linear M=1 K=4096 N=", "dfqkern W", "floor", 1.3),
    ("linear 197x768->3072", "dfqkern W4A8", "speedup", 1.0),
    ("conv3x3", "dfqkern W4A8", "speedup", 2.0),
    ("fake-quant", "dfqkern fused", "speedup", 10.0),
    ("AdaRound", "dfqkern fused", "speedup", 10.0),
    ("model", "dfqkern W4A8 packed", "speedup", 1.0),
    ("model", "dfqkern W4A8 packed", "speedup", 1.0, "onnxruntime int8 QDQ"),
]


def _collect(config):
    session = getattr(config, "_benchmarksession", None)
    rows = {}
    for bench in getattr(session, "benchmarks", None) or []:
        info = getattr(bench, "extra_info", {}) or {}
        stats = getattr(bench, "stats", None)
        if "row" not in info or stats is None or not getattr(stats, "rounds", 0):
            continue
        module = Path(str(bench.fullname).split("::")[0]).stem
        rows.setdefault(module, {}).setdefault(bench.group, []).append(
            dict(info, median=stats.median * 1e6, min=stats.min * 1e6))
    return rows


def _floor(rows, wbits):
    for r in rows:
        if r["role"] == "floor" and r.get("wbits") == wbits:
            return r
    return None


def _table(groups: dict) -> list[str]:
    out = []
    verdicts = []
    for group, rows in groups.items():
        base = next((r for r in rows if r.get("primary")), None)
        order = {"baseline": 0, "floor": 1, "dfqkern": 2}
        rows = sorted(rows, key=lambda r: (order.get(r["role"], 3), r["row"]))
        out += [f"\n### {group}", "",
                "| row | median us | min us | speed-up vs " + (base["row"] if base else "-") +
                " (median / min) | x memory floor (median / min) |",
                "|---|---:|---:|---:|---:|"]
        for r in rows:
            sp = (f"{base['median'] / r['median']:.2f} / {base['min'] / r['min']:.2f}"
                  if base and r["role"] != "floor" else "")
            fl = _floor(rows, r.get("wbits")) if r["role"] == "dfqkern" else None
            fx = f"{r['median'] / (fl['median'] / 2):.2f} / {r['min'] / (fl['min'] / 2):.2f}" if fl else ""
            if r["role"] == "floor":
                fx = f"floor = {r['median'] / 2:.0f} / {r['min'] / 2:.0f} us"
            out.append(f"| {r['row']} | {r['median']:.0f} | {r['min']:.0f} | {sp} | {fx} |")
        for gp, rp, kind, bound, *peer in TARGETS:
            if not group.startswith(gp):
                continue
            ref = next((r for r in rows if r["row"].startswith(peer[0])), None) if peer else base
            for r in rows:
                if r["role"] != "dfqkern" or not r["row"].startswith(rp):
                    continue
                if kind == "speedup" and ref:
                    med, mn = ref["median"] / r["median"], ref["min"] / r["min"]
                    ok = mn >= bound
                    verdicts.append(f"- {group} / {r['row']}: speed-up over {ref['row']} {med:.2f} (median), "
                                    f"{mn:.2f} (min); target >= {bound}: {'met' if ok else 'MISSED'}")
                elif kind == "floor":
                    fl = _floor(rows, r.get("wbits"))
                    if fl:
                        med, mn = r["median"] / (fl["median"] / 2), r["min"] / (fl["min"] / 2)
                        ok = mn <= bound
                        verdicts.append(f"- {group} / {r['row']}: {med:.2f} x floor (median), {mn:.2f} (min); "
                                        f"target <= {bound}: {'met' if ok else 'MISSED'}")
    if verdicts:
        out += ["", "### targets (judged on minima)", ""] + verdicts
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    collected = _collect(config)
    for module, groups in collected.items():
        import torch

        cpu, isa = machine.cpu_name(), machine.dfqkern_isa()
        lines = [f"## {module}", "", f"CPU: {cpu}; dfqkern ISA (auto): {isa}; caches: {machine.describe_caches()}; "
                 f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; threads: {torch.get_num_threads()}; "
                 f"fbgemm/oneDNN/MKL/onnxruntime use their own ISA choice"] + _table(groups)
        terminalreporter.write_sep("=", f"ratios: {module}")
        for line in lines:
            terminalreporter.write_line(line)
        out_dir = Path(os.environ.get("DFQKERN_BENCH_DIR", "runs"))
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{module}.md.tmp"
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(out_dir / f"{module}.md")
            if module == "test_bench_cpu" and os.environ.get("DFQKERN_BENCH_RESULTS"):
                # results from different CPUs side by side: bench/results/cpu_latency_<cpu>.md
                res = Path(os.environ["DFQKERN_BENCH_RESULTS"]) / f"cpu_latency_{machine.slug(cpu)}-{isa}.md"
                res.parent.mkdir(parents=True, exist_ok=True)
                res.write_text("\n".join(lines) + "\n")
                terminalreporter.write_line(f"wrote {res}")
        except OSError as e:
            terminalreporter.write_line(f"(could not write {out_dir}/{module}.md: {e})")
