"""Where the CLI jobs write: checked, and locked against a second writer, before any work starts.

A quantize or generate run can take hours; an output location it cannot use must fail it at once,
not after the work (and never by replacing a directory that is not ours).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to exclusive creation
    fcntl = None

__all__ = ["OutputBusyError", "check_output_file", "check_output_dir", "OutputLock"]


class OutputBusyError(RuntimeError):
    """Another process holds the lock of an output location."""


def _check_parent(path: Path, name: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we may create entries in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be created: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r} cannot be created: directory {str(parent)!r} is not writable")


def check_output_file(path: str | os.PathLike, name: str) -> Path:
    """A file the job will write (``--json-out``): not a directory, its directory creatable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory; give a file path")
    _check_parent(path, name)
    return path


def check_output_dir(path: str | os.PathLike, name: str, overwrite: bool = False,
                     replaceable=lambda p: True) -> Path:
    """A directory the job will write. An existing one is used only with ``overwrite`` and when
    ``replaceable(path)`` (say, it holds what an earlier run wrote); an existing file never."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{name} {str(path)!r} is a file, not a directory")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{name} {str(path)!r} exists; pass --overwrite to replace it")
        if not replaceable(path):
            raise FileExistsError(f"{name} {str(path)!r} is not a dfqkern checkpoint (nor empty); --overwrite "
                                  f"replaces only those")
    _check_parent(path, name)
    return path


class OutputLock:
    """Exclusive lock on ``path`` (a directory being written, with its ``.partial`` / ``.calib-data``
    siblings): the file ``.<name>.lock`` beside it, removed on release. Held with ``flock``, so a
    killed holder's lock goes with its process and the next run takes over."""

    def __init__(self, path: str | os.PathLike, name: str = "out"):
        self.path = Path(path)
        self.name = name
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._fd = None

    def _busy(self) -> OutputBusyError:
        return OutputBusyError(f"{self.name} {str(self.path)!r} is being written by another dfqkern process "
                               f"(lock {str(self.lock_path)!r}); wait for it or choose another {self.name}")

    def __enter__(self) -> "OutputLock":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            if fcntl is None:
                try:
                    self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise self._busy() from None
                break
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            try:  # a holder that just finished may have unlinked the file we locked: lock the current one
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._fd = fd
            else:
                os.close(fd)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.lock_path.unlink(missing_ok=True)  # unlinked while held: see the inode check above
        finally:
            os.close(self._fd)
            self._fd = None


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` onto ``path``. An existing ``path`` is moved aside first and
    removed after, so ``path`` is at every moment either the old directory or the new one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
