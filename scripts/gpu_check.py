"""GPU verification kit: build the extension for this GPU, run the GPU tests, then the GPU benchmarks.

Started by ``scripts/gpu_check.sh`` (see ``--help``). Standard library only: it runs under the GPU
machine's own ``python3`` (whatever torch and triton that image holds; no venv, no downloads).
Every stage is a child process with a hard time limit carved out of one wall-clock budget; a
failing or timed-out stage is reported and the next one runs, so a red kernel cannot hide the
others' results. Everything lands in one folder:

    gpu_check.log      everything printed, stage by stage
    summary.json       environment, each stage's status / time / limit, test counts, goals met
    junit.xml          all test and benchmark results (one <testsuite> per stage)
    gpu_records.jsonl  raw benchmark measurements (bench/gpu_tables.py)
    gpu_bench.md/json  the benchmark table: ratios, goal, met?
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
EXIT_FAILED, EXIT_NO_GPU = 1, 3  # argparse exits 2 on bad arguments
BUDGET_FULL, BUDGET_QUICK = 470, 230  # seconds: under the 8 / 4 minutes promised, with a margin
TERM_GRACE = 20  # seconds between SIGINT (pytest writes its junit file) and SIGKILL
OUTPUTS = ("gpu_check.log", "summary.json", "junit.xml", "gpu_records.jsonl", "gpu_bench.md", "gpu_bench.json")
PARTS = ".junit-parts"

# Python packages the run needs beyond torch, and those it can do without (what then happens).
REQUIRED = ("pytest", "tqdm", "setuptools")
OPTIONAL = {"triton": "the Triton tests and benchmark rows skip", "timm": "the model benchmark uses torchvision",
            "torchvision": "the model benchmark uses timm"}
# The probe runs in the target python: what torch sees. Last stdout line: JSON.
PROBE = r"""
import json, platform, sys
REQUIRED, OPTIONAL = %r, %r
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
else:
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)),
                    device_count=torch.cuda.device_count(),
                    memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
import importlib.util
info["modules"] = {m: importlib.util.find_spec(m) is not None for m in REQUIRED + OPTIONAL}
try:
    from importlib.metadata import version
    info["triton"] = version("triton")  # no import: triton's own import is slow and not needed here
except Exception:
    info["triton"] = None
print(json.dumps(info))
""" % (REQUIRED, tuple(OPTIONAL))


@dataclass
class Stage:
    name: str
    cmd: list[str]
    cap: int  # most seconds this stage may take
    floor: int  # seconds kept for it while earlier stages run; below this it is skipped
    env: dict = field(default_factory=dict)
    test_timeout: int = 0  # per-test limit (pytest stages)
    junit: str | None = None

    def plan(self) -> dict:
        return {"name": self.name, "cmd": self.cmd, "cap_s": self.cap, "floor_s": self.floor,
                "test_timeout_s": self.test_timeout, "env": self.env}


def stages(quick: bool, build: bool, python: str, out_dir: Path) -> list[Stage]:
    """The plan: build, correctness tests, then (full mode) benchmarks and the table. One pytest
    process per file, so a kernel that breaks the CUDA context takes only its own file down.
    ``-o addopts=`` drops pyproject's ``--benchmark-disable`` (pytest-benchmark need not be there)."""

    def pytest_stage(name, paths, cap, floor, test_timeout, env=None) -> Stage:
        cmd = [python, "-m", "pytest", *paths, "-p", "gpu_check_timeout", "-p", "no:cacheprovider",
               "-o", "addopts=", "-o", f"faulthandler_timeout={test_timeout + 10}", "-q", "-ra",
               f"--junitxml={out_dir / PARTS / (name + '.xml')}"]
        return Stage(name, cmd, cap, floor, env or {}, test_timeout, f"{PARTS}/{name}.xml")

    out = []
    if build:
        out.append(Stage("build", [python, "setup.py", "build_ext", "--inplace"], 150 if quick else 240, 60))
    out += [
        pytest_stage("test-build", ["tests/test_cuda_build.py"], 60, 15, 60),
        pytest_stage("test-cuda", ["tests/kernels/test_cuda_backend.py"], 120, 30, 90),
        pytest_stage("test-triton", ["tests/kernels/test_triton_backend.py"], 150, 30, 90),
        pytest_stage("test-matmul-int", ["tests/kernels/test_matmul_int.py"], 90, 20, 60),
        pytest_stage("test-e2e", ["tests/test_gpu_end_to_end.py"], 120, 30, 90),
    ]
    if not quick:
        out += [
            pytest_stage("bench-cuda", ["bench/test_bench_gpu_kernels.py"], 90, 30, 90,
                         {"DFQKERN_BENCH_BACKENDS": "cuda"}),
            pytest_stage("bench-triton", ["bench/test_bench_gpu_kernels.py"], 120, 30, 90,
                         {"DFQKERN_BENCH_BACKENDS": "triton"}),
            pytest_stage("bench-models", ["bench/test_bench_gpu_models.py"], 180, 45, 120),
            Stage("tables", [python, "bench/gpu_tables.py", str(out_dir / "gpu_records.jsonl"), str(out_dir)], 30, 0),
        ]
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="gpu_check.sh",
        description="Build dfqkern's extension for this machine's GPU, run the GPU correctness tests, then the GPU "
                    "benchmarks; everything goes into OUT_DIR (log, junit.xml, summary.json, gpu_bench.md/.json). "
                    "Needs an NVIDIA GPU, nvcc and a CUDA build of torch in $PYTHON (default python3); no network.",
        epilog="Exit status: 0 all stages passed; 1 a stage failed or timed out (the others still ran); "
               "2 bad arguments; 3 no usable GPU / nvcc / torch (nothing was run).")
    p.add_argument("out_dir", nargs="?", default=str(ROOT / "runs" / "gpu"),
                   help="output folder (default: runs/gpu in the repository)")
    p.add_argument("--quick", action="store_true", help="build + correctness tests only (under 4 minutes)")
    p.add_argument("--no-build", action="store_true", help="reuse the extension already built in place")
    p.add_argument("--budget", type=int, metavar="SECONDS",
                   help=f"wall-clock budget for all stages (default {BUDGET_FULL}, --quick {BUDGET_QUICK})")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.budget is not None and args.budget < 30:
        p.error(f"--budget must be at least 30 seconds, got {args.budget}")
    args.budget = args.budget or (BUDGET_QUICK if args.quick else BUDGET_FULL)
    return args


# ----------------------------------------------------------------------------- output

class Log:
    """Lines to stdout and to the log file; the file keeps everything even when stdout goes away (`| head`)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()
        self.echo = True

    def __call__(self, text: str = "") -> None:
        with self.lock:
            self.f.write(text + "\n")
            self.f.flush()
            if self.echo:
                try:
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    self.echo = False

    def close(self):
        self.f.close()


def fail_early(log, message: str) -> int:
    log(f"gpu_check: {message}")
    log("gpu_check: nothing was built or run.")
    return EXIT_NO_GPU


# ----------------------------------------------------------------------------- preflight

def find_nvcc() -> tuple[Path | None, list[str]]:
    """nvcc from $CUDA_HOME (or $CUDA_PATH), else $PATH, else /usr/local/cuda; and where it looked."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    if not home:
        candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    return found, ([f"{home}/bin"] if home else []) + ["$PATH"] + ([] if home else ["/usr/local/cuda/bin"])


def _run_text(cmd, timeout=60) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def probe(python: str) -> dict:
    try:
        r = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=180, cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        return {"probe_error": f"cannot run {python}: {e}"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"probe_error": f"{python} printed no probe result (exit {r.returncode}): {r.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def nproc() -> int:
    """CPUs this process may use (like nproc: a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def driver_version() -> str:
    out = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if shutil.which(
        "nvidia-smi") else ""
    if out:
        return out.splitlines()[0]
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return "unknown"


# ----------------------------------------------------------------------------- stages

def run_stage(stage: Stage, limit: int, env: dict, log: Log) -> tuple[int | None, float]:
    """Run one stage with a hard limit: SIGINT to its process group at the limit (pytest stops and
    writes its junit file), SIGKILL after TERM_GRACE more seconds. Returns (exit code or None, seconds)."""
    t0 = time.monotonic()
    with _sigint_reaches_children():
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except BaseException as e:  # the limit, or the driver itself interrupted: the stage must not outlive it
        if not isinstance(e, subprocess.TimeoutExpired):
            _kill_group(proc.pid, signal.SIGKILL)
            raise
        timed_out = True
        log(f"gpu_check: stage {stage.name} hit its {limit} s limit: interrupting it")
        for sig, grace in ((signal.SIGINT, TERM_GRACE), (signal.SIGKILL, 10)):
            if not _kill_group(proc.pid, sig):
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    _kill_group(proc.pid, signal.SIGKILL)  # leftovers of the stage (compile workers, a hung child)
    reader.join(timeout=5)
    return (None if timed_out else proc.returncode), time.monotonic() - t0


@contextlib.contextmanager
def _sigint_reaches_children():
    """An ignored SIGINT is inherited through exec (a background job of a non-interactive shell starts so, and so
    does anything after a library set SIG_IGN): the stage could then only be SIGKILLed and would write no junit
    file. A handled one is reset to the default at exec, so while the stage starts the driver handles it."""
    ignored = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_group(pgid: int, sig) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def merge_junit(out: Path, statuses: dict[str, str]) -> None:
    """One junit.xml of every pytest stage (``statuses``: stage name -> status); a stage that left no report
    (killed, crashed, skipped for time) appears as one error, so it cannot pass unseen."""
    merged = ET.Element("testsuites")
    for name, status in statuses.items():
        part = out / PARTS / f"{name}.xml"
        try:
            root = ET.parse(part).getroot()
        except (OSError, ET.ParseError):
            suite = ET.SubElement(merged, "testsuite", name=name, tests="1", errors="1", failures="0", skipped="0")
            case = ET.SubElement(suite, "testcase", classname="gpu_check", name=name)
            ET.SubElement(case, "error", message=f"{name}: no junit report ({status}); see gpu_check.log")
            continue
        for suite in ([root] if root.tag == "testsuite" else list(root.iter("testsuite"))):
            suite.set("name", name)
            merged.append(suite)
    tmp = out / ".junit.xml.tmp"
    ET.ElementTree(merged).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out / "junit.xml")
    shutil.rmtree(out / PARTS, ignore_errors=True)


def status_of(rc: int | None) -> str:
    return "TIMEOUT" if rc is None else "passed" if rc == 0 else f"FAILED (exit {rc})"


def main(argv=None) -> int:
    args = parse_args(argv)
    python = os.environ.get("PYTHON", "python3")
    if os.sep in python:  # stages run from the repo root; abspath keeps a venv's python (resolve would not)
        python = os.path.abspath(python)
    out = Path(args.out_dir)
    if not out.is_absolute():
        out = Path.cwd() / out
    plan = stages(args.quick, not args.no_build, python, out)
    if args.dry_run:
        print(json.dumps({"mode": "quick" if args.quick else "full", "out_dir": str(out), "budget_s": args.budget,
                          "python": python, "root": str(ROOT), "stages": [s.plan() for s in plan]}, indent=1))
        return 0

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a run's folder holds that run only
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    log = Log(out / "gpu_check.log")
    try:
        return _run(args, python, out, plan, start, log)
    finally:
        log.close()


def _run(args, python, out, plan, start, log) -> int:
    log(f"gpu_check: {'quick' if args.quick else 'full'} run, budget {args.budget} s, output in {out}")
    nvcc, searched = find_nvcc()
    if nvcc is None:
        return fail_early(log, f"no nvcc found (looked in {', '.join(searched)}): the CUDA extension cannot be "
                               "built. Set CUDA_HOME to the CUDA toolkit.")
    info = probe(python)
    if "probe_error" in info:
        return fail_early(log, info["probe_error"])
    if "torch_error" in info:
        return fail_early(log, f"{python} cannot import torch ({info['torch_error']}); set PYTHON to the "
                               "interpreter that holds the CUDA build of torch.")
    if not info.get("torch_cuda"):
        return fail_early(log, f"torch {info['torch']} in {info['executable']} is a CPU-only build: no CUDA GPU "
                               "can be used. Run this where torch is built with CUDA.")
    if not info.get("cuda_available"):
        return fail_early(log, f"no CUDA GPU visible to torch {info['torch']} (CUDA {info['torch_cuda']}) in "
                               f"{info['executable']}: run this on a machine with an NVIDIA GPU and its driver.")
    missing = [m for m in REQUIRED if not info.get("modules", {}).get(m)]
    if missing:
        return fail_early(log, f"{python} lacks {', '.join(missing)}: carry them as wheels (no network here) and put "
                               "them on PYTHONPATH.")
    cap = info["capability"]
    nvcc_lines = _run_text([str(nvcc), "--version"]).splitlines() or ["?"]
    info.update(nvcc=str(nvcc), nvcc_version=next((ln for ln in nvcc_lines if "release" in ln), nvcc_lines[-1]),
                driver=driver_version(), nproc=nproc(), archs=f"{cap[0]}{cap[1]}")
    log(f"GPU:      {info['device']} (compute capability {cap[0]}.{cap[1]}, {info['sms']} SMs, "
        f"{info['memory_gib']} GiB; {info['device_count']} visible)")
    log(f"driver:   {info['driver']}")
    log(f"CUDA:     torch built with {info['torch_cuda']}; nvcc {nvcc}: {info['nvcc_version']}")
    log(f"torch:    {info['torch']}; triton: {info['triton'] or 'not installed'}; python {info['python']} "
        f"({info['executable']})")
    for m, then in OPTIONAL.items():
        if not info.get("modules", {}).get(m):
            log(f"optional: {m} is not installed: {then}")
    if not shutil.which("ninja"):
        log("gpu_check: warning: no ninja on PATH: the build runs serially (much slower)")
    if 10 * cap[0] + cap[1] < 80:
        log(f"gpu_check: warning: sm_{info['archs']} is older than sm_80; the CUDA kernels need sm_80+ and will skip")

    env = dict(os.environ)
    for var in ("DFQKERN_BACKEND", "TRITON_INTERPRET", "DFQKERN_SKIP_CUDA", "DFQKERN_SKIP_EXT"):
        env.pop(var, None)  # the run measures the real GPU paths
    env.update(CUDA_HOME=os.environ.get("CUDA_HOME") or str(nvcc.resolve().parent.parent),
               DFQKERN_CUDA_ARCHS=info["archs"], MAX_JOBS=str(info["nproc"]),
               DFQKERN_BENCH_DIR=str(out), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(SCRIPTS)] + [p for p in [env.get("PYTHONPATH")] if p]))
    (out / PARTS).mkdir(exist_ok=True)
    deadline = start + args.budget
    results = []
    for i, stage in enumerate(plan):
        reserve = sum(s.floor for s in plan[i + 1:])
        limit = int(min(stage.cap, deadline - time.monotonic() - reserve))
        if limit < max(stage.floor, 10) and stage.name != "tables":
            log(f"\n=== {stage.name}: SKIPPED, {limit} s of the budget left for it (needs {stage.floor} s)")
            results.append({"name": stage.name, "status": "SKIPPED (time budget)", "seconds": 0, "limit_s": limit})
            continue
        limit = max(limit, 10)
        stage_env = dict(env, **stage.env)
        if stage.test_timeout:
            stage_env["DFQKERN_TEST_TIMEOUT"] = str(min(stage.test_timeout, limit))
        log(f"\n=== {stage.name} (limit {limit} s): {' '.join(stage.cmd)}")
        rc, seconds = run_stage(stage, limit, stage_env, log)
        counts = junit_counts(out / stage.junit) if stage.junit else None
        status = status_of(rc)
        results.append({"name": stage.name, "status": status, "exit_code": rc, "seconds": round(seconds, 1),
                        "limit_s": limit, "tests": counts})
        log(f"=== {stage.name}: {status} in {seconds:.0f} s" + (f"; {counts}" if counts else ""))
    merge_junit(out, {r["name"]: r["status"] for s, r in zip(plan, results) if s.junit})
    return _summary(args, out, info, results, start, log)


def _summary(args, out, info, results, start, log) -> int:
    goals = None
    try:
        goals = json.loads((out / "gpu_bench.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        pass
    wall = time.monotonic() - start
    ok = all(r["status"] == "passed" for r in results)
    summary = {"ok": ok, "mode": "quick" if args.quick else "full", "wall_s": round(wall, 1), "budget_s": args.budget,
               "env": info, "stages": results, "benchmark_goals": goals}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")
    log("\n=== summary")
    for r in results:
        log(f"  {r['name']:<13} {r['status']:<22} {r['seconds']:>6} s" + (f"  {r['tests']}" if r.get("tests") else ""))
    if goals:
        t = goals["total"]
        log(f"  benchmark goals: {t['met']} met, {t['missed']} missed, {t['n/a']} n/a "
            f"({goals['failed_measurements']} measurements failed); table: {out / 'gpu_bench.md'}")
    log(f"  wall {wall:.0f} s (budget {args.budget} s); {'all stages passed' if ok else 'SOME STAGES FAILED'}; "
        f"outputs in {out}")
    return 0 if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
