"""Peer libraries forced to a lower instruction set, measured in a child process (bench/test_bench_cpu.py).

dfqkern's rows run at every ISA level the CPU has (``[avx2]`` beside ``[avx512vnni]``), but fbgemm, oneDNN,
MKL and ATen choose their kernels once per process, from the CPU's best. So an ``[avx2]`` dfqkern row set
beside in-process peers is AVX2 against VNNI, not what a user of an AVX2-only machine sees. The forcible
peer tests therefore run a second time, in one child pytest process started with each library's own cap
(:data:`FORCE_ENV`) and the parent's benchmark options; the child reports each test's outcome and
pytest-benchmark row, and the parent adds those rows (tagged ``[avx2]``) to its table.

Imports no torch (bench/conftest.py reads it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# level -> the environment that caps every peer library that has a control. Each library reads its variable once
# (at first use), so only a new process can be forced. From the libraries' sources:
#   fbgemm  FBGEMM_ENABLE_INSTRUCTIONS: AVX2 | AVX512 | AVX512_E1 (VNNI) | AVX512_256 | AVX512_E1_256
#           (src/Utils.cc, fbgemmEnvGetIsa, a static in fbgemmInstructionSet; ignored if above the CPU's best)
#   oneDNN  ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA): SSE41 | AVX | AVX2 | AVX2_VNNI | AVX512_CORE | ...
#           (cpu_isa_traits.cpp, init_max_cpu_isa; ONEDNN_VERBOSE=1 prints "isa:Intel AVX2")
#   MKL     MKL_ENABLE_INSTRUCTIONS: AVX2 | AVX512 | ... (fp32 F.linear's sgemm; MKL_VERBOSE=1 prints the level)
#   ATen    ATEN_CPU_CAPABILITY: default | avx2 | avx512 (DispatchStub kernels: the int4pack matmul, elementwise
#           ops; torch.backends.cpu.get_cpu_capability() reports it, and the child records it)
FORCE_ENV = {"avx2": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}

# Peers with no ISA control, by row-name prefix: their rows always run at their own choice.
UNFORCEABLE = {"onnxruntime": "onnxruntime's MLAS picks its kernels from CPUID once (mlas/lib/platform.cpp) "
                              "and has no setting that lowers them"}

CHILD_ENV = "DFQKERN_BENCH_PEER_ISA"  # set in the child: the level its peers are forced to
REPORT_ENV = "DFQKERN_BENCH_CHILD_REPORT"  # set in the child: where it writes outcomes and rows (JSON)
PARAM = "peer_isa"  # the test parameter: None (own choice, in process) or a level of FORCE_ENV (in the child)

ROWS = pytest.StashKey[list]()  # (module, row) from the children, for the ratio tables
_CHILDREN = pytest.StashKey[dict]()  # level -> the child's report


def forced_here() -> str | None:
    """The level this process's peers are forced to (in a child), else None."""
    level = os.environ.get(CHILD_ENV) or None
    if level is not None and level not in FORCE_ENV:
        raise ValueError(f"{CHILD_ENV}={level!r}: expected one of {sorted(FORCE_ENV)}")
    return level


def levels_to_force(dfqkern_levels: list[str], own_level: str) -> list[str]:
    """dfqkern's forced levels that the peers do not reach by themselves here and that can be forced."""
    return [lv for lv in dfqkern_levels if lv in FORCE_ENV and lv != own_level]


def unforceable(row: str) -> str | None:
    """Why the peer of row name ``row`` cannot be forced to an ISA, or None when it can."""
    return next((why for prefix, why in UNFORCEABLE.items() if row.startswith(prefix)), None)


def row_of(bench) -> dict | None:
    """The ratio-table row of a pytest-benchmark result (its ``extra_info`` plus group and median / min in us),
    or None when it is no table row or has no timings (``--benchmark-disable``)."""
    info = getattr(bench, "extra_info", {}) or {}
    stats = getattr(bench, "stats", None)
    if "row" not in info or stats is None or not getattr(stats, "rounds", 0):
        return None
    return dict(info, group=bench.group, median=stats.median * 1e6, min=stats.min * 1e6)


class ChildReport:
    """Plugin of the child process (registered by bench/conftest.py when REPORT_ENV is set): writes each test's
    outcome and row, keyed by node id, and the ATen capability it ran under, to REPORT_ENV."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.outcomes: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.outcomes[report.nodeid] = {"outcome": "skipped", "reason": reason}
        elif report.failed:
            self.outcomes[report.nodeid] = {"outcome": "failed", "reason": str(report.longrepr)[-3000:]}
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, {"outcome": "passed"})

    def pytest_sessionfinish(self, session):
        rows = {}
        for bench in getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None) or []:
            row = row_of(bench)
            if row is not None:
                rows[bench.fullname] = row
        torch = sys.modules.get("torch")
        aten = torch.backends.cpu.get_cpu_capability() if torch is not None else "unknown"
        self.path.write_text(json.dumps({"outcomes": self.outcomes, "rows": rows, "aten_capability": aten}))


def _benchmark_args(config) -> list[str]:
    """The parent's pytest-benchmark timing options, for the child (rows of one table, one method)."""
    opt = config.getoption
    disabled = getattr(getattr(config, "_benchmarksession", None), "disabled", True)
    args = ["--benchmark-disable" if disabled else "--benchmark-enable",
            f"--benchmark-min-time={opt('benchmark_min_time')}", f"--benchmark-max-time={opt('benchmark_max_time')}",
            f"--benchmark-min-rounds={opt('benchmark_min_rounds')}", f"--benchmark-timer={opt('benchmark_timer')}",
            f"--benchmark-calibration-precision={opt('benchmark_calibration_precision')}",
            f"--benchmark-warmup={'on' if opt('benchmark_warmup') else 'off'}",
            f"--benchmark-warmup-iterations={opt('benchmark_warmup_iterations')}"]
    return args + (["--benchmark-disable-gc"] if opt("benchmark_disable_gc") else [])


def _run_child(session, level: str, threads: int) -> dict:
    """Run every selected test of this session parametrized ``peer_isa=level`` in one child pytest with the peers
    capped to ``level`` (once per level and session); the child's report plus its exit code and output tail."""
    children = session.config.stash.setdefault(_CHILDREN, {})
    if level in children:
        return children[level]
    ids = [it.nodeid for it in session.items
           if getattr(getattr(it, "callspec", None), "params", {}).get(PARAM) == level]
    with tempfile.TemporaryDirectory(prefix="dfqkern-peers-") as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ, **FORCE_ENV[level], **{CHILD_ENV: level, REPORT_ENV: str(report),
                                                       "DFQKERN_BENCH_THREADS": str(threads),
                                                       "DFQKERN_BENCH_DIR": tmp})  # the child's tables: thrown away
        env.pop("DFQKERN_BENCH_RESULTS", None)
        cmd = [sys.executable, "-m", "pytest", *ids, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               f"--rootdir={session.config.rootpath}", *_benchmark_args(session.config)]
        proc = subprocess.run(cmd, cwd=session.config.rootpath, env=env, capture_output=True, text=True)
        out = json.loads(report.read_text()) if report.exists() else {"outcomes": {}, "rows": {}}
    out.update(returncode=proc.returncode, output=(proc.stdout + proc.stderr)[-4000:], env=FORCE_ENV[level])
    children[level] = out
    return out


def record_child_row(request, level: str, threads: int) -> None:
    """This test's row as the child forced to ``level`` measured it, added to the parent's tables; the child's
    skip or failure is raised here. The child runs (once) when the first such test is reached."""
    child = _run_child(request.session, level, threads)
    nodeid = request.node.nodeid
    res = child["outcomes"].get(nodeid)
    if res is None:
        pytest.fail(f"the child process with peers forced to {level} did not run {nodeid} "
                    f"(exit {child['returncode']}):\n{child['output']}")
    if res["outcome"] == "skipped":
        pytest.skip(f"in the child forced to {level}: {res['reason']}")
    if res["outcome"] == "failed":
        pytest.fail(f"in the child forced to {level}:\n{res['reason']}")
    row = child["rows"].get(nodeid)
    if row is not None:  # None under --benchmark-disable: the case ran once, untimed
        request.config.stash.setdefault(ROWS, []).append((Path(nodeid.split("::")[0]).stem, row))


def describe(config, own_level: str) -> str:
    """The table header's sentence on which peer ran at which ISA."""
    own = f"untagged peer rows run at their own ISA choice (the best this CPU offers: {own_level})"
    children = config.stash.get(_CHILDREN, {})
    forced = [f"peer rows tagged [{lv}] ran in one child process with "
              + ", ".join(f"{k}={v}" for k, v in c["env"].items())
              + f" (ATen capability there: {c.get('aten_capability', 'unknown')})" for lv, c in children.items()]
    never = "; ".join(f"{name} rows are never forced ({why})" for name, why in UNFORCEABLE.items())
    return ("Peers: " + "; ".join([own] + (forced or ["no peer was forced in this run"])) + f"; {never}. "
            "Ratios compare rows at one ISA: own choice with own choice, a forced [isa] row with the peer forced to "
            "(or choosing) that ISA, never with a peer at another ISA (no such peer: no ratio).")
