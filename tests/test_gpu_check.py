"""The GPU verification kit on the CPU (scripts/gpu_check.sh, its driver and per-test timeout plugin,
bench/gpu_tables.py, bench/gpu_timing.py), so it cannot rot between GPU runs. The GPU stages themselves
skip here: the preflight stops with a clear message and exit status 3 when there is no nvcc or GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BENCH = ROOT / "bench"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_path():
    added = str(BENCH) not in sys.path
    if added:
        sys.path.insert(0, str(BENCH))
    yield
    if added:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tables(bench_path):
    return _load("gpu_tables", BENCH / "gpu_tables.py")


@pytest.fixture(scope="module")
def driver():
    return _load("gpu_check_driver", ROOT / "scripts" / "gpu_check.py")


def run_script(*args, env=None, timeout=60):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)


# ----------------------------------------------------------------------------- the script's arguments

def test_script_parses_as_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_help():
    r = run_script("--help")
    assert r.returncode == 0, r.stderr
    for word in ("usage: gpu_check.sh", "--quick", "--no-build", "--budget", "--dry-run", "out_dir", "runs/gpu"):
        assert word in r.stdout


@pytest.mark.parametrize("args,why", [(["--bogus"], "unrecognized arguments: --bogus"),
                                      (["a", "b"], "unrecognized arguments: b"),
                                      (["--budget", "5"], "--budget must be at least 30 seconds"),
                                      (["--budget", "soon"], "invalid int value")])
def test_bad_arguments_exit_2_with_usage(args, why):
    r = run_script(*args)
    assert r.returncode == 2 and "usage: gpu_check.sh" in r.stderr and why in r.stderr, r.stderr


def _plan(*args) -> dict:
    r = run_script("--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dry_run_full_plan_defaults():
    plan = _plan()
    names = [s["name"] for s in plan["stages"]]
    assert plan["mode"] == "full" and plan["budget_s"] == 470 and plan["out_dir"] == str(ROOT / "runs" / "gpu")
    assert names == ["build", "test-build", "test-cuda", "test-triton", "test-matmul-int", "test-e2e", "bench-cuda", "bench-triton",
                     "bench-models", "tables"]
    assert plan["stages"][0]["cmd"][1:] == ["setup.py", "build_ext", "--inplace"]
    # every file a stage names exists (a renamed test or bench file must break this, not the GPU run)
    for stage in plan["stages"]:
        for arg in stage["cmd"][1:]:
            if arg.endswith(".py"):
                assert (ROOT / arg).is_file(), f"{stage['name']} runs {arg}, which does not exist"
    bench = {s["name"]: s for s in plan["stages"]}
    assert bench["bench-cuda"]["env"] == {"DFQKERN_BENCH_BACKENDS": "cuda"}
    assert bench["bench-triton"]["env"] == {"DFQKERN_BENCH_BACKENDS": "triton"}
    assert all(s["test_timeout_s"] > 0 for s in plan["stages"] if "pytest" in s["cmd"])
    assert all(f"--junitxml={plan['out_dir']}/.junit-parts/" in " ".join(s["cmd"])
               for s in plan["stages"] if "pytest" in s["cmd"])
    # the stage caps fit the budget's promise once the floors of later stages are kept back
    assert sum(s["floor_s"] for s in plan["stages"]) < plan["budget_s"]


def test_dry_run_quick_and_output_dir(tmp_path):
    plan = _plan("--quick", str(tmp_path / "out"), "--no-build")
    assert plan["mode"] == "quick" and plan["budget_s"] == 230 and plan["out_dir"] == str(tmp_path / "out")
    assert [s["name"] for s in plan["stages"]] == ["test-build", "test-cuda", "test-triton", "test-matmul-int", "test-e2e"]
    assert _plan("--quick", "rel/dir", "--budget", "100")["out_dir"] == str(ROOT / "rel" / "dir")
    assert _plan("--quick")["stages"][0]["name"] == "build"


# ----------------------------------------------------------------------------- early exits without a GPU

def _path_without_nvcc() -> str:
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p) / "nvcc").exists())


def test_no_nvcc_exits_early(tmp_path):
    out = tmp_path / "out"
    r = run_script(str(out), env={"CUDA_HOME": str(tmp_path / "no-cuda"), "PATH": _path_without_nvcc()})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no nvcc found" in r.stdout and "CUDA_HOME" in r.stdout and "nothing was built or run" in r.stdout
    assert "no nvcc found" in (out / "gpu_check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log"]


def test_no_gpu_exits_early(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU exit cannot happen here")
    fake = tmp_path / "cuda" / "bin" / "nvcc"  # nvcc present, so the GPU check is the one that stops it
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.0'\n")
    fake.chmod(0o755)
    r = run_script(str(tmp_path / "out"), env={"CUDA_HOME": str(tmp_path / "cuda")})
    assert r.returncode == 3, r.stdout + r.stderr
    assert ("no CUDA GPU visible to torch" in r.stdout or "CPU-only build" in r.stdout), r.stdout
    assert "nothing was built or run" in r.stdout


def test_missing_interpreter_exits_early():
    r = run_script("--help", env={"PYTHON": "/nonexistent/python3"})
    assert r.returncode == 3 and "no Python interpreter" in r.stderr


# ----------------------------------------------------------------------------- driver pieces

def test_stage_hard_limit_interrupts_and_returns(driver, tmp_path):
    log = driver.Log(tmp_path / "log")
    stage = driver.Stage("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                         cap=1, floor=0)
    rc, seconds = driver.run_stage(stage, 1, dict(os.environ), log)
    log.close()
    assert rc is None and seconds < 10 and driver.status_of(rc) == "TIMEOUT"
    assert "started" in (tmp_path / "log").read_text() and "hit its 1 s limit" in (tmp_path / "log").read_text()
    assert driver.status_of(0) == "passed" and driver.status_of(1) == "FAILED (exit 1)"


def test_stage_is_interruptible_when_the_driver_ignores_sigint(driver, tmp_path):
    """A driver started with SIGINT ignored (a background job of a non-interactive shell, or a process that set
    SIG_IGN earlier -- one full CI run hit this) must still interrupt its stages with SIGINT, not only SIGKILL
    after TERM_GRACE: a child would inherit the ignored signal."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        log = driver.Log(tmp_path / "log")
        stage = driver.Stage("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); "
                                        "time.sleep(60)"], cap=1, floor=0)
        rc, seconds = driver.run_stage(stage, 1, dict(os.environ), log)
        log.close()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the driver's own disposition is left as it was
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc is None and seconds < 10


def test_junit_parts_are_counted_and_merged(driver, tmp_path):
    parts = tmp_path / driver.PARTS
    parts.mkdir()
    (parts / "a.xml").write_text('<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" '
                                 'skipped="1"><testcase name="x"/></testsuite></testsuites>')
    (parts / "b.xml").write_text('<testsuite name="pytest" tests="2" failures="0" errors="1" skipped="0"/>')
    assert driver.junit_counts(parts / "a.xml") == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert driver.junit_counts(parts / "missing.xml") is None
    driver.merge_junit(tmp_path, {"a": "FAILED (exit 1)", "b": "FAILED (exit 1)", "killed": "TIMEOUT"})
    merged = driver.junit_counts(tmp_path / "junit.xml")
    assert merged == {"tests": 6, "failures": 1, "errors": 2, "skipped": 1, "passed": 2}
    assert "killed: no junit report (TIMEOUT)" in (tmp_path / "junit.xml").read_text()
    assert not parts.exists()


def test_per_test_timeout_plugin_fails_the_slow_test_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import time
        def test_slow():
            time.sleep(30)
        def test_fast():
            pass
    """))
    env = dict(os.environ, DFQKERN_TEST_TIMEOUT="1", PYTHONPATH=str(ROOT / "scripts"),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # a faster start: only the plugin under test
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check_timeout", "-p", "no:cacheprovider", "-q",
                        "-o", "addopts=", str(tmp_path / "test_slow.py")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "1 failed, 1 passed" in r.stdout and "exceeded the per-test limit of 1 s" in r.stdout


# ----------------------------------------------------------------------------- timing helper

def test_time_ms_warms_up_then_takes_the_median(bench_path, monkeypatch):
    timing = _load("gpu_timing", BENCH / "gpu_timing.py")
    calls = []
    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003, 3.0, 3.002, 4.0, 4.004])  # 5, 1, 3, 2, 4 ms
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.time_ms(lambda: calls.append(1), warmup=3, reps=5, device="cpu") == pytest.approx(3.0)
    assert len(calls) == 8
    with pytest.raises(ValueError, match="reps must be >= 1"):
        timing.time_ms(lambda: None, reps=0, device="cpu")


def test_recorder_writes_error_rows_and_reraises(bench_path, tables, tmp_path):
    timing = _load("gpu_timing", BENCH / "gpu_timing.py")
    rec = timing.Recorder("kernels:cuda", tmp_path)

    def broken():
        raise AssertionError("wrong result")

    with pytest.raises(AssertionError):
        rec.measure(lambda: None, section="linear", case="c", impl="cuda W4A8", check=broken)
    records, bad = tables.load_records(tmp_path / tables.RECORDS_FILE)
    assert bad == 0 and records == [{"kind": "error", "section": "linear", "case": "c", "impl": "cuda W4A8",
                                     "error": "AssertionError: wrong result", "run": "kernels:cuda"}]


def test_gpu_bench_modules_import_on_cpu_and_skip_with_a_reason(bench_path):
    import torch

    mods = [_load(f"_cpu_check_{path.stem}", path)  # private names: pytest's own imports of these stay untouched
            for path in (BENCH / "test_bench_gpu_kernels.py", BENCH / "test_bench_gpu_models.py",
                         ROOT / "tests" / "test_gpu_end_to_end.py")]
    for mod in mods:
        skip = next(m for m in mod.pytestmark if m.name == "skipif")
        assert skip.args[0] == (not torch.cuda.is_available()) and "CUDA device" in skip.kwargs["reason"]
    kernels = mods[0]
    assert [p.id for p in kernels._linear_variants()] == [
        "cuda-W4A8", "cuda-W2A8", "cuda-W4A4-[int4-mma]", "cuda-W4A4-[int8-mma]", "cuda-W2A4-[int4-mma]",
        "cuda-W2A4-[int8-mma]", "triton-W4A8", "triton-W2A8", "triton-W4A4", "triton-W2A4"]
    assert kernels.TOKENS == (1, 16, 64, 197, 1024) and len(kernels.LINEAR_SHAPES) == 4


# ----------------------------------------------------------------------------- the table writer

def _records(tables, capability=(9, 0)):
    T = tables

    def t(case, impl, us, role="dfqkern", run="kernels:cuda", section="linear", **kw):
        return dict(kind="time", section=section, case=case, impl=impl, us=us, role=role, run=run, **kw)

    lin = [T.FP16_CUBLAS, T.BF16_CUBLAS]
    return [
        {"kind": "env", "device": "NVIDIA H200", "capability": list(capability), "torch": "2.11.0", "cuda": "13.0",
         "triton": "3.6.0", "run": "kernels:cuda"},
        {"kind": "peak", "name": "copy", "value": 4000.0, "run": "kernels:cuda"},
        t("fc1, M=1", T.FP16_CUBLAS, 10.0, "baseline", m=1),
        t("fc1, M=1", T.BF16_CUBLAS, 12.0, "baseline", m=1),
        # 16 MB in 5 us = 3200 GB/s = 80 % of the copy bandwidth
        t("fc1, M=1", "cuda W4A8", 5.0, vs=lin, m=1, scheme="w4a8", backend="cuda", bytes=16_000_000),
        t("fc1, M=1", "cuda W2A8", 8.0, vs=lin, m=1, scheme="w2a8", backend="cuda", bytes=8_000_000),
        t("fc1, M=1", "cuda W4A4 [int4 mma]", 4.0, vs=lin + ["cuda W4A8"], m=1, scheme="w4a4", backend="cuda",
          path="int4", bytes=16_000_000),
        # the bounds: M = 16 still gets a roofline row, M = 64 still a speed-up goal; 1.0x is not "faster"
        t("fc1, M=16", T.FP16_CUBLAS, 10.0, "baseline", m=16),
        t("fc1, M=16", "cuda W4A8", 10.0, vs=[T.FP16_CUBLAS], m=16, scheme="w4a8", backend="cuda", bytes=40_000_000),
        t("fc1, M=64", T.FP16_CUBLAS, 10.0, "baseline", m=64),
        t("fc1, M=64", "cuda W4A8", 6.6, vs=[T.FP16_CUBLAS], m=64, scheme="w4a8", backend="cuda", bytes=1),
        t("ViT-B/16, batch 1", T.FP16_EAGER, 500.0, "baseline", run="models", section="model", batch=1),
        t("ViT-B/16, batch 1", "packed W4A8 (cuda first)", 500.0, run="models", section="model", batch=1,
          vs=[T.FP16_EAGER]),
        t("fc1, M=197", T.FP16_CUBLAS, 20.0, "baseline", m=197),
        t("fc1, M=197", "cuda W4A8", 25.0, vs=[T.FP16_CUBLAS], m=197, scheme="w4a8", backend="cuda", bytes=1),
        {"kind": "error", "section": "linear", "case": "fc1, M=1", "impl": "cuda W2A4 [int4 mma]",
         "error": "RuntimeError: CUDA error: an illegal memory access", "run": "kernels:cuda"},
        t("fc1, M=1", "triton W4A8", 6.0, run="kernels:triton", vs=lin, m=1, scheme="w4a8", backend="triton",
          bytes=16_000_000),  # its run measured no baseline and no peak
        t("R50 64ch, batch 1", T.CUDNN_FP16, 30.0, "baseline", section="conv", batch=1),
        t("R50 64ch, batch 1", "cuda W4A8", 15.0, section="conv", vs=[T.CUDNN_FP16], batch=1, scheme="w4a8"),
        t("w [3072, 768]", "torch op", 50.0, "baseline", section="fake-quant fwd"),
        t("w [3072, 768]", "cuda fused", 12.5, section="fake-quant fwd", vs=["torch op"]),
        t("ResNet-18, batch 1", T.FP16_EAGER, 1000.0, "baseline", run="models", section="model", batch=1),
        t("ResNet-18, batch 1", T.FP16_COMPILE, 600.0, "baseline", run="models", section="model", batch=1),
        t("ResNet-18, batch 1", "packed W4A8 (cuda first)", 800.0, run="models", section="model", batch=1,
          vs=[T.FP16_EAGER, T.FP16_COMPILE]),
        t("ResNet-18, batch 32", T.FP16_EAGER, 3000.0, "baseline", run="models", section="model", batch=32),
        t("ResNet-18, batch 32", "packed W4A8 (cuda first)", 6000.0, run="models", section="model", batch=32,
          vs=[T.FP16_EAGER]),
        dict(kind="memory", section="memory", case="ResNet-18", impl=T.FP16_EAGER, role="baseline",
             bytes=100 << 20, run="models"),
        dict(kind="memory", section="memory", case="ResNet-18", impl="packed W4A8", role="dfqkern", bytes=25 << 20,
             vs=[T.FP16_EAGER], run="models"),
    ]


def _row(rows, impl, vs, case=None):
    found = [r for r in rows if r["impl"] == impl and r["vs"] == vs and (case is None or r["case"] == case)]
    assert len(found) == 1, (impl, vs, found)
    return found[0]


def test_rows_ratios_and_goals(tables):
    T = tables
    rows = T.build_rows(_records(T))
    w4 = _row(rows, "cuda W4A8", T.FP16_CUBLAS, "fc1, M=1")
    assert w4["ratio"] == pytest.approx(2.0) and w4["goal"].startswith(">= 1.5x fp16") and w4["met"] == "yes"
    assert _row(rows, "cuda W4A8", T.BF16_CUBLAS, "fc1, M=1")["goal"] == ""  # the goal is against fp16 only
    roof = _row(rows, "cuda W4A8", T.ROOFLINE, "fc1, M=1")
    assert roof["ratio"] == pytest.approx(0.8) and roof["unit"] == "%" and roof["met"] == "yes"
    assert _row(rows, "cuda W2A8", T.FP16_CUBLAS)["met"] == "NO"  # 1.25x
    assert _row(rows, "cuda W2A8", T.ROOFLINE)["met"] == "NO"  # 25 %
    a4 = _row(rows, "cuda W4A4 [int4 mma]", "cuda W4A8")
    assert a4["ratio"] == pytest.approx(1.25) and a4["met"].startswith("n/a (sm_90 has no int4")  # H200: no int4 mma
    assert _row(rows, "cuda W4A4 [int4 mma]", T.FP16_CUBLAS)["goal"] == ""  # A4 rows are judged against A8 only
    assert not [r for r in rows if r["case"] in ("fc1, M=64", "fc1, M=197") and r["vs"] == T.ROOFLINE]  # M > 16
    assert _row(rows, "cuda W4A8", T.ROOFLINE, "fc1, M=16")["ratio"] == pytest.approx(1.0)
    assert _row(rows, "cuda W4A8", T.FP16_CUBLAS, "fc1, M=16")["met"] == "NO"
    assert _row(rows, "cuda W4A8", T.FP16_CUBLAS, "fc1, M=64")["met"] == "yes"
    assert _row(rows, "packed W4A8 (cuda first)", T.FP16_EAGER, "ViT-B/16, batch 1")["met"] == "NO"
    assert _row(rows, "cuda W4A8", T.FP16_CUBLAS, "fc1, M=197")["goal"] == ""  # M > 64: no speed-up goal
    failed = _row(rows, "cuda W2A4 [int4 mma]", "")
    assert failed["met"].startswith("FAILED: RuntimeError: CUDA error")
    tri = _row(rows, "triton W4A8", T.FP16_CUBLAS)  # baselines are only taken from the row's own run
    assert tri["ratio"] is None and tri["met"] == "n/a (nothing to compare with in this run)"
    assert _row(rows, "triton W4A8", T.ROOFLINE)["ratio"] is None
    assert _row(rows, "cuda W4A8", T.CUDNN_FP16)["met"] == "yes"
    assert _row(rows, "cuda fused", "torch op")["ratio"] == pytest.approx(4.0)
    assert _row(rows, "cuda fused", "torch op")["met"] == "NO"  # goal 5x
    model = _row(rows, "packed W4A8 (cuda first)", T.FP16_EAGER, "ResNet-18, batch 1")
    assert model["ratio"] == pytest.approx(1.25) and model["met"] == "yes"
    assert _row(rows, "packed W4A8 (cuda first)", T.FP16_COMPILE, "ResNet-18, batch 1")["goal"] == ""
    assert _row(rows, "packed W4A8 (cuda first)", T.FP16_EAGER, "ResNet-18, batch 32")["goal"] == ""
    assert _row(rows, "packed W4A8", T.FP16_EAGER)["ratio"] == pytest.approx(4.0)
    assert [r["section"] for r in rows] == sorted((r["section"] for r in rows), key=list(T.SECTIONS).index)
    summary = T.summarize(rows)
    assert summary["total"] == {"met": 6, "missed": 5, "n/a": 3} and summary["failed_measurements"] == 1


def test_int4_goal_is_judged_on_sm_80_to_89(tables):
    rows = tables.build_rows(_records(tables, capability=(8, 6)))
    assert _row(rows, "cuda W4A4 [int4 mma]", "cuda W4A8")["met"] == "NO"  # 1.25x < 1.3x


def test_markdown_and_json_written_atomically(tables, tmp_path):
    T = tables
    records = _records(T)
    md_path, json_path = T.write_tables(records, tmp_path, skipped_lines=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_bench.json", "gpu_bench.md"]  # no temporaries left
    md = md_path.read_text()
    assert md.startswith("# GPU benchmark: NVIDIA H200 (sm_90)")
    assert "| case | impl | µs | vs | vs µs | ratio | goal | met? |" in md
    goal = ">= 1.5x fp16 cuBLAS (M <= 64)"
    assert f"| fc1, M=1 | cuda W4A8 | 5.0 | {T.FP16_CUBLAS} | 10.0 | 2.00x | {goal} | yes |" in md
    assert f"| fc1, M=1 | cuda W4A8 | 5.0 | {T.ROOFLINE} | 4000 GB/s | 80 % | >= 70 % of copy bandwidth" in md
    assert "| ResNet-18 | packed W4A8 | 25.0 | fp16 eager | 100.0 | 4.00x |  |  |" in md
    assert "Goals: 6 met, 5 missed, 3 n/a; 1 measurement(s) failed." in md and "1 unreadable record line" in md
    data = json.loads(json_path.read_text())
    assert data["rows"] == json.loads(json.dumps(T.build_rows(records)))
    assert data["summary"]["total"] == {"met": 6, "missed": 5, "n/a": 3} and data["env"]["device"] == "NVIDIA H200"

    # a failure while writing leaves the previous pair whole and no temporary behind
    def refuse(src, dst):
        raise OSError("disk full")

    old_md, old_json = md_path.read_text(), json_path.read_text()
    real_replace = os.replace
    os.replace = refuse
    try:
        with pytest.raises(OSError, match="disk full"):
            T.write_tables(records[:5], tmp_path)
    finally:
        os.replace = real_replace
    assert md_path.read_text() == old_md and json_path.read_text() == old_json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_bench.json", "gpu_bench.md"]


def test_cli_reads_a_cut_off_records_file(tables, tmp_path, capsys):
    records_file = tmp_path / tables.RECORDS_FILE
    for r in _records(tables):
        tables.append_record(records_file, r)
    with open(records_file, "a") as f:
        f.write('{"kind": "time", "sect')  # the run was killed mid-write
    assert tables.main([str(records_file), str(tmp_path / "out")]) == 0
    assert "| fc1, M=1 | cuda W4A8 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "gpu_bench.json").read_text())["skipped_record_lines"] == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"kind": "env", "device": "x"}) + "\n")
    assert tables.main([str(empty), str(tmp_path / "out2")]) == 1
    assert "no benchmark measurements" in capsys.readouterr().err
    assert tables.main([str(tmp_path / "missing.jsonl"), str(tmp_path / "out3")]) == 1
