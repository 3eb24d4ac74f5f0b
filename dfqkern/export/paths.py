"""The output-file check every exporter runs before any work."""
from __future__ import annotations

import os
from pathlib import Path


def check_out_file(out_path, suffix: str, overwrite: bool, why: str = "", name: str = "out_path",
                   overwrite_hint: str = "pass overwrite=True (CLI: --overwrite)") -> Path:
    """``out_path`` as a Path, or a clear error naming the argument ``name`` if it cannot take the
    exported file: wrong suffix (``why`` says what the suffix stands for), a directory, a missing or
    unwritable parent, or an existing file without ``overwrite`` (``overwrite_hint`` says how to allow it)."""
    path = Path(out_path)
    where = f"{name} {str(path)!r}"
    if path.suffix.lower() != suffix:
        raise ValueError(f"{where} must end in {suffix!r}{why}")
    if path.is_dir():
        raise ValueError(f"{where} is a directory; give a file path ending in {suffix!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{where}: directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{where}: directory {str(path.parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{where} exists; {overwrite_hint} to replace it")
    return path
