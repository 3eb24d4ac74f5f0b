"""Packed models as torch.export / AOTInductor ``.pt2`` packages, for runtimes without our Python stack.

The packed layers are the custom ops ``dfqkern::packed_linear`` / ``dfqkern::packed_conv2d``
(:mod:`dfqkern.autograd`, with fake implementations), so ``torch.export`` records each as one
opaque call. AOTInductor compiles the float glue around them (ReLU, pooling, residual adds) to C++
and leaves our ops as fallback kernels that its proxy executor calls back into the registered op:
a process running the package must have registered them first (:func:`load_pt2` does).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..nn.base import QuantLayer
from ..model_info import model_info
from .paths import check_out_file

__all__ = ["PT2_SUFFIX", "export_pt2", "load_pt2", "package_metadata"]

PT2_SUFFIX = ".pt2"  # aoti_compile_and_package accepts no other file name


def _check_packed(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    unpacked = [n for n, m in layers if not m.is_packed]
    if not layers or unpacked:
        what = ("has no dfqkern quantized layers" if not layers else
                f"has fake-quant (unpacked) layers: {', '.join(unpacked[:5])}{' ...' if len(unpacked) > 5 else ''}")
        raise ValueError(f"export_pt2 needs a packed model (dfqkern.pack_model or dfqkern.load_quantized); the "
                         f"model {what}")




def _check_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a non-empty tuple of tensors, got "
                        f"{type(example_inputs).__name__}")
    return example_inputs


def _dynamic_batch(example_inputs: tuple):
    # one batch dimension shared by every input, so a package exported at batch 2 runs at any batch size;
    # export specializes sizes 0 and 1, hence the example batch must be >= 2
    batch = torch.export.Dim("batch", min=1)
    if any(t.dim() == 0 or t.shape[0] < 2 for t in example_inputs):
        raise ValueError("example_inputs need a batch dimension of at least 2 for a dynamic-batch export "
                         f"(got shapes {[tuple(t.shape) for t in example_inputs]}); or pass dynamic_batch=False")
    return tuple({0: batch} for _ in example_inputs)


def _suspects(model: nn.Module) -> str:
    # Packed layers are custom ops with fake implementations; other packed modules (quantized attention
    # matmuls) may call the kernels directly, which torch.export cannot trace: name them
    others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
              if getattr(m, "is_packed", False) is True and not isinstance(m, QuantLayer)]
    if not others:
        return ""
    return (f" (packed modules other than QuantLinear / QuantConv2d, the likely cause: {', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''})")


def export_pt2(model: nn.Module, out_path, example_inputs: tuple, *, dynamic_batch: bool = True,
               overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Export a packed dfqkern model with ``torch.export`` and compile it with AOTInductor into ``out_path``.

    ``example_inputs``: the forward's arguments (on the device the package is for: CPU is tested).
    ``dynamic_batch``: the first dimension of every input is left free (the example batch must be >= 2).
    The package is compiled next to ``out_path`` and renamed onto it, so a reader never sees half a
    file; ``metadata`` (str -> str) is stored in it beside dfqkern's own keys (:func:`package_metadata`).
    Slow: AOTInductor compiles C++ (tens of seconds for a small CNN on one core).
    """
    _check_packed(model)
    path = check_out_file(out_path, PT2_SUFFIX, overwrite, " (the AOTInductor package format)")
    example_inputs = _check_inputs(example_inputs)
    dynamic_shapes = _dynamic_batch(example_inputs) if dynamic_batch else None
    meta = {"dfqkern_version": __version__, "dfqkern_arch": str(model_info(model).arch or "")}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise RuntimeError(f"torch.export could not trace the packed model{_suspects(model)}: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    # a unique hidden name in the same directory (so the rename is atomic), created by the packager
    # itself: the file gets the permissions of any file written under the user's umask
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PT2_SUFFIX}")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.metadata": meta})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _register_ops() -> None:
    """Register the custom ops the package calls back into, importing no more of dfqkern than that."""
    import importlib.util

    if importlib.util.find_spec("dfqkern.runtime") is not None:
        import dfqkern.runtime  # noqa: F401 - the lean runtime: formats, kernels, nn, io
    else:
        import dfqkern.autograd  # noqa: F401 - registers dfqkern::packed_* (and loads the extension on use)


def load_pt2(path, *, run_single_threaded: bool = False):
    """Load a package written by :func:`export_pt2`: a callable ``model(*inputs) -> output``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pt2 package {str(path)!r} does not exist" if not path.exists() else
                                f"pt2 package {str(path)!r} is not a file")
    _register_ops()
    try:
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded)
    except RuntimeError as e:  # torch's message does not say which file
        raise ValueError(f"pt2 package {str(path)!r} cannot be loaded: {e}") from e


def package_metadata(loaded) -> dict:
    """The metadata stored in a loaded package (dfqkern's keys and the caller's)."""
    return dict(loaded.get_metadata())
