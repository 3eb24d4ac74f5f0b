"""What a latency table says about the machine it ran on: CPU name, its best ISA, dfqkern's ISA, cache sizes.

Imports no torch and sets no environment, so the pytest benchmark plugin (bench/conftest.py) and the
latency scripts can read it without changing the OpenMP setup they time under.
"""
from __future__ import annotations

import platform
from pathlib import Path

_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def slug(text: str) -> str:
    """``text`` as a file-name part: lower-case words joined by '-'."""
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:60] or "cpu"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty if unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_isa(flags: set[str] | None = None) -> str:
    """The best x86 SIMD level the CPU offers, in dfqkern's level names ("avx512vnni", "avx512", "avx2"), else the
    architecture: the level fbgemm, oneDNN, MKL and onnxruntime pick for themselves when nothing caps them."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512vnni" if "avx512_vnni" in flags else "avx512"
    return "avx2" if "avx2" in flags else platform.machine()


def dfqkern_isa() -> str:
    """The instruction set dfqkern's CPU kernels pick here."""
    try:
        from dfqkern.kernels import cpu

        return cpu.isa() if cpu.is_available() else "no dfqkern._C"
    except ImportError:
        return "unknown"


def caches() -> list[tuple[str, int]]:
    """cpu0's data and unified caches as ``(name, bytes)``, e.g. ``("L2", 2097152)`` (sysfs; empty if unknown)."""
    out = []
    for d in sorted(_CACHE_DIR.glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            out.append((f"L{level}{'d' if kind == 'Data' else ''}", int(size.rstrip("KMG")) * _UNITS.get(size[-1:], 1)))
    return out


def last_level_cache_bytes() -> int | None:
    sizes = [b for _, b in caches()]
    return max(sizes) if sizes else None


def describe_caches() -> str:
    """'L1d 48K, L2 2048K, L3 266240K', or 'unknown'."""
    return ", ".join(f"{name} {b >> 10}K" for name, b in caches()) or "unknown"
