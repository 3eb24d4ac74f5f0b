"""What the CIFAR-10 accuracy benchmarks (``bench/*_cifar10.py``) share: their common flags, the
CIFAR-10 files they open, the results file a killed run resumes from, and the frame of each
generated markdown table.

Every script keeps its finished rows in ``--out``.json and regenerates ``--out``.md from that JSON
after each row (:class:`Results`), so a run resumes at the next row and no table is typed by hand.
Import this module before ``torch``: it sets the OpenMP wait policy the timings assume.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# (torch's and the extension's) made each step up to 7x slower in our profile. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfqkern.data import build_transform, default_cifar10_dir, open_dataset  # noqa: E402
from dfqkern.evaluation import evaluate_top1  # noqa: E402
from dfqkern.models import create_model  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
WEIGHTS_DIR = ROOT / "bench" / "weights"
# The CIFAR-10 files of the shared data folder (``--data-dir``).
DEV_IMAGES, DEV_LABELS = "cifar10_test_dev_jpeg.tar.gz", "cifar10_test_dev_labels.csv"
TRAIN_IMAGES = "cifar10_train_jpeg.tar.gz"
EVAL_BATCH = 500


# ----------------------------------------------------------------------------- command line

def parser(doc: str, data_dir_note: str = "") -> argparse.ArgumentParser:
    """A script's parser: the first paragraph of its docstring ``doc`` as description, and --data-dir."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="CIFAR-10 data folder (default: $DFQKERN_CIFAR10_DIR or "
                   "../shared/data/cifar10)" + (f"; {data_dir_note}" if data_dir_note else ""))
    return p


def comma_list(allowed=None, item=str):
    """argparse ``type`` of a comma list: each item converted by ``item`` and, with ``allowed``, one of those
    (argparse turns a bad item into a usage error naming the flag)."""
    def parse(text: str) -> list:
        items = [item(v) for v in text.split(",") if v]
        bad = [v for v in items if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {list(allowed)}")
        return items
    parse.__name__ = "comma list"  # argparse's name for the type in 'invalid ... value' errors
    return parse


def add_choices(p: argparse.ArgumentParser, flag: str, allowed, what: str = "", default: "str | None" = None,
                help: "str | None" = None) -> None:
    """A flag taking a comma list of ``allowed`` items (default: all of them), parsed to a list."""
    p.add_argument(flag, default=",".join(allowed) if default is None else default, type=comma_list(allowed),
                   help=help or f"comma list of {what}{list(allowed)}")


def add_run_flags(p: argparse.ArgumentParser, out_name: str, *, progress: bool = True,
                  work_dir: "tuple[str, str] | None" = None) -> None:
    """--threads, --out (``bench/results/<out_name>``), --fresh and, when asked, --progress and --work-dir
    (``work_dir`` = (what is kept there, its folder under the cache); parsed as a path with the default
    filled in)."""
    p.add_argument("--threads", type=int, default=2)
    if work_dir is not None:
        what, sub = work_dir
        p.add_argument("--work-dir", type=Path, default=cache_dir() / sub,
                       help=f"where {what} (default: $DFQKERN_CACHE_DIR or ~/.cache/dfqkern, /{sub})")
    p.add_argument("--out", default=str(RESULTS_DIR / out_name))
    p.add_argument("--fresh", action="store_true", help="discard rows already in the JSON")
    if progress:
        p.add_argument("--progress", action="store_true", help="show progress bars")


def cache_dir() -> Path:
    return Path(os.environ.get("DFQKERN_CACHE_DIR") or Path.home() / ".cache" / "dfqkern")


# ----------------------------------------------------------------------------- data and measurement

def cifar10_dir(data_dir: "str | None") -> Path:
    return Path(data_dir) if data_dir else default_cifar10_dir()


def dev_set(data_dir: Path, spec):
    """The labelled dev test images, preprocessed for a model with input spec ``spec``."""
    return open_dataset(data_dir / DEV_IMAGES, build_transform(spec), labels_csv=data_dir / DEV_LABELS)


# The pretrained CIFAR-10 nets the benchmarks measure: name -> (registry arch, ``create_model`` keywords).
# ``pretrained`` weights are found by dfqkern.assets (the shared data folder); the edge nets are trained
# by bench/train_edge_cifar10.py into bench/weights/.
NETS = {
    "resnet20": ("cifar10_resnet20", {"pretrained": True}),
    "shufflenetv2": ("cifar10_shufflenetv2_x0_5",
                     {"checkpoint": WEIGHTS_DIR / "cifar10_shufflenetv2_x0_5.safetensors"}),
    "mobilenetv2": ("cifar10_mobilenetv2_x0_35",
                    {"checkpoint": WEIGHTS_DIR / "cifar10_mobilenetv2_x0_35.safetensors"}),
    "convmixer": ("cifar10_convmixer_256_8", {"pretrained": True}),
}


def open_net(name: str):
    """Net ``name`` of :data:`NETS` in eval mode; a missing trained checkpoint stops the script, naming it."""
    arch, kwargs = NETS[name]
    ckpt = kwargs.get("checkpoint")
    if ckpt is not None and not Path(ckpt).is_file():
        raise SystemExit(f"{name}: checkpoint {ckpt} is missing (train it with bench/train_edge_cifar10.py)")
    return create_model(arch, **kwargs).eval()


def train_set(data_dir: Path, spec=None):
    """The (unlabelled) training images; ``spec`` None: no transform yet (set one per model)."""
    return open_dataset(data_dir / TRAIN_IMAGES, None if spec is None else build_transform(spec))


def top1(model, dev, progress: bool = False) -> float:
    return round(evaluate_top1(model, dev, batch_size=EVAL_BATCH, progress=progress)["top1"], 2)


class Timer:
    """Wall and process CPU seconds of a ``with`` block, and the 1-minute load average around it (the
    benchmarks share their CPU, so a row's time is read beside the load it ran under)."""

    def __enter__(self) -> "Timer":
        self.load_before = os.getloadavg()[0]
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.load_after = os.getloadavg()[0]

    @property
    def load(self) -> list[float]:
        return [round(self.load_before, 2), round(self.load_after, 2)]


def now() -> str:
    """UTC time stamp of a finished row."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(threads: int, **settings) -> dict:
    """A run's ``meta`` record: its ``settings`` plus the machine, threads, wait policy and package commit."""
    return {**settings, "threads": threads, "commit": git_commit(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}


# ----------------------------------------------------------------------------- results file

def _number_or_text(value: str) -> "float | str":
    try:
        return float(value)
    except ValueError:
        return value


def _optional_kind(annotation) -> type:
    """The type a field defaulting to None takes, read from its annotation (``"float | None"`` -> float);
    a number or else the text when the annotation names none of float / int / str."""
    names = [t.strip() for t in str(annotation).replace("'", "").replace('"', "").split("|")]
    return next((kind for kind in (float, int, str) if kind.__name__ in names), _number_or_text)


def parse_field_set(items: list, cls, flag: str, own_flags: "tuple[str, ...]" = ()) -> dict:
    """``FLAG FIELD=VALUE`` items -> fields of the config dataclass ``cls``, typed as their defaults (a field
    whose default is None as its annotation says; ``cls`` checks the value); ``own_flags``: fields the script
    sets with flags of its own."""
    import dataclasses

    kinds = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            kinds[f.name] = _optional_kind(f.type) if f.default is None else type(f.default)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in kinds or kinds[key] not in (int, float, str, _number_or_text):
            raise ValueError(f"{flag} takes FIELD=VALUE with FIELD a number or text field of {cls.__name__}, "
                             f"got {item!r}")
        if key in own_flags:
            raise ValueError(f"{flag} {key}: use the script's own flag for it")
        try:
            out[key] = kinds[key](value)
        except ValueError:
            raise ValueError(f"{flag} {key} takes a {kinds[key].__name__}, got {value!r}") from None
    return out


def field_set_label(fields: dict) -> str:
    """``a=1,b=x``: a --*-set dict as it appears in row keys and tables (sorted, floats in %g)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(fields.items()))


def field_set_tags(fields: dict) -> list:
    """``['a1', 'bx']``: a --*-set dict as tags of folder names and variant names (sorted, floats in %g)."""
    return [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(fields.items())]


def join_key(*fields) -> str:
    """A row's key in the results JSON: the fields that identify it, joined by '|'."""
    return "|".join(str(f) for f in fields)


class Results:
    """The rows finished so far (``out``.json, read back unless ``fresh``; ``empty`` when there is none)
    and the markdown table ``render(data)`` regenerated from them at every save. ``merge``: the sections
    (dicts of the JSON) whose entries another process may have added meanwhile, kept when a row is written:
    the rows, and what rows refer to (e.g. their data sets and models)."""

    def __init__(self, out, render, *, fresh: bool, empty: dict, upgrade=None, merge=("rows",)):
        self.out, self.render, self.merge = Path(out), render, tuple(merge)
        path = self.out.with_suffix(".json")
        disk = json.loads(path.read_text()) if path.exists() else None
        data = None if fresh else disk
        # --fresh: the entries on disk now are stale; the merge in row() must not bring them back
        self._stale = {sec: set(disk.get(sec, {})) for sec in self.merge} if fresh and disk else {}
        if data is not None and upgrade is not None:
            data = upgrade(data)  # rows of older runs, renamed to today's keys
        self.data = data or empty

    @property
    def rows(self) -> dict:
        return self.data["rows"]

    def row(self, key: str, compute, summary=None) -> dict:
        """Row ``key``: the stored one when an earlier run finished it, else ``compute()`` now, stored and
        saved at once; ``summary(row)`` is the line printed after it."""
        if key in self.rows:
            print(f"skip {key} (already measured)", flush=True)
            return self.rows[key]
        print(f"run {key}", flush=True)
        row = compute()
        with self._locked():  # another process may have written rows of the same table meanwhile: keep them
            path = self.out.with_suffix(".json")
            if path.exists():
                disk = json.loads(path.read_text())
                for sec in self.merge:
                    stale, mine = self._stale.get(sec, ()), self.data.setdefault(sec, {})
                    for k, v in disk.get(sec, {}).items():
                        if k not in stale:
                            mine.setdefault(k, v)
            self.rows[key] = row
            self._write()
        if summary is not None:
            print(f"  {summary(row)}", flush=True)
        return row

    def discard(self, section: str, keys) -> None:
        """Forget ``keys`` of ``section`` (a --fresh of part of the table): not merged back from the disk either."""
        for k in list(keys):
            self.data.get(section, {}).pop(k, None)
            self._stale.setdefault(section, set()).add(k)

    def save(self) -> None:
        """Write ``out``.json and the markdown table rendered from it, each atomically."""
        with self._locked():
            self._write()

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on ``out``.lock: two runs filling one table (e.g. one per core) take turns."""
        import fcntl

        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out.with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self) -> None:
        """The JSON first, so a finished row survives a table that fails to render; each file atomically."""
        for suffix, text in ((".json", lambda: json.dumps(self.data, indent=1, sort_keys=True)),
                             (".md", lambda: self.render(self.data))):
            tmp = self.out.with_suffix(suffix + ".tmp")
            tmp.write_text(text() + "\n")
            os.replace(tmp, self.out.with_suffix(suffix))


# ----------------------------------------------------------------------------- markdown frame

def generated_by(script: str) -> str:
    """The first words of a table's description, naming the script that writes it."""
    return f"Generated by `python bench/{Path(script).name}` (do not edit by hand)."


def table_head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def document(lines: list[str], meta: dict) -> str:
    """The table's markdown: ``lines`` and the package commit of the last run."""
    return "\n".join([*lines, "", f"Package commit at the last run: `{meta['commit']}`.", ""])
