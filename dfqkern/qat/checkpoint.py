"""QAT training state on disk: one safetensors file of tensors per finished epoch plus ``progress.json``.

``progress.json`` (written last, atomically) names the epoch file, its sha256, the run's
fingerprint and the non-tensor state (optimizer hyper-parameters, loss history). A kill at any
moment leaves either the previous epoch's complete state or the new one; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

PROGRESS_FILE = "progress.json"
STATE_PATTERN = "epoch_{:04d}.safetensors"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """(tensors, json-able rest) of an optimizer's state_dict."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, k = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["state"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_state(directory: str | os.PathLike, epoch: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write epoch ``epoch``'s state (``epoch`` finished epochs), then point ``progress.json`` at it."""
    from safetensors.torch import save as serialize

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = STATE_PATTERN.format(epoch)
    data = serialize({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    _atomic_write(d / name, data)
    progress = {**meta, "epoch": epoch, "state_file": name, "state_sha256": hashlib.sha256(data).hexdigest()}
    _atomic_write(d / PROGRESS_FILE, json.dumps(progress, indent=1, sort_keys=True).encode())
    for old in d.glob("epoch_*.safetensors"):
        if old.name != name:
            old.unlink()
    return d / name


def load_state(directory: str | os.PathLike, fingerprint: str) -> tuple[dict, dict] | None:
    """(tensors, meta) of the last finished epoch when it belongs to the run ``fingerprint``; else None."""
    from safetensors.torch import load as deserialize

    d = Path(directory)
    try:
        meta = json.loads((d / PROGRESS_FILE).read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        data = (d / meta["state_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(data).hexdigest() != meta.get("state_sha256"):
        raise ValueError(f"QAT checkpoint {str(d / meta['state_file'])!r} does not match the sha256 recorded in "
                         f"{PROGRESS_FILE}; remove {str(d)!r} to start over")
    return deserialize(data), meta


def clear_state(directory: str | os.PathLike) -> None:
    """Remove what :func:`save_state` writes (and the directory when it is then empty)."""
    d = Path(directory)
    if not d.is_dir():
        return
    for pattern in (PROGRESS_FILE, "epoch_*.safetensors", ".*.tmp"):
        for f in d.glob(pattern):
            f.unlink()
    try:
        d.rmdir()
    except OSError:
        pass
