"""Capturing the inputs and outputs of one module over the calibration set, within a memory budget.

:class:`ActivationStore` keeps ``[N, ...]`` tensors in memory while they fit the byte budget and
writes the rest to safetensors files that are read back row by row (a memory map), so a large
model's block activations never need to fit in RAM. :func:`capture` runs a model up to a module
with hooks and stops the forward there.
"""
from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn import ActQuantizer, WeightQuantizer

_DTYPES = {torch.float32: ("F32", np.float32), torch.float16: ("F16", np.float16)}


class _Spilled:
    """A safetensors file holding one tensor, written row-chunk by row-chunk, read through np.memmap."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        st_dtype, self.np_dtype = _DTYPES[dtype]
        nbytes = int(np.prod(shape)) * np.dtype(self.np_dtype).itemsize
        header = json.dumps({name: {"dtype": st_dtype, "shape": list(shape), "data_offsets": [0, nbytes]}})
        header += " " * (-len(header) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
        self.offset = 8 + len(header)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(header)) + header.encode())
        self._written = 0
        self._mm = None

    def write(self, rows: torch.Tensor) -> None:
        self._file.write(rows.detach().to("cpu", self.dtype).contiguous().numpy().tobytes())
        self._written += rows.shape[0]

    def finish(self) -> None:
        self._file.close()
        if self._written != self.shape[0]:
            raise RuntimeError(f"spilled tensor {self.path} got {self._written} rows, expected {self.shape[0]}")
        self._mm = np.memmap(self.path, dtype=self.np_dtype, mode="r", offset=self.offset, shape=self.shape)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._mm[idx.cpu().numpy()]))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._mm = None
        self.path.unlink(missing_ok=True)


class _InMemory:
    def __init__(self, shape, dtype, device):
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self._written = 0

    def write(self, rows: torch.Tensor) -> None:
        self.data[self._written:self._written + rows.shape[0]] = rows.detach()
        self._written += rows.shape[0]

    def finish(self) -> None:
        if self._written != self.data.shape[0]:
            raise RuntimeError(f"stored tensor got {self._written} rows, expected {self.data.shape[0]}")

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx.to(self.data.device)]

    def close(self) -> None:
        self.data = None


class ActivationStore:
    """Named ``[N, ...]`` tensors: in memory up to ``budget_bytes`` in all, spilled to disk beyond it."""

    def __init__(self, budget_bytes: float, spill_dir: str | None = None, device: torch.device | str = "cpu"):
        if not budget_bytes >= 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
        self.budget = budget_bytes
        self.device = torch.device(device)
        self._spill_root = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._items: dict[str, _InMemory | _Spilled] = {}

    @property
    def used_bytes(self) -> int:
        return sum(t.data.numel() * t.data.element_size() for t in self._items.values() if isinstance(t, _InMemory))

    def is_spilled(self, name: str) -> bool:
        return isinstance(self._items[name], _Spilled)

    def _spill_path(self, name: str) -> Path:
        if self._spill_root is not None:
            root = Path(self._spill_root)
            root.mkdir(parents=True, exist_ok=True)
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="dfqkern-spill-")
            root = Path(self._tmp.name)
        return root / f"{name}.safetensors"

    def create(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        """A writer for ``name``: call ``write(rows)`` in order, then ``finish()``."""
        if dtype not in _DTYPES:
            dtype = torch.float32
        self.drop(name)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if self.used_bytes + nbytes <= self.budget:
            item = _InMemory(shape, dtype, self.device)
        else:
            item = _Spilled(self._spill_path(name), name, tuple(shape), dtype)
        self._items[name] = item
        return item

    def rows(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        return self._items[name].rows(idx)

    def drop(self, name: str) -> None:
        item = self._items.pop(name, None)
        if item is not None:
            item.close()

    def close(self) -> None:
        for name in list(self._items):
            self.drop(name)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the captured module needs to run."""


def _single_input(module_name: str, args, kwargs) -> torch.Tensor:
    extra = [k for k, v in (kwargs or {}).items() if v is not None and v is not False]
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or extra:
        raise ValueError(f"unit {module_name!r} is called with {len(args)} positional argument(s) and keyword "
                         f"arguments {extra}; reconstruction supports units taking one tensor")
    return args[0]


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int, store: ActivationStore,
            input_name: str | None = None, output_name: str | None = None, module_name: str = "unit",
            device: torch.device | None = None) -> None:
    """Run ``data`` through ``model`` (eval, no grad) batch by batch and store ``module``'s input and/or
    output under the given names (``None`` skips one). The forward stops right after ``module``."""
    device = device or next(model.parameters()).device
    writers: dict[str, object] = {}

    def hook(mod, args, kwargs, out):
        x = _single_input(module_name, args, kwargs)
        for name, t in ((input_name, x), (output_name, out)):
            if name is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"unit {module_name!r} returns {type(t).__name__}; reconstruction needs a tensor")
            if name not in writers:
                writers[name] = store.create(name, (len(data), *t.shape[1:]), t.dtype)
            writers[name].write(t)
        raise _StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(data), batch_size):
            try:
                model(data[i:i + batch_size].to(device))
            except _StopForward:
                continue
            raise RuntimeError(f"unit {module_name!r} did not run in the model's forward")
    finally:
        handle.remove()
        model.train(was_training)
    for w in writers.values():
        w.finish()


@contextlib.contextmanager
def quantization_disabled(model: nn.Module):
    """Run ``model`` in float: weight quantizers pass weights through, activation quantizers are off."""
    w_state = [(m, m.enabled) for m in model.modules() if isinstance(m, WeightQuantizer)]
    a_state = [(m, m.mode) for m in model.modules() if isinstance(m, ActQuantizer)]
    for m, _ in w_state:
        m.enabled = False
    for m, _ in a_state:
        m.mode = "off"
    try:
        yield model
    finally:
        for m, enabled in w_state:
            m.enabled = enabled
        for m, mode in a_state:
            m.mode = mode


@torch.no_grad()
def run_with_output_hooks(model: nn.Module, hooks: dict[nn.Module, "callable"], batches, device,
                          float_model: bool = False) -> None:
    """Run ``model`` over ``batches`` with ``hooks[module](module, output)`` called on each output of
    those modules (removed afterwards, even on error); ``float_model``: with quantization off."""
    handles = [m.register_forward_hook(lambda mod, args, out, f=f: f(mod, out)) for m, f in hooks.items()]
    try:
        with quantization_disabled(model) if float_model else contextlib.nullcontext():
            for x in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
