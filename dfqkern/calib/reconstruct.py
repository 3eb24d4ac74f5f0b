"""calibrate(): observer ranges, then unit-by-unit reconstruction (AdaRound / BRECQ / QDrop / Genie-M).

For each unit (block or lone layer), in execution order:

1. capture its input in the quantized model (earlier units already reconstructed and hardened),
   and its float input and output: the quantized model's own, with quantization off. (Not the
   float model's module of the same name: BatchNorm is folded into the quantized model's convs, so
   a lone conv's namesake in the float model outputs the pre-BatchNorm tensor, a different target);
2. learn the rounding of its weights (AdaRound), plus, block-wise methods, the step sizes of its
   activation quantizers (LSQ) and, Genie-M, its weight scales, minimising output MSE plus the
   annealed rounding regularizer. QDrop feeds an element-wise mix of float and quantized inputs
   and drops activation quantization at random inside the unit;
3. harden the rounding; keep it only if the unit's output error on the held-out calibration images
   fell (:mod:`dfqkern.calib.guard`), and (with ``checkpoint_dir``) save the unit's state so a
   killed run resumes after it with the very model an uninterrupted run gives.

Finally the whole model's output error on the held-out images is compared with the observer
start's, and the observer start is returned if reconstruction made it worse.

Randomness comes from generators seeded by ``(seed, unit index)``, so a fixed seed gives an
identical model, resumed or not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..nn import ActQuantizer, QuantLayer, WeightQuantizer
from ..nn.observe import batches_of, observe_activations
from .capture import ActivationStore, capture, quantization_disabled
from .config import CalibConfig
from .guard import QuantizerState, heldout_count, heldout_split
from .ln_reparam import apply_configured as apply_ln_reparam
from .losses import reconstruction_loss
from .prediction_difference import PredictionDifference
from .report import CalibReport, UnitReport
from .unit_training import UnitTraining, derived_seed, eval_loss
from .units import Unit, execution_order, find_units
from .vit import quantize_attention
from ..model_info import model_info, set_info

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
EVAL_SAMPLES = 256  # without held-out images, the training images the guard measures on
FP_MODEL_RTOL = 1e-3  # fp_model and qmodel-without-quantization agree to this (folding reorders float math)


# ----------------------------------------------------------------------------- data

def calibration_data(data) -> torch.Tensor:
    """The calibration inputs as one float tensor: a tensor, a Dataset of tensors / (tensor, label)
    items, or an iterable of batches (tensors or (tensor, ...) tuples)."""
    def first(item):
        return item[0] if isinstance(item, (tuple, list)) else item

    if isinstance(data, torch.Tensor):
        x = data
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        x = torch.stack([first(data[i]) for i in range(len(data))]) if len(data) else torch.empty(0)
    else:
        try:
            batches = [first(b) for b in data]
        except TypeError:
            raise TypeError(f"data must be a tensor, a Dataset or an iterable of batches, "
                            f"got {type(data).__name__}") from None
        x = torch.cat(batches) if batches else torch.empty(0)
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("data must hold floating-point image tensors")
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"data is empty or not batched: got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------- checkpoints

def _fingerprint(qmodel: nn.Module, units: list[Unit], data: torch.Tensor, cfg: CalibConfig) -> str:
    h = hashlib.sha256()
    qcfg = model_info(qmodel).config
    meta = {"calib": cfg.result_fields(), "quant": qcfg.to_dict() if hasattr(qcfg, "to_dict") else None,
            "units": [u.name for u in units], "data_shape": list(data.shape)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for i in range(0, len(data), 64):  # in chunks: no second copy of a large calibration set
        h.update(data[i:i + 64].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Checkpoint:
    """``progress.json`` (fingerprint, finished units) plus ``unit_NNNN.safetensors`` per finished unit."""

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.progress = self.root / "progress.json"
        self.done: list[str] = []
        if self.progress.exists():
            state = json.loads(self.progress.read_text())
            if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint_dir {str(self.root)!r} holds a run with another model, data or "
                                 f"config; use an empty directory (or delete it) to start over")
            self.done = list(state["done"])

    def _path(self, index: int) -> Path:
        return self.root / f"unit_{index:04d}.safetensors"

    def load(self, index: int, unit: Unit) -> None:
        from safetensors.torch import load_file

        unit.module.load_state_dict(load_file(str(self._path(index))), strict=True)

    def save(self, index: int, unit: Unit) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in unit.module.state_dict().items()}
        tmp = self._path(index).with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, self._path(index))
        self.done.append(unit.name)
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                                   "done": self.done}, indent=1))
        os.replace(tmp, self.progress)


# ----------------------------------------------------------------------------- one unit

# ----------------------------------------------------------------------------- one unit

def _reconstruct_unit(unit: Unit, index: int, store: ActivationStore, n: int, cfg: CalibConfig, device,
                      desc: str, n_heldout: int = 0, pd: PredictionDifference | None = None) -> UnitReport:
    """Reconstruct ``unit`` on stored rows ``[n_heldout, n)``; rows ``[0, n_heldout)`` are its held-out
    yardstick (the first training rows when there are none). A unit that ends worse keeps its start."""
    t0 = time.perf_counter()
    eval_idx = torch.arange(n_heldout) if n_heldout else torch.arange(min(n, EVAL_SAMPLES))
    start_state = QuantizerState(unit.module)
    loss_nearest = eval_loss(unit, store, eval_idx, cfg.batch_size, device)
    training = UnitTraining(unit, index, cfg, device, n_heldout, n, pd)
    try:
        training.run(store, desc)
    finally:
        training.teardown()
    loss_hard = eval_loss(unit, store, eval_idx, cfg.batch_size, device)
    kept_start = not loss_hard <= loss_nearest
    if kept_start:
        start_state.restore()
        log.warning("%s: reconstruction raised the held-out loss %.4g -> %.4g; the unit keeps its starting "
                    "point", unit.name or unit.kind, loss_nearest, loss_hard)
    return UnitReport(unit.name, unit.kind, cfg.iters, loss_nearest, loss_hard, *training.loss_summary(),
                      time.perf_counter() - t0, kept_start=kept_start)


# ----------------------------------------------------------------------------- public entry point

def _model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else None


@torch.no_grad()
def _check_fp_model(fp_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> None:
    """``fp_model`` must compute what ``qmodel`` computes with quantization off (the targets come from the latter)."""
    ref = _model_output(fp_model, x)
    with quantization_disabled(qmodel):
        got = _model_output(qmodel, x)
    if ref is None or got is None:
        return
    if ref.shape != got.shape or not torch.allclose(got, ref, rtol=FP_MODEL_RTOL,
                                                    atol=FP_MODEL_RTOL * float(ref.abs().max())):
        raise ValueError("fp_model does not compute the function of qmodel with quantization off; pass the float "
                         "model quantize_model was given (or fp_model=None)")


@torch.no_grad()
def _model_loss(qmodel: nn.Module, x: torch.Tensor, target: torch.Tensor | None, batch_size: int, device) -> float:
    """Output MSE of ``qmodel`` (quantized, eval) against the float outputs ``target`` on ``x``."""
    if target is None:
        return math.nan
    total = 0.0
    for i in range(0, len(x), batch_size):
        out = _model_output(qmodel, x[i:i + batch_size].to(device))
        total += reconstruction_loss(out, target[i:i + batch_size]).item() * len(out)
    return total / len(x)


@torch.no_grad()
def _float_outputs(qmodel: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor | None:
    with quantization_disabled(qmodel):
        outs = [_model_output(qmodel, x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return None if any(o is None for o in outs) else torch.cat(outs)


def calibrate(qmodel: nn.Module, fp_model: nn.Module | None, data, config: CalibConfig | None = None) -> nn.Module:
    """Calibrate ``qmodel`` (from :func:`dfqkern.quantize.quantize_model`) in place and return it.

    ``fp_model`` is the float model the quantized one was made from; it is only checked to agree
    with ``qmodel`` run with quantization off, which gives every reconstruction target (``None``
    skips the check). ``data``: calibration images (see :func:`calibration_data`); up to 1/8 of them
    (at most 256) are held out of the training batches to judge every unit and the final model
    against the observer start (:mod:`dfqkern.calib.guard`). Activation ranges are always
    (re)observed first. timm ViT attention modules get matmul quantizers (:mod:`dfqkern.calib.vit`).
    The report is attached as ``model_info(qmodel).calib_report`` (:class:`CalibReport`).
    """
    cfg = config or CalibConfig()
    if not isinstance(cfg, CalibConfig):
        raise TypeError(f"config must be a CalibConfig, got {type(cfg).__name__}")
    if cfg.backend is None:
        return _calibrate(qmodel, fp_model, data, cfg)
    from ..quantize import set_backend

    before = {m: m.backend for m in qmodel.modules() if isinstance(m, (QuantLayer, ActQuantizer, WeightQuantizer))}
    set_backend(qmodel, cfg.backend)
    try:
        return _calibrate(qmodel, fp_model, data, cfg)
    finally:
        for m, backend in before.items():
            m.backend = backend


def _calibrate(qmodel: nn.Module, fp_model: nn.Module | None, data, cfg: CalibConfig) -> nn.Module:
    """The body of :func:`calibrate` (quantizers on the chosen backend)."""
    if not isinstance(qmodel, nn.Module) or not any(isinstance(m, QuantLayer) for m in qmodel.modules()):
        raise ValueError("qmodel must be a model with quantized layers (dfqkern.quantize.quantize_model)")
    if any(m.is_packed for m in qmodel.modules() if isinstance(m, QuantLayer)):
        raise ValueError("qmodel is packed; calibrate the fake-quant model before pack_model()")
    if fp_model is not None and not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module or None, got {type(fp_model).__name__}")
    t_start = time.perf_counter()
    x = calibration_data(data)
    device = next(qmodel.parameters()).device
    qmodel.eval()
    if fp_model is not None:
        fp_model.eval()
    quantize_attention(qmodel)
    if fp_model is not None:
        _check_fp_model(fp_model, qmodel, x[:8].to(device))
    report = CalibReport(cfg.method, cfg.to_dict())

    t0 = time.perf_counter()
    obs = x if cfg.observe_samples is None else x[:cfg.observe_samples]
    apply_ln_reparam(qmodel, batches_of(obs, cfg.batch_size), cfg.batch_size, device)  # QuantConfig.ln_reparam
    observe_activations(qmodel, batches_of(obs, cfg.batch_size), device, cfg.progress)
    report.observe_seconds = time.perf_counter() - t0
    if cfg.method == "observer":
        report.seconds = time.perf_counter() - t_start
        set_info(qmodel, calib_report=report)
        return qmodel

    units = execution_order(qmodel, find_units(qmodel, cfg.blockwise), x[:1].to(device))
    ckpt = _Checkpoint(cfg.checkpoint_dir, _fingerprint(qmodel, units, x, cfg)) if cfg.checkpoint_dir else None
    # held-out images first, then the training images: stored rows [0, n_heldout) are never trained on
    n_heldout = heldout_count(len(x))
    x = x[heldout_split(len(x), derived_seed(cfg.seed, -1))]
    guard_x = x[:n_heldout] if n_heldout else x[:EVAL_SAMPLES]
    guard_target = _float_outputs(qmodel, guard_x, cfg.batch_size, device)
    observer_state = QuantizerState(qmodel)
    report.heldout_images = n_heldout
    report.model_loss_observer = _model_loss(qmodel, guard_x, guard_target, cfg.batch_size, device)
    need_fp_in = cfg.effective_drop_prob > 0
    # PD-Quant's term: the float outputs of every calibration image, row for row with the stored activations
    pd = PredictionDifference(qmodel, x, _float_outputs(qmodel, x, cfg.batch_size, device)) if cfg.pd_weight > 0 \
        else None
    with ActivationStore(cfg.memory_budget_mb * 2 ** 20, cfg.spill_dir, device) as store:
        for i, unit in enumerate(units):
            desc = f"{cfg.method} [{i + 1}/{len(units)}] {unit.name or unit.kind}"
            if ckpt is not None and i < len(ckpt.done):
                if ckpt.done[i] != unit.name:
                    raise ValueError(f"checkpoint lists unit {ckpt.done[i]!r} where the model has {unit.name!r}")
                ckpt.load(i, unit)
                report.units.append(UnitReport(unit.name, unit.kind, cfg.iters, math.nan, math.nan, math.nan,
                                               math.nan, 0.0, resumed=True))
                continue
            capture(qmodel, unit.module, x, cfg.batch_size, store, input_name="q_in", module_name=unit.name,
                    device=device)
            with quantization_disabled(qmodel):
                capture(qmodel, unit.module, x, cfg.batch_size, store, input_name="fp_in" if need_fp_in else None,
                        output_name="fp_out", module_name=unit.name, device=device)
            rep = _reconstruct_unit(unit, i, store, len(x), cfg, device, desc, n_heldout, pd)
            report.units.append(rep)
            log.info("%s: held-out loss %.4g (start) -> %.4g (learned, hard)%s in %.1fs", unit.name, rep.loss_nearest,
                     rep.loss_hard, " [kept start]" if rep.kept_start else "", rep.seconds)
            for name in ("q_in", "fp_in", "fp_out"):
                store.drop(name)
            if ckpt is not None:
                ckpt.save(i, unit)
    report.model_loss_final = _model_loss(qmodel, guard_x, guard_target, cfg.batch_size, device)
    if report.model_loss_final > report.model_loss_observer:
        log.warning("reconstruction raised the model's held-out output loss %.4g -> %.4g; returning the observer "
                    "start", report.model_loss_observer, report.model_loss_final)
        observer_state.restore()
        report.reverted_to_observer = True
        report.model_loss_final = report.model_loss_observer
    report.seconds = time.perf_counter() - t_start
    set_info(qmodel, calib_report=report)
    return qmodel

