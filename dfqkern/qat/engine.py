"""The data-free QAT loop: a generator and a fake-quant student trained from a float teacher.

Per iteration (after GDFQ): the method samples latent codes and targets; the generator makes a
batch; the teacher (eval mode, frozen) scores it and the generator takes one Adam step on the
method's generator loss; then, past ``warmup_epochs``, the student takes one step on the method's
student loss over the same images, detached (or what the method makes of them). The student's
weights (SGD) and LSQ step sizes (Adam) learn through the fused fake-quant ops (STE). Every
learning rate follows ``QATConfig.lr_factor`` per iteration.

Reproducible: every random draw comes from one ``torch.Generator`` seeded by ``QATConfig.seed``
(and the generator network is initialised from the seed), and its state is checkpointed with the
models and optimizers after every epoch, so a run resumed after a kill ends with the same weights
as one that was never interrupted (same device and thread count).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_optimizer_state, load_state, optimizer_state, save_state
from .config import QATConfig
from .losses import kd_kl
from .features import FeatureTap, default_feature_names
from .methods import TeacherOutput, method_class, method_options
from .student import freeze_student, keep_scales_positive, prepare_student
from ..model_info import model_info

GENERATOR_SEED_STREAM = 0x5EED  # the generator's initial weights: seed ^ stream, apart from the sampling stream


class _Teacher:
    """The float model as the methods see it: logits, features at the method's points, BN inputs."""

    def __init__(self, model: nn.Module, feature_names: list[str], need_bn: bool):
        from ..datagen.bn_inversion import BNCapture

        self.model = model
        self.capture = BNCapture(model) if need_bn else None
        self.tap = FeatureTap(model, feature_names) if feature_names else None

    def __call__(self, x: torch.Tensor) -> TeacherOutput:
        logits = self.model(x)
        return TeacherOutput(logits, self.tap.features() if self.tap else None,
                             list(self.capture.inputs) if self.capture else [])

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        if self.tap is not None:
            self.tap.remove()


def _fingerprint(cfg: QATConfig, teacher: nn.Module, student: nn.Module, extra: dict) -> str:
    from .._version import __version__

    h = hashlib.sha256(json.dumps({"version": __version__, "qat": cfg.result_fields(), **extra}, sort_keys=True,
                                  default=str).encode())
    for prefix, model in (("teacher", teacher), ("student", student)):
        for name, t in model.state_dict().items():
            h.update(f"{prefix}.{name}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _infer_shapes(teacher: nn.Module, num_classes, image_shape, device):
    if image_shape is None:
        spec = model_info(teacher).input_spec
        if spec is None:
            raise ValueError("image_shape is needed (the teacher's ModelInfo has no input_spec): pass (C, H, W)")
        image_shape = tuple(spec.input_size)
    image_shape = tuple(int(s) for s in image_shape)
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(teacher(torch.zeros(2, *image_shape, device=device)).shape[-1])
    return num_classes, image_shape


def finetune(student: nn.Module, teacher: nn.Module, config: QATConfig | None = None, *, num_classes: int | None = None,
             image_shape=None, checkpoint_dir: str | None = None, resume: bool = True,
             replay: torch.Tensor | None = None,
             on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None) -> nn.Module:
    """Fine-tune the calibrated fake-quant ``student`` from the float ``teacher`` on generated images.

    ``student``: from :func:`dfqkern.quantize_model` and an observer (``calibrate_activations``) or
    reconstruction (``calibrate``) start; trained in place and returned, still packable. ``teacher``:
    the float model the student was made from (left unchanged). ``checkpoint_dir``: state after every
    epoch; with ``resume`` a run with the same config, teacher and student start continues after the
    last finished epoch. ``replay``: the start's calibration images ([N, C, H, W], model input space),
    distilled on beside the generated ones when ``config.replay_weight`` > 0. ``on_epoch_end(epoch,
    student, record)`` is called after each epoch's checkpoint (``record``: that epoch's mean losses).
    The report is ``student.dfqkern_qat_report``.
    """
    cfg = config or QATConfig()
    if not isinstance(cfg, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(cfg).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if cfg.replay_weight > 0 and replay is None:
        raise ValueError("config.replay_weight > 0 needs replay images (the start's calibration set): "
                         "finetune(..., replay=images)")
    if replay is not None and (not isinstance(replay, torch.Tensor) or replay.dim() != 4 or len(replay) < 1
                               or not replay.is_floating_point()):
        raise ValueError(f"replay must be a float [N, C, H, W] tensor of images, got "
                         f"{tuple(replay.shape) if isinstance(replay, torch.Tensor) else type(replay).__name__}")
    params = prepare_student(student)
    device = _model_device(student)
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher_mode = teacher.training
    teacher.eval()
    for p, _ in teacher_flags:
        p.requires_grad_(False)
    t0 = time.time()
    view = None
    tap = None
    try:
        num_classes, image_shape = _infer_shapes(teacher, num_classes, image_shape, device)
        replay_set = _replay_set(teacher, replay, image_shape, device) if cfg.replay_weight > 0 else None
        method = method_class(cfg.method)(cfg, method_options(cfg.method, cfg.options), num_classes, image_shape)
        features = default_feature_names(student) if method.uses_features else []
        need_bn = method.needs_bn()
        if need_bn:
            from ..datagen.bn_inversion import bn_layers

            try:
                method.bn_layers = bn_layers(teacher)
            except ValueError as e:
                raise ValueError(f"{e} (set QATConfig.bns_weight=0 to train a generator without it)") from None
        method.feature_names = features
        view = _Teacher(teacher, features, need_bn)
        method.teacher, method.teacher_module = view, teacher
        tap = FeatureTap(student, features) if features else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed ^ GENERATOR_SEED_STREAM)
            generator = method.build_generator(teacher).to(device)
        latent = generator.latent_dim
        rng = torch.Generator().manual_seed(cfg.seed)
        extra = {"num_classes": num_classes, "image_shape": image_shape}
        if replay_set is not None:
            extra["replay"] = [len(replay_set[0]), round(float(replay_set[0].double().sum()), 3)]
        fingerprint = _fingerprint(cfg, teacher, student, extra)

        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr, betas=(0.5, 0.999))
        for g in opt_g.param_groups:
            g["base_lr"] = cfg.generator_lr
        opt_w = torch.optim.SGD(params.weights, lr=cfg.student_lr, momentum=cfg.momentum,
                                nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
        opt_w.param_groups[0]["base_lr"] = cfg.student_lr
        scale_groups = []
        if cfg.act_scale_lr > 0 and params.act_scales:
            scale_groups.append({"params": params.act_scales, "lr": cfg.act_scale_lr, "base_lr": cfg.act_scale_lr})
        if cfg.weight_scale_lr > 0:  # relative: Adam moves a parameter by about lr per step, whatever its size
            for s in params.weight_scales:
                lr = cfg.weight_scale_lr * s.detach().abs().mean().item()
                scale_groups.append({"params": [s], "lr": lr, "base_lr": lr})
        frozen = [s for s in params.act_scales + params.weight_scales
                  if not any(s is p for g in scale_groups for p in g["params"])]
        for s in frozen:
            s.requires_grad_(False)
        opt_s = torch.optim.Adam(scale_groups) if scale_groups else None
        optimizers = {"opt_g": opt_g, "opt_w": opt_w, **({"opt_s": opt_s} if opt_s else {})}

        start_epoch, history, resumed = 0, [], 0
        loaded = load_state(checkpoint_dir, fingerprint) if checkpoint_dir and resume else None
        if loaded is not None:
            tensors, meta = loaded
            _restore(tensors, meta, student, generator, method, optimizers, rng)
            start_epoch, history = meta["epoch"], meta["history"]
            resumed = start_epoch
        else:
            method.setup(teacher, generator, rng, device)

        for epoch in range(start_epoch, cfg.epochs):
            record = _run_epoch(epoch, cfg, method, generator, student, tap, view, params, optimizers, rng, latent,
                                device, replay_set)
            history.append(record)
            if checkpoint_dir:
                _checkpoint(checkpoint_dir, epoch + 1, fingerprint, history, student, generator, method,
                            optimizers, rng)
            if on_epoch_end is not None:
                on_epoch_end(epoch, student, record)
    finally:
        if view is not None:
            view.close()
        if tap is not None:
            tap.remove()
        for p, flag in teacher_flags:
            p.requires_grad_(flag)
        teacher.train(teacher_mode)
        freeze_student(student)
    student.dfqkern_qat_report = {"method": cfg.method, "epochs": cfg.epochs, "iters": cfg.iters,
                                  "epochs_resumed": resumed, "history": history, "seconds": round(time.time() - t0, 1),
                                  "config": cfg.to_dict()}
    # a plain attribute, not a submodule: the generator must stay out of the student's state_dict
    object.__setattr__(student, "dfqkern_qat_generator", generator)
    return student


@torch.no_grad()
def _replay_set(teacher: nn.Module, images: torch.Tensor, image_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, teacher logits), kept on the CPU; the teacher runs once per image, before any hook is set."""
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"replay images are {tuple(images.shape[1:])}, the teacher takes {tuple(image_shape)}")
    images = images.detach().float().cpu()
    logits = torch.cat([teacher(images[i:i + 128].to(device)).float().cpu() for i in range(0, len(images), 128)])
    return images, logits


def _set_lrs(optimizers: dict, factor: float) -> None:
    for opt in optimizers.values():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor


def _finite(name: str, value: torch.Tensor, step: int) -> None:
    if not math.isfinite(value.item()):
        raise FloatingPointError(f"QAT {name} loss became {value.item()} at iteration {step}; lower the learning "
                                 f"rates")


def _run_epoch(epoch, cfg, method, generator, student, tap, teacher, params, optimizers, rng, latent, device,
               replay_set=None) -> dict:
    opt_g, opt_w, opt_s = optimizers["opt_g"], optimizers["opt_w"], optimizers.get("opt_s")
    train_student = epoch >= cfg.warmup_epochs
    sums: dict[str, float] = {}
    bar = tqdm(range(cfg.iters), desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
               leave=False, mininterval=1.0)
    generator.train()
    try:
        for it in bar:
            step = epoch * cfg.iters + it
            _set_lrs(optimizers, cfg.lr_factor(step))
            batch = method.sample(cfg.batch_size, latent, rng, device)
            images = method.generate(generator, batch)
            t = teacher(images)
            g_loss, logs = method.generator_loss(batch, images, t)
            _finite("generator", g_loss, step)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            logs["g_loss"] = g_loss.item()
            if train_student:
                sb = method.student_batch(batch, images, t, rng)
                logits = student(sb.inputs)
                s_loss, s_logs = method.student_loss(sb, logits, tap.features() if tap else None)
                if replay_set is not None:  # after the method read the tap: this forward overwrites it
                    idx = torch.randint(len(replay_set[0]), (cfg.batch_size,), generator=rng)
                    r_kl = kd_kl(student(replay_set[0][idx].to(device)), replay_set[1][idx].to(device),
                                 cfg.temperature)
                    s_loss = s_loss + cfg.replay_weight * r_kl
                    s_logs["replay_kl"] = r_kl.item()
                _finite("student", s_loss, step)
                opt_w.zero_grad(set_to_none=True)
                if opt_s is not None:
                    opt_s.zero_grad(set_to_none=True)
                s_loss.backward()
                s_logs.update(method.before_student_step(student, opt_w.param_groups[0]["lr"]))
                opt_w.step()
                if opt_s is not None:
                    opt_s.step()
                keep_scales_positive(params)
                s_logs["s_loss"] = s_loss.item()
                logs.update(s_logs)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if it % 10 == 0 or it == cfg.iters - 1:
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("g_loss", "s_loss", "bns", "kl")},
                                refresh=False)
    finally:
        bar.close()
    return {"epoch": epoch + 1, **{k: round(v / cfg.iters, 6) for k, v in sums.items()}}


def _checkpoint(directory, epoch, fingerprint, history, student, generator, method, optimizers, rng) -> None:
    tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
    tensors.update({f"generator.{k}": v for k, v in generator.state_dict().items()})
    tensors.update({f"method.{k}": v for k, v in method.state_tensors().items()})
    tensors["rng"] = rng.get_state()
    opt_meta = {}
    for name, opt in optimizers.items():
        t, m = optimizer_state(opt, name)
        tensors.update(t)
        opt_meta[name] = m
    save_state(directory, epoch, tensors, {"fingerprint": fingerprint, "history": history, "optimizers": opt_meta})


def _restore(tensors, meta, student, generator, method, optimizers, rng) -> None:
    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    student.load_state_dict(part("student."))
    generator.load_state_dict(part("generator."))
    method.load_state_tensors(part("method."))
    for name, opt in optimizers.items():
        load_optimizer_state(opt, name, tensors, meta["optimizers"][name])
    rng.set_state(tensors["rng"])
