"""The one list of C++/CUDA sources, read by setup.py, CMakeLists.txt and tests/test_aarch64_kernels.py.

``python csrc/sources.py cpu|kernels|cuda [ARCH]`` prints a ``;``-separated list (CMake passes the target's
CMAKE_SYSTEM_PROCESSOR, so a cross build gets the target's files, not the build machine's).

Per-architecture CPU files: ``*_avx2.cpp`` / ``*_vnni.cpp`` / ``*_amx.cpp`` (x86 intrinsics under ``#pragma GCC target``)
are compiled only for x86, ``*_neon*.cpp`` only for aarch64; every other csrc/cpu file is portable C++.
``kernels`` is the torch-free subset (micro-kernels, layout builders, CPU feature checks): everything in
csrc/cpu except the ATen drivers below. It links without libtorch (csrc/tests/microkernels_check.cpp).
"""
from __future__ import annotations

import glob
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSION = "0.1.0"

# csrc/cpu files that use ATen (tensors, torch's thread pool, TORCH_CHECK).
ATEN_DRIVERS = ("attention.cpp", "conv.cpp", "elementwise.cpp", "gemm.cpp", "isa.cpp", "matmul.cpp")
_ARCH_SUFFIXES = {"x86": ("_avx2.cpp", "_vnni.cpp", "_amx.cpp"), "aarch64": ("_neon.cpp", "_neon_dot.cpp")}


def arch_family(machine: str | None = None) -> str:
    """``x86``, ``aarch64`` or ``other`` for a platform.machine() / CMAKE_SYSTEM_PROCESSOR name."""
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64", "x64", "i386", "i686"):
        return "x86"
    if m in ("aarch64", "arm64", "armv8", "armv8-a"):
        return "aarch64"
    return "other"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cpu_files(arch: str | None):
    family = arch_family(arch)
    out = []
    for path in glob.glob(os.path.join(HERE, "cpu", "*.cpp")):
        owner = [f for f, sfx in _ARCH_SUFFIXES.items() if path.endswith(sfx)]
        if not owner or owner[0] == family:
            out.append(path)
    return out


def cpu_sources(arch: str | None = None):
    """ops.cpp (registration, argument checks) + the csrc/cpu/*.cpp files for ``arch`` (default: this machine)."""
    return _rel([os.path.join(HERE, "ops.cpp")] + _cpu_files(arch))


def kernel_sources(arch: str | None = None):
    """The torch-free csrc/cpu files for ``arch``: cpu_sources without ops.cpp and the ATen drivers."""
    return _rel(p for p in _cpu_files(arch) if os.path.basename(p) not in ATEN_DRIVERS)


def cuda_sources():
    return _rel(glob.glob(os.path.join(HERE, "cuda", "*.cu")) + glob.glob(os.path.join(HERE, "cuda", "*.cpp")))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    arch = sys.argv[2] if len(sys.argv) > 2 else None
    lists = {"cpu": lambda: cpu_sources(arch), "kernels": lambda: kernel_sources(arch), "cuda": cuda_sources}
    if which not in lists:
        sys.exit(f"sources.py: first argument must be one of {sorted(lists)}, got {which!r}")
    print(";".join(lists[which]()))
