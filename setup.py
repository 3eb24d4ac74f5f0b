"""Builds dfqkern and its optional compiled extension ``dfqkern._C``.

The extension holds the CPU kernels (csrc/cpu, always, unless DFQKERN_SKIP_EXT=1) and the CUDA
kernels (csrc/cuda, when nvcc and a CUDA build of torch are present, unless DFQKERN_SKIP_CUDA=1).
Build with ``pip install --no-build-isolation .`` so the installed torch is used.
Source lists come from csrc/sources.py, shared with CMakeLists.txt: x86 builds get the AVX2 / AVX512-VNNI
files, aarch64 builds the NEON / sdot ones (each selects its ISA at run time; see csrc/cpu/common.h).
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import sources  # noqa: E402  (csrc/sources.py: the one source list)


def _version() -> str:
    """dfqkern/_version.py, read as text: importing dfqkern here would need torch and the extension."""
    ns: dict = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dfqkern", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _extensions():
    if os.environ.get("DFQKERN_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
    except ImportError:  # no torch yet: install the pure-Python package, reference backend only
        print("dfqkern: torch not importable at build time; skipping the compiled extension", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # -ffp-contract=off: the CPU kernels reproduce the reference's fp32 epilogues bit for bit, which
    # an FMA contraction of `acc * scale + bias` would break.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DDFQKERN_VERSION=\"" + _version() + "\""]
    libs = ["gomp"]
    build_cuda = (os.environ.get("DFQKERN_SKIP_CUDA") != "1" and torch.version.cuda is not None
                  and CUDA_HOME is not None and sources.cuda_sources())
    if build_cuda:
        archs = os.environ.get("DFQKERN_CUDA_ARCHS", "80;87;90").split(";")
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        for a in archs:
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        nvcc += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        ext = CUDAExtension("dfqkern._C", sources.cpu_sources() + sources.cuda_sources(),
                            extra_compile_args={"cxx": cxx + ["-DDFQKERN_WITH_CUDA"], "nvcc": nvcc},
                            libraries=libs)
    else:
        ext = CppExtension("dfqkern._C", sources.cpu_sources(), extra_compile_args={"cxx": cxx}, libraries=libs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
