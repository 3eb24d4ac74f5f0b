"""What ``dfqkern report`` is asked to do, checked in full before any model is loaded."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

FORMATS = ("md", "html", "both")
REPORT_JSON = "report.json"  # every number of the report; also what marks a directory as a report


def _flag(field_name: str) -> str:
    """``field (--field)``: the argument named for API and CLI users alike."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


@dataclass
class ReportJob:
    """Inputs of a report. ``run``: a packed checkpoint directory or a directory of them.
    ``float_model``: the float model (or a factory of it) for SQNR; without it SQNR is reported as not
    available. ``calib_images`` (model-input tensors) or ``calib_data`` (a folder, tar or
    ``synthetic:DIR`` spec as ``quantize`` takes) give the images of the output SQNR and observed
    ranges; with neither, the synthetic set's first ``num_calib`` images. ``synthetic``: the set
    shown in the sample grid (None: look where a run writes it; False: none). ``summaries``: what a
    run recorded (``quantize --json-out`` files or dicts: accuracy, method, calibration decisions),
    matched to a checkpoint by their ``out``. ``eval_data``: also measure top-1 now."""

    run: str | os.PathLike
    out: str | os.PathLike
    format: str = "both"
    overwrite: bool = False
    float_model: nn.Module | Callable[[], nn.Module] | None = None
    float_label: str | None = None  # how the report names the float model (e.g. the CLI's --model / --checkpoint)
    calib_data: str | None = None
    calib_images: torch.Tensor | None = None
    num_calib: int = 8
    synthetic: str | os.PathLike | None | bool = None
    num_samples: int = 16
    summaries: Sequence[str | os.PathLike | dict] = ()
    eval_data: str | None = None
    eval_limit: int | None = None
    trust_unverified: bool = False
    checkpoints: list[Path] = field(init=False)
    records: dict[Path, dict] = field(init=False)

    def __post_init__(self):
        from ..outputs import check_output_dir
        from ..pipeline import BN_INVERSION_PREFIX, SYNTHETIC_PREFIX
        from .deps import require_matplotlib
        from .sources import find_checkpoints

        require_matplotlib()  # the optional dependency first: nothing is read or written without it
        if self.format not in FORMATS:
            raise ValueError(f"{_flag('format')} must be one of {FORMATS}, got {self.format!r}")
        for name in ("num_calib", "num_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{_flag(name)} must be an int >= 0, got {v!r}")
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int)
                                            or self.eval_limit < 1):
            raise ValueError(f"{_flag('eval_limit')} must be a positive int, got {self.eval_limit!r}")
        self.checkpoints = find_checkpoints(self.run, "run (RUN)")
        out = Path(self.out)
        if out.resolve() in {c.resolve() for c in self.checkpoints} or out.resolve() == Path(self.run).resolve():
            raise ValueError(f"{_flag('out')} {str(out)!r} is the run itself; give a new directory for the report")
        if out.is_dir() and any(out.iterdir()) and self.overwrite and not (out / REPORT_JSON).is_file():
            raise FileExistsError(f"{_flag('out')} {str(out)!r} holds files that are not a dfqkern report (no "
                                  f"{REPORT_JSON}); --overwrite replaces only an earlier report")
        if not (out.is_dir() and not any(out.iterdir())):  # an empty directory is simply filled
            check_output_dir(out, _flag("out"), self.overwrite)
        if self.calib_data is not None and self.calib_images is not None:
            raise ValueError(f"give {_flag('calib_data')} or calib_images, not both")
        if self.calib_data is not None:
            spec = str(self.calib_data)
            if spec.startswith(BN_INVERSION_PREFIX):
                raise ValueError(f"{_flag('calib_data')} {spec!r} would generate images; give an image folder, a "
                                 f"tar or synthetic:DIR")
            path = spec[len(SYNTHETIC_PREFIX):] if spec.startswith(SYNTHETIC_PREFIX) else spec
            if not os.path.exists(path):
                raise FileNotFoundError(f"{_flag('calib_data')} {spec!r} does not exist")
        if self.eval_data is not None and not os.path.exists(self.eval_data):
            raise FileNotFoundError(f"{_flag('eval_data')} {self.eval_data!r} does not exist")
        if self.synthetic not in (None, False):
            _check_synthetic(Path(self.synthetic))
        self.records = self._match_summaries()

    def _match_summaries(self) -> dict[Path, dict]:
        records = {}
        for item in self.summaries:
            rec = item if isinstance(item, dict) else _read_summary(item)
            where = f"{_flag('summary')} {item if not isinstance(item, dict) else rec.get('out')!r}"
            target = rec.get("out")
            match = [c for c in self.checkpoints if target is not None and Path(target).resolve() == c.resolve()]
            if not match and len(self.checkpoints) == 1:  # one run: its summary, wherever it was written from
                match = self.checkpoints
            if not match:
                raise ValueError(f"{where} is for {target!r}, none of the checkpoints in {str(self.run)!r}")
            records[match[0]] = rec
        return records


def _check_synthetic(root: Path) -> None:
    from ..datagen.store import MANIFEST, load_synthetic

    if not root.is_dir():
        raise FileNotFoundError(f"{_flag('synthetic')} {str(root)!r} is not a directory")
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{_flag('synthetic')} {str(root)!r} has no {MANIFEST} (not a finished synthetic set)")
    load_synthetic(root, verify=False)  # format, entries and files: a corrupt set fails here, not at the end


def _read_summary(path) -> dict:
    try:
        rec = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{_flag('summary')} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{_flag('summary')} {str(path)!r} is not a JSON summary: {e}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{_flag('summary')} {str(path)!r} is not a JSON object (the file quantize --json-out writes)")
    return rec
