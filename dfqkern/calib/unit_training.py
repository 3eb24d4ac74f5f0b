"""Learning one unit's rounding (and step sizes): setup, the optimisation loop, teardown.

:class:`UnitTraining` owns everything that exists only while a unit learns: the AdaRound variables,
the optimiser and its schedules, the QDrop masks, and the activation quantizers' training mode.
``setup`` happens in the constructor, :meth:`UnitTraining.run` is the loop, and
:meth:`UnitTraining.teardown` always leaves the unit hardened and frozen, even after an error.
"""
from __future__ import annotations

import hashlib
import math

import torch
from tqdm.auto import tqdm

from ..kernels import dispatch
from ..nn import ActQuantizer, WeightQuantizer
from .capture import ActivationStore
from .config import CalibConfig
from .losses import beta_at, reconstruction_loss, rounding_active, rounding_loss
from .prediction_difference import PredictionDifference
from .units import Unit
from .vit import FixedRangeActQuantizer


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from a tuple of ints: (calibration seed, unit index, stream)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def act_quantizers(module: torch.nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def _use_kernel_mask(cfg: CalibConfig, device: torch.device) -> bool:
    """``auto``: the fused op's counter-hash mask when a compiled backend computes fake-quant for this
    device (the choice dispatch makes, ``$DFQKERN_BACKEND`` included); the reference's is slow."""
    if cfg.qdrop_mask != "auto":
        return cfg.qdrop_mask == "kernel"
    return dispatch.first_backend("fake_quant_forward", device.type) not in (None, "reference")


class _TorchQDrop:
    """QDrop with torch's generator: keep the float value where a uniform draw falls below ``p``.

    The same rule the fused op applies (``drop_prob`` = chance of keeping float), with a mask that
    costs one ``rand`` instead of the counter hash, which the reference backend computes slowly.
    """

    def __init__(self, quantizers: list[ActQuantizer], p: float, gen: torch.Generator):
        self.p, self.gen = p, gen
        self.handles = [q.register_forward_hook(self._hook) for q in quantizers]

    def _hook(self, mod, args, out):
        if not mod.training or mod.mode != "quant":
            return out
        x = args[0]
        keep_float = torch.rand(x.shape, generator=self.gen, device=x.device) < self.p
        return torch.where(keep_float, x, out)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def eval_loss(unit: Unit, store: ActivationStore, idx: torch.Tensor, batch_size: int, device) -> float:
    """The unit's output MSE on stored rows ``idx`` (quantized input, float target), in eval mode."""
    total = 0.0
    for i in range(0, len(idx), batch_size):
        j = idx[i:i + batch_size]
        out = unit.module(store.rows("q_in", j).to(device))
        total += reconstruction_loss(out, store.rows("fp_out", j).to(device)).item() * len(j)
    return total / len(idx)


class UnitTraining:
    """One unit's learning on stored rows ``[first_row, n)``, seeded by ``(cfg.seed, index)``.

    ``pd``: the prediction-difference term (``cfg.pd_weight`` > 0), bound to this unit while it learns.
    """

    def __init__(self, unit: Unit, index: int, cfg: CalibConfig, device, first_row: int, n: int,
                 pd: "PredictionDifference | None" = None):
        self.unit, self.cfg, self.device = unit, cfg, device
        self.pd = None if pd is None else pd.bind(unit.module)
        self.first_row, self.n_train = first_row, n - first_row
        self.gen = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, index, 0))
        layers = unit.quant_layers()
        self.wqs: list[WeightQuantizer] = [layer.w_quant for layer in layers]
        self.round_params = [wq.start_adaround(layer.weight) for wq, layer in zip(self.wqs, layers)]
        self._make_optimizer()
        self.drop = cfg.effective_drop_prob
        self.torch_qdrop = None
        self.unit_acts = act_quantizers(unit.module)
        for j, a in enumerate(self.unit_acts):
            a.train()
            a._calls = 0
            a.seed = derived_seed(cfg.seed, index, j + 1)
        if self.drop > 0:
            if _use_kernel_mask(cfg, torch.device(device)):
                for a in self.unit_acts:
                    a.drop_prob = self.drop
            else:
                self.torch_qdrop = _TorchQDrop(self.unit_acts, self.drop, self.gen)
        self.losses: list[float] = []

    def _make_optimizer(self) -> None:
        cfg = self.cfg
        acts = [a for a in act_quantizers(self.unit.module)
                if not a.per_token and not isinstance(a, FixedRangeActQuantizer)]
        groups = [{"params": self.round_params, "lr": cfg.effective_round_lr}]
        self.scheduled = []
        if cfg.learn_act_scale and acts:
            self.scheduled.append({"params": [a.scale for a in acts], "lr": cfg.act_lr})
        if cfg.learn_weight_scale:
            for wq in self.wqs:  # relative lr: Adam moves a parameter by about lr per step, whatever its magnitude
                self.scheduled.append({"params": [wq.scale],
                                       "lr": cfg.weight_scale_lr * wq.scale.detach().abs().mean().item()})
        for g in self.scheduled:
            for p in g["params"]:
                p.requires_grad_(True)
        self.opt = torch.optim.Adam(groups + self.scheduled)
        # cosine decay on the scales (QDrop's schedule for activation step sizes); rounding lr stays constant
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.iters) / cfg.iters))  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, [lambda s: 1.0] * len(groups) + [cosine] * len(self.scheduled))

    def run(self, store: ActivationStore, desc: str) -> None:
        cfg, device, gen = self.cfg, self.device, self.gen
        bar = tqdm(range(cfg.iters), desc=desc, disable=not cfg.progress, leave=False, mininterval=1.0)
        try:
            for step in bar:
                idx = torch.randperm(self.n_train, generator=gen, device=device)[:cfg.batch_size].cpu() + self.first_row
                inp = store.rows("q_in", idx).to(device)
                if self.drop > 0:  # QDrop: each element of the unit input is float with probability `drop`
                    fp_in = store.rows("fp_in", idx).to(device)
                    inp = torch.where(torch.rand(inp.shape, generator=gen, device=device) < self.drop, fp_in, inp)
                target = store.rows("fp_out", idx).to(device)
                rec = self._step(step, inp, target, idx)
                self.losses.append(rec)
                if step % 50 == 0 or step == cfg.iters - 1:
                    bar.set_postfix(loss=f"{rec:.4g}", refresh=False)
                if not math.isfinite(rec):
                    raise FloatingPointError(f"reconstruction loss of unit {self.unit.name!r} became {rec} at step "
                                             f"{step}; lower the learning rates")
        finally:
            bar.close()

    def _step(self, step: int, inp: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> float:
        cfg = self.cfg
        beta = beta_at(step, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
        for wq in self.wqs:
            wq.beta = beta
        out = self.unit.module(inp)
        rec = reconstruction_loss(out, target)
        loss = rec if self.pd is None else rec + cfg.pd_weight * self.pd(idx, out)
        if rounding_active(step, cfg.iters, cfg.warmup) and cfg.round_weight > 0:
            reg = rounding_loss(self.wqs)
            if reg is not None:
                loss = loss + cfg.round_weight * reg
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return rec.item()

    def teardown(self) -> None:
        """Harden the rounding, freeze every learned tensor, leave the quantizers in eval mode without QDrop."""
        if self.pd is not None:
            self.pd.release()
        if self.torch_qdrop is not None:
            self.torch_qdrop.remove()
        for a in self.unit_acts:
            a.drop_prob = 0.0
            a.eval()
        for g in self.scheduled:
            for p in g["params"]:
                p.requires_grad_(False)
        for p in self.round_params:
            p.requires_grad_(False)
        for wq in self.wqs:
            wq.harden()
            wq.last_reg = None

    def loss_summary(self) -> tuple[float, float]:
        """Training loss averaged over the first and the last 10 % of the steps."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k
