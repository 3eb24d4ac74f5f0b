"""Ratio tables for the pytest-benchmark suites in bench/ (printed at the end of a run).

A benchmark takes part when it sets ``benchmark.group`` and ``extra_info`` ``row`` (label) and
``role`` ('baseline', 'dfqkern' or 'floor'); the baseline with ``primary=True`` is the group's
reference for the ratio columns. Groups listed in :data:`TARGETS` also get a met / missed line.
Rows that record ``isa`` (and ``forced``) are compared only with a reference at the same ISA
(:func:`_reference`); peer rows forced to a lower ISA come from a child process (bench/forced_peers.py).
The tables are written to ``$DFQKERN_BENCH_DIR/<module>.md`` (default ``runs/``) as well.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forced_peers  # noqa: E402  (torch-free too)
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


def pytest_configure(config):
    if os.environ.get(forced_peers.REPORT_ENV):  # a child with forced peers: report rows to the parent
        config.pluginmanager.register(forced_peers.ChildReport(os.environ[forced_peers.REPORT_ENV]),
                                      "dfqkern-forced-peers-report")


def _collect(config):
    """module -> group -> rows: this process's benchmarks, then the rows its child processes measured."""
    session = getattr(config, "_benchmarksession", None)
    found = [(Path(str(b.fullname).split("::")[0]).stem, forced_peers.row_of(b))
             for b in getattr(session, "benchmarks", None) or []]
    rows = {}
    for module, row in found + list(config.stash.get(forced_peers.ROWS, [])):
        if row is not None:
            rows.setdefault(module, {}).setdefault(row["group"], []).append(row)
    return rows


def _floor(rows, wbits):
    for r in rows:
        if r["role"] == "floor" and r.get("wbits") == wbits:
            return r
    return None


def _candidates(rows, peer=None):
    """The baselines a row may be compared with: the primary ones, or those named ``peer``."""
    return [b for b in rows if b["role"] == "baseline" and (b["row"].startswith(peer) if peer else b.get("primary"))]


def _reference(rows, r, peer=None):
    """The baseline row ``r`` is compared with: the group's primary baseline (or the first baseline named ``peer``)
    at r's ISA. Rows at their own ISA choice compare with peers at theirs (what a user of this machine gets); a row
    forced to an ISA compares with the peer forced to that ISA, else with one whose own choice it is; never with a
    peer at another ISA (None then). Rows without ISA bookkeeping (the GPU tables) take the first candidate."""
    cands = _candidates(rows, peer)
    if "isa" not in r:
        return cands[0] if cands else None
    if not r.get("forced"):
        return next((b for b in cands if not b.get("forced")), None)
    same = [b for b in cands if b.get("isa") == r["isa"]]
    return next((b for b in same if b.get("forced")), same[0] if same else None)


def _isa_cell(r) -> str:
    if "isa" not in r or r["role"] == "floor":
        return ""
    if r.get("forced"):
        return f"{r['isa']} (forced)"
    if r["role"] == "dfqkern":
        return f"{r['isa']} (auto)"
    return f"{r['isa']} (own choice{'; cannot be forced' if forced_peers.unforceable(r['row']) else ''})"


def _table(groups: dict) -> list[str]:
    out = []
    verdicts = []
    for group, rows in groups.items():
        base = next((b for b in _candidates(rows) if not b.get("forced")), None)
        with_isa = any("isa" in r for r in rows)
        order = {"baseline": 0, "floor": 1, "dfqkern": 2}
        rows = sorted(rows, key=lambda r: (order.get(r["role"], 3), r["row"]))
        out += [f"\n### {group}", "",
                "| row |" + (" ISA |" if with_isa else "") + " median us | min us | speed-up vs " +
                (base["row"] if base else "-") + (" at the row's ISA" if with_isa else "") +
                " (median / min) | x memory floor (median / min) |",
                "|---|" + ("---|" if with_isa else "") + "---:|---:|---:|---:|"]
        for r in rows:
            ref = _reference(rows, r) if r["role"] != "floor" else None
            sp = f"{ref['median'] / r['median']:.2f} / {ref['min'] / r['min']:.2f}" if ref else ""
            fl = _floor(rows, r.get("wbits")) if r["role"] == "dfqkern" else None
            fx = f"{r['median'] / (fl['median'] / 2):.2f} / {r['min'] / (fl['min'] / 2):.2f}" if fl else ""
            if r["role"] == "floor":
                fx = f"floor = {r['median'] / 2:.0f} / {r['min'] / 2:.0f} us"
            isa = f" {_isa_cell(r)} |" if with_isa else ""
            out.append(f"| {r['row']} |{isa} {r['median']:.0f} | {r['min']:.0f} | {sp} | {fx} |")
        for gp, rp, kind, bound, *peer in TARGETS:
            if not group.startswith(gp):
                continue
            for r in rows:
                if r["role"] != "dfqkern" or not r["row"].startswith(rp):
                    continue
                ref = _reference(rows, r, peer[0] if peer else None)
                if kind == "speedup" and ref:
                    med, mn = ref["median"] / r["median"], ref["min"] / r["min"]
                    ok = mn >= bound
                    verdicts.append(f"- {group} / {r['row']}: speed-up over {ref['row']} {med:.2f} (median), "
                                    f"{mn:.2f} (min); target >= {bound}: {'met' if ok else 'MISSED'}")
                elif kind == "speedup" and _candidates(rows, peer[0] if peer else None):
                    name = peer[0] if peer else base["row"] if base else "the primary baseline"
                    why = forced_peers.unforceable(name) or "not measured at that ISA in this run"
                    verdicts.append(f"- {group} / {r['row']}: no {name} row at {r['isa']} ({why}); not judged")
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
        peers = (forced_peers.describe(config, machine.best_isa()) if any("isa" in r for rs in groups.values()
                                                                           for r in rs)
                 else "fbgemm/oneDNN/MKL/onnxruntime use their own ISA choice")
        lines = [f"## {module}", "", f"CPU: {cpu}; dfqkern ISA (auto): {isa}; caches: {machine.describe_caches()}; "
                 f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; threads: {torch.get_num_threads()}; "
                 f"{peers}"] + _table(groups)
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
