"""Which packed checkpoints a report covers: the given checkpoint, or every checkpoint directly inside
a run directory (``dfqkern demo --out`` writes one per scheme)."""
from __future__ import annotations

from pathlib import Path

from ..io import CONFIG_FILE


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def find_checkpoints(run: str | Path, name: str = "run") -> list[Path]:
    """``[run]`` when it is a packed checkpoint directory, else its checkpoint subdirectories (sorted);
    a clear error naming ``name`` when there is none."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{name} {str(run)!r} does not exist")
    if not run.is_dir():
        raise ValueError(f"{name} {str(run)!r} is a file; give a packed checkpoint directory (or a directory of them)")
    if is_checkpoint(run):
        return [run]
    found = sorted(p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p))
    if not found:
        raise ValueError(f"{name} {str(run)!r} is neither a packed checkpoint directory (no {CONFIG_FILE}) nor a "
                         f"directory holding any")
    return found
