"""The built extension carries CUDA code for every target architecture (no GPU needed).

``setup.py`` compiles csrc/cuda for ``DFQKERN_CUDA_ARCHS`` (default ``80;87;90``) plus PTX of the
last one. These tests read the extension's fat binary two ways: ``cuobjdump --list-elf`` (from
``CUDA_HOME``, ``PATH`` or the copy bundled with triton) and a small parser of the ``.nv_fatbin``
ELF section, so they also run where no cuobjdump is installed. They skip only when the extension
was built without CUDA (``DFQKERN_SKIP_CUDA=1``, or no nvcc / CUDA build of torch at build time).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def target_archs() -> list[str]:
    return os.environ.get("DFQKERN_CUDA_ARCHS", "80;87;90").split(";")


@pytest.fixture(scope="module")
def cuda_extension() -> Path:
    spec = importlib.util.find_spec("dfqkern._C")
    if spec is None or spec.origin is None:
        pytest.skip("dfqkern._C is not built (pip install --no-build-isolation -e .); nothing to inspect")
    import dfqkern._C as ext  # torch is imported above, so its libraries resolve

    if not ext.build_info().get("cuda"):
        pytest.skip("dfqkern._C was built without CUDA (DFQKERN_SKIP_CUDA=1, or no nvcc / CUDA torch at build time)")
    return Path(spec.origin)


def find_cuobjdump() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump")]
    if CUDA_HOME:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def elf_listing(cuda_extension) -> str:
    """``cuobjdump --list-elf`` of the extension: one line per cubin, ``<source stem>.sm_<arch>.cubin``."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump in CUDA_HOME/bin, PATH or triton's bundle (test_fatbin_has_sass_for_every_target_arch "
                    "reads the archs without it)")
    return subprocess.run([tool, "--list-elf", str(cuda_extension)], check=True, capture_output=True,
                          text=True).stdout


def fatbin_entries(so: Path) -> list[tuple[int, int]]:
    """``(kind, sm)`` of every entry in the library's ``.nv_fatbin`` section (kind 1 = PTX, 2 = ELF)."""
    data = so.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{so} is not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(s):
        start = names_at + s[0]
        return data[start:data.index(b"\0", start)].decode()

    fat = next((s for s in sections if name(s) == ".nv_fatbin"), None)
    if fat is None:
        return []
    off, size = fat[4], fat[5]
    entries, pos = [], off
    while pos + 16 <= off + size:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned inside the section
            continue
        e, end = pos + header_size, pos + header_size + fat_size
        while e < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
            sm = struct.unpack_from("<I", data, e + 28)[0]
            entries.append((kind, sm))
            e += entry_header + payload
        pos = end
    return entries


def test_fatbin_has_sass_for_every_target_arch(cuda_extension):
    entries = fatbin_entries(cuda_extension)
    sass = {sm for kind, sm in entries if kind == KIND_ELF}
    ptx = {sm for kind, sm in entries if kind == KIND_PTX}
    for arch in target_archs():
        assert int(arch) in sass, f"no sm_{arch} SASS in {cuda_extension.name}; found sm {sorted(sass)}"
    assert int(target_archs()[-1]) in ptx, f"no compute_{target_archs()[-1]} PTX (forward compatibility); found {sorted(ptx)}"


def test_cuobjdump_lists_every_target_arch(cuda_extension, elf_listing):
    found = set(re.findall(r"\.sm_(\d+)\.cubin", elf_listing))
    for arch in target_archs():
        assert arch in found, f"cuobjdump --list-elf shows no sm_{arch} cubin:\n{elf_listing}"
    # the parser above reads the same archs as cuobjdump
    assert found == {str(sm) for kind, sm in fatbin_entries(cuda_extension) if kind == KIND_ELF}


def test_every_kernel_file_is_compiled_for_every_arch(elf_listing):
    sources = sorted(p.stem for p in (Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))
    assert sources, "csrc/cuda has no .cu files"
    for stem in sources:
        for arch in target_archs():
            assert f"{stem}.sm_{arch}.cubin" in elf_listing, f"{stem}.cu has no sm_{arch} code"


def test_cuda_ops_are_registered(cuda_extension):
    from dfqkern.kernels import cuda

    missing = [op for op in cuda.OP_NAMES
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dfqkern::{op}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
    assert cuda.extension_has_ops()
    assert cuda.is_available() == torch.cuda.is_available()


def test_cuda_matmul_op_is_registered(cuda_extension):
    """matmul_int's op is looked up apart from OP_NAMES (an older build keeps the other ops); this build has it."""
    from dfqkern.kernels import cuda

    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dfqkern::{cuda.MATMUL_OP}", "CUDA")
    assert cuda.extension_has_matmul()
