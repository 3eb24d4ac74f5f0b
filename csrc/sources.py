"""The one list of C++/CUDA sources, read by setup.py and CMakeLists.txt (``python csrc/sources.py cpu|cuda``)."""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSION = "0.1.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cpu_sources():
    """ops.cpp (registration, argument checks) + every csrc/cpu/*.cpp."""
    return _rel([os.path.join(HERE, "ops.cpp")] + glob.glob(os.path.join(HERE, "cpu", "*.cpp")))


def cuda_sources():
    return _rel(glob.glob(os.path.join(HERE, "cuda", "*.cu")) + glob.glob(os.path.join(HERE, "cuda", "*.cpp")))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(";".join(cpu_sources() if which == "cpu" else cuda_sources()))
