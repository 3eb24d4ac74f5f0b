"""The CPU micro-kernels on aarch64 (NEON / sdot) against x86 and the Python reference, bit for bit.

csrc/tests/microkernels_check.cpp (torch-free; csrc/sources.py's ``kernels`` list) is compiled three
times with plain compiler commands (no CMake, to keep CI fast): natively with g++, and with Debian's
aarch64 cross compiler once with ``-march=armv8.2-a+dotprod`` and once for the Armv8.0 baseline. The
aarch64 binaries run under ``qemu-aarch64`` (correctness only; timings under emulation mean nothing),
the second on an emulated Cortex-A72, which lacks the dot-product instructions, so the run-time
detection must fall back to the NEON kernels there. Every case's output digest must be the same in all
three runs and for every kernel variant in each; a few GEMM cases are recomputed here with
``dfqkern.kernels.reference`` from the same pseudo-random stream and must give the same digest.
"""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from dfqkern.formats import PackedActivation, PackedWeight, pack_codes
from dfqkern.kernels import reference as R

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "csrc" / "tests" / "microkernels_check.cpp"
CROSS_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
# as setup.py: C++20, no FMA contraction (fp32 epilogues must round like the reference)
COMMON_FLAGS = ["-O2", "-std=c++20", "-ffp-contract=off", f"-I{ROOT / 'csrc'}"]
BUILDS = {
    # name: (compiler, arch for sources.py, extra flags, how to run it, variants the run must report)
    "x86": ("g++", "x86_64", [], [], None),
    "aarch64-dotprod": (CROSS_CXX, "aarch64", ["-march=armv8.2-a+dotprod", "-static"], [QEMU],
                        ["portable", "neon", "dotprod"]),
    "aarch64-base": (CROSS_CXX, "aarch64", ["-march=armv8-a", "-static"], [QEMU, "-cpu", "cortex-a72"],
                     ["portable", "neon"]),
}


def _sources_module():
    spec = importlib.util.spec_from_file_location("dfq_csrc_sources", ROOT / "csrc" / "sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _missing_tools(name: str) -> str | None:
    cxx, _, _, run, _ = BUILDS[name]
    for tool in [cxx] + run[:1]:
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install g++-aarch64-linux-gnu qemu-user; .ci/run tries it)"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{build name: harness stdout} for every build whose tools exist (compiled concurrently)."""
    out_dir = tmp_path_factory.mktemp("microkernels")
    sources = _sources_module()
    procs = {}
    for name, (cxx, arch, flags, _, _) in BUILDS.items():
        if _missing_tools(name):
            continue
        srcs = [str(ROOT / s) for s in sources.kernel_sources(arch)]
        exe = out_dir / name
        procs[name] = (exe, subprocess.Popen([cxx, *COMMON_FLAGS, *flags, str(HARNESS), *srcs, "-o", str(exe)],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (exe, proc) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} build failed:\n{log[-4000:]}"
        run = subprocess.run(BUILDS[name][3] + [str(exe)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{name} harness failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
        results[name] = run.stdout
    return results


def _parse(stdout: str):
    """(variants line's GEMM variants, {case: {variant: digest}})."""
    variants = re.search(r"^variants gemm: (.*) elementwise:", stdout, re.M).group(1).split()
    cases = defaultdict(dict)
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{16}", parts[2]):
            cases[parts[0]][parts[1]] = parts[2]
    return variants, dict(cases)


def test_x86_variants_equal_portable_and_reference(runs):
    if "x86" not in runs:
        pytest.skip(_missing_tools("x86"))
    variants, cases = _parse(runs["x86"])
    assert variants[0] == "portable"
    gemm = [c for c in cases if c.startswith("gemm_")]
    assert len(gemm) >= 96 and len(cases) > len(gemm)
    for case, digests in cases.items():
        assert len(set(digests.values())) == 1, (case, digests)
        if case.startswith("gemm_"):  # panel kernels also run on K-segmented rows (implicit-GEMM convs)
            segs = {f"{v}+kseg" for v in variants} if case.startswith("gemm_panel") else set()
            assert set(digests) == {"reference", *variants, *segs}, (case, digests)


@pytest.mark.parametrize("build", ["aarch64-dotprod", "aarch64-base"])
def test_aarch64_bit_identical_to_x86(runs, build):
    missing = _missing_tools(build) or _missing_tools("x86")
    if missing:
        pytest.skip(missing)
    variants, cases = _parse(runs[build])
    assert variants == BUILDS[build][4], f"run-time ISA detection under qemu picked {variants}"
    _, x86 = _parse(runs["x86"])
    assert cases.keys() == x86.keys()
    for case, digests in cases.items():
        want = next(iter(x86[case].values()))  # every x86 variant agrees (test above)
        assert set(digests.values()) == {want}, (case, digests, want)


# ----------------------------------------------------------------------------- Python side of the stream

M64 = (1 << 64) - 1


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


class SplitMix64:
    """The harness's Rng: splitmix64 seeded with FNV-1a of the case name; below(n) = next() % n."""

    def __init__(self, name: str):
        self.s = fnv1a(name.encode())

    def next(self) -> int:
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def ints(self, count: int, n: int) -> list[int]:
        return [self.below(n) for _ in range(count)]

    def scale(self) -> float:
        return math.ldexp(1 + self.below(1 << 20), -27)

    def bias(self) -> float:
        return math.ldexp(self.below(1 << 21) - (1 << 20), -14)


CASE = re.compile(r"gemm_(tile|panel)_w(\d)a(\d)_m(\d+)k(\d+)n(\d+)_(row|tensor)_(sym|asym)_(i32|f32|f32bias)_"
                  r"(cmajor|rmajor)")


def reference_digest(case: str) -> int:
    """The case's output digest computed with dfqkern.kernels.reference from the harness's draws."""
    layout, wbits, abits, m, k, n, zmode, sym, out, order = CASE.fullmatch(case).groups()
    wbits, abits, m, k, n = map(int, (wbits, abits, m, k, n))
    rng = SplitMix64(case)  # draw order as in the harness's run_gemm
    wc = torch.tensor(rng.ints(n * k, 1 << wbits), dtype=torch.int32).reshape(n, k)
    wz = torch.tensor(rng.ints(n, 1 << wbits), dtype=torch.int32)
    ac = torch.tensor(rng.ints(m * k, 1 << abits), dtype=torch.int32).reshape(m, k)
    na = m if zmode == "row" else 1
    az = torch.tensor([1 << (abits - 1)] * na if sym == "sym" else rng.ints(na, 1 << abits), dtype=torch.int32)
    ws = torch.tensor([rng.scale() for _ in range(n)], dtype=torch.float32)
    a_scale = torch.tensor([rng.scale() for _ in range(na)], dtype=torch.float32)
    bias = torch.tensor([rng.bias() for _ in range(n)], dtype=torch.float32) if out == "f32bias" else None
    pw = PackedWeight.from_codes(wc, ws, wz, wbits)
    pa = PackedActivation(pack_codes(ac, abits, az), a_scale, az, abits, k)
    y = R.linear_int(pa, pw)
    if out != "i32":
        y = R._epilogue(y, pa.scale, pw.scale, bias, torch.float32, 1)
    if order == "cmajor":
        y = y.T
    return fnv1a(y.contiguous().numpy().tobytes())


# one case of each kind the Python side checks: (description, predicate on the parsed name)
PICKS = [
    ("tile W4A8 GEMV fp32 + bias",
     lambda g: g[0] == "tile" and g[1:3] == ("4", "8") and g[3] == "1" and g[8] == "f32bias"),
    ("panel W8 int32", lambda g: g[0] == "panel" and g[1] == "8" and g[8] == "i32"),
    ("W2 channel-major", lambda g: g[1] == "2" and g[9] == "cmajor"),
    ("W3 per-row zero points, fp32", lambda g: g[1] == "3" and g[6] == "row" and g[8] == "f32"),
]


@pytest.mark.parametrize("what", [p[0] for p in PICKS])
def test_python_reference_gives_the_same_digest(runs, what):
    if "x86" not in runs:
        pytest.skip(_missing_tools("x86"))
    _, cases = _parse(runs["x86"])
    pred = dict(PICKS)[what]
    case = next((c for c in cases if CASE.fullmatch(c) and pred(CASE.fullmatch(c).groups())), None)
    assert case is not None, f"the harness has no {what} case"
    want = reference_digest(case)
    assert {int(d, 16) for d in cases[case].values()} == {want}, (case, cases[case], f"{want:016x}")
