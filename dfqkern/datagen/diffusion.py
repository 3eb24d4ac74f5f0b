"""Text-to-image diffusion as a source of calibration images.

Any diffusers text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL, ...) by hub id or local
directory. diffusers is imported only inside these functions. Every image has its own seeded
``torch.Generator`` (on the CPU, so the initial noise is the same on any device), hence any image
can be regenerated alone from its :class:`~dfqkern.datagen.prompts.PromptRecord`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .config import AUTO_BATCH, DiffusionConfig
from .distributed import check_rank, dist_info, resolve_device  # noqa: F401  (dist_info: public here too)
from .prompts import PromptRecord, mixup_prompt_embeds
from .resources import DTYPES, auto_batch_size, check_precision, free_memory_bytes
from .store import to_uint8

OUTPUTS = ("uint8", "float")

# Short scheduler names -> diffusers classes (a diffusers class name is accepted as well).
SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "ddpm": "DDPMScheduler", "heun": "HeunDiscreteScheduler",
}

_TRUE = ("1", "true", "yes", "on")


class PipelineUnavailableError(RuntimeError):
    """The requested diffusion pipeline cannot be loaded (missing directory, offline, not on the hub)."""


def offline_mode() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE /
    DIFFUSERS_OFFLINE set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(s) or s.count("/") > 1 or "\\" in s


def default_device() -> torch.device:
    """CUDA when available (``cuda:LOCAL_RANK`` under torchrun / accelerate), else the CPU."""
    return resolve_device(None)


# Classic attention processors and their scaled_dot_product_attention (fused / flash) equivalents.
_SDPA = {"AttnProcessor": "AttnProcessor2_0", "AttnAddedKVProcessor": "AttnAddedKVProcessor2_0"}


def ensure_sdpa(pipeline) -> dict:
    """Attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPUs): every classic attention processor of the pipeline's models (unet,
    transformer, vae, ...) is swapped for its SDPA twin; processors without one stay. Returns the
    processor classes per model afterwards (what ``pipeline_info`` records as ``attention``)."""
    from diffusers.models import attention_processor as ap

    out = {}
    for name, comp in sorted(getattr(pipeline, "components", {}).items()):
        procs = getattr(comp, "attn_processors", None)
        if not isinstance(procs, dict) or not procs:
            continue
        if any(type(p).__name__ in _SDPA for p in procs.values()):
            comp.set_attn_processor({k: getattr(ap, _SDPA[type(p).__name__])() if type(p).__name__ in _SDPA else p
                                     for k, p in procs.items()})
        out[name] = sorted({type(p).__name__ for p in comp.attn_processors.values()})
    return out


def attention_kind(processors: dict) -> str:
    """``sdpa`` when every attention processor is an SDPA one (``*2_0``), else ``mixed`` / ``classic``."""
    names = [n for v in processors.values() for n in v]
    sdpa = [n.endswith("2_0") for n in names]
    return "sdpa" if all(sdpa) else ("mixed" if any(sdpa) else "classic")


def load_pipeline(id_or_dir: "str | Path", device: "str | torch.device | None" = None,
                  dtype: "torch.dtype | None" = None, scheduler: "str | None" = None,
                  local_files_only: "bool | None" = None, **kwargs):
    """Load a diffusers text-to-image pipeline from a hub id or a local directory.

    ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA and float32 elsewhere
    (fp16 convolutions are slow or unsupported on CPU). ``scheduler`` swaps the scheduler, by short
    name (``ddim``, ``pndm``, ``euler``, ``euler_a``, ``dpm++``, ``unipc``, ``lms``, ``ddpm``,
    ``heun``) or diffusers class name, keeping the pipeline's scheduler config.
    ``local_files_only=None`` follows the environment (``HF_HUB_OFFLINE=1`` etc.). The safety
    checker is not loaded (it blanks images; calibration images are never shown to anyone) and the
    pipeline's own progress bar is disabled: callers show one bar for the whole set.
    Extra ``kwargs`` go to ``from_pretrained`` (e.g. ``variant="fp16"``, ``revision=...``).
    """
    import diffusers
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    name = str(id_or_dir)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if local_files_only is None:
        local_files_only = offline_mode()
    path = Path(name).expanduser()
    is_dir = path.is_dir()
    if not is_dir and (path.exists() or _looks_like_path(name)):
        raise PipelineUnavailableError(
            f"diffusion pipeline {name!r}: no such directory (expected a folder written by "
            f"save_pretrained, with model_index.json, or a hub id such as 'org/model')")
    source = _source_name(name)
    try:
        index = DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    except Exception as err:  # hub / filesystem errors have many types; all mean "not available"
        hint = (" (offline mode: the model must already be in the Hugging Face cache; unset HF_HUB_OFFLINE "
                "or pass local_files_only=False to download it)" if local_files_only and not is_dir else "")
        where = "directory" if is_dir else "hub id"
        raise PipelineUnavailableError(
            f"diffusion pipeline {name!r} ({where}) is not available: {type(err).__name__}: {err}{hint}") from err
    if "safety_checker" in index:
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    dtype_kw = "dtype" if _diffusers_takes_dtype(diffusers.__version__) else "torch_dtype"
    load_kw = dict(kwargs, local_files_only=local_files_only, **{dtype_kw: dtype})
    try:
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, **load_kw)
        except ValueError as auto_err:  # a class the auto mapping does not know: load it as it is
            if "can't find" not in str(auto_err):
                raise
            pipe = DiffusionPipeline.from_pretrained(source, **load_kw)
    except (OSError, EnvironmentError) as err:
        raise PipelineUnavailableError(f"diffusion pipeline {name!r} could not be loaded: {err}") from err
    if scheduler is not None:
        pipe.scheduler = _make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ensure_sdpa(pipe)
    return pipe.to(device)


def _source_name(id_or_dir) -> str:
    """The name ``from_pretrained`` receives (and the pipeline reports as ``_name_or_path``)."""
    path = Path(str(id_or_dir)).expanduser()
    return str(path) if path.is_dir() else str(id_or_dir)


def _default_scheduler(id_or_dir, local_files_only) -> str:
    """Scheduler class named in the pipeline's model_index.json (raises if the pipeline is unavailable)."""
    from diffusers import DiffusionPipeline

    name = _source_name(id_or_dir)
    offline = offline_mode() if local_files_only is None else local_files_only
    try:
        index = DiffusionPipeline.load_config(name, local_files_only=offline)
    except Exception as err:
        raise PipelineUnavailableError(f"diffusion pipeline {str(id_or_dir)!r} is not available: "
                                       f"{type(err).__name__}: {err}") from err
    entry = index.get("scheduler")
    return str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else "unknown"


def _diffusers_takes_dtype(version: str) -> bool:
    # diffusers renamed from_pretrained(torch_dtype=) to dtype= in 0.36; both work, the old one warns.
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (0, 36)


def _make_scheduler(name: str, config):
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)} or a diffusers scheduler class "
                         f"name, got {name!r}")
    return cls.from_config(config)


def pipeline_info(pipeline) -> dict:
    """What the manifest records about the generator: source id/dir, class, diffusers version, dtype."""
    import diffusers

    cfg = getattr(pipeline, "config", {}) or {}
    name = cfg.get("_name_or_path", None) if hasattr(cfg, "get") else None
    sched = getattr(pipeline, "scheduler", None)
    procs = {name: sorted({type(p).__name__ for p in comp.attn_processors.values()})
             for name, comp in sorted(getattr(pipeline, "components", {}).items())
             if isinstance(getattr(comp, "attn_processors", None), dict) and comp.attn_processors}
    return {"id": str(name) if name else type(pipeline).__name__, "class": type(pipeline).__name__,
            "library": "diffusers", "version": diffusers.__version__,
            "scheduler": type(sched).__name__ if sched is not None else None,
            "dtype": str(getattr(pipeline, "dtype", "")).replace("torch.", ""), "attention": attention_kind(procs)}


# ----------------------------------------------------------------------------- ranks

def shard_records(records: Sequence, rank: "int | None" = None, world_size: "int | None" = None) -> list:
    """This rank's contiguous slice of ``records``; slices of all ranks are disjoint, cover every
    record and differ in length by at most one. Ranks default to :func:`dist_info`."""
    rank, world_size = check_rank(rank, world_size)
    n = len(records)
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return list(records[start:stop])


# ----------------------------------------------------------------------------- generation

def resize_center_crop(images: torch.Tensor, size: "int | tuple[int, int] | None") -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so it covers ``size`` (keeping aspect), then center-crop to it."""
    if size is None:
        return images
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if th < 1 or tw < 1:
        raise ValueError(f"output_size must be positive, got {size!r}")
    h, w = images.shape[-2:]
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            images = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                   antialias=True).clamp_(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        images = images[..., top:top + th, left:left + tw]
    return images


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    import numpy as np  # PIL list or numpy array, when a pipeline ignores output_type="pt"

    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in images])


def _check_generation_args(records, batch_size, output):
    if not all(isinstance(r, PromptRecord) for r in records):
        raise TypeError("records must be PromptRecord objects (see dfqkern.datagen.build_prompts)")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    levels = {bool(r.class_texts) for r in records}
    if len(levels) > 1:
        raise ValueError("records mix text prompts and embedding-level mixup; generate them separately")


def iter_images(pipeline, records: Sequence[PromptRecord], config: "DiffusionConfig | None" = None, *,
                batch_size: int = 4, output: str = "uint8",
                **options) -> Iterator[tuple[list[PromptRecord], torch.Tensor]]:
    """Yield ``(records_batch, images_batch)`` batch by batch (see :func:`generate_images`)."""
    cfg = DiffusionConfig.build(config, **options)
    records = list(records)
    _check_generation_args(records, batch_size, output)
    for start in range(0, len(records), int(batch_size)):
        batch = records[start:start + int(batch_size)]
        # CPU generators: identical initial noise on every device, one per image.
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) for r in batch]
        call = dict(num_inference_steps=int(cfg.steps), guidance_scale=float(cfg.guidance_scale), generator=gens,
                    output_type="pt", height=cfg.height, width=cfg.width)
        if batch[0].class_texts:
            encoder, tokenizer = getattr(pipeline, "text_encoder", None), getattr(pipeline, "tokenizer", None)
            if encoder is None or tokenizer is None or getattr(pipeline, "text_encoder_2", None) is not None:
                raise ValueError(f"embedding-level mixup needs a pipeline with one CLIP text encoder "
                                 f"(Stable Diffusion 1.x/2.x); {type(pipeline).__name__} is not supported: "
                                 f"use mixup_level='text'")
            embeds, neg = mixup_prompt_embeds(encoder, tokenizer, [r.class_texts for r in batch],
                                              [r.weights for r in batch], cfg.negative_prompt)
            dtype = getattr(pipeline, "dtype", embeds.dtype)
            call.update(prompt_embeds=embeds.to(dtype), negative_prompt_embeds=neg.to(dtype))
        else:
            call["prompt"] = [r.text for r in batch]
            if cfg.negative_prompt:
                call["negative_prompt"] = [cfg.negative_prompt] * len(batch)
        with torch.inference_mode():
            images = _as_tensor(pipeline(**call).images)
        images = resize_center_crop(images.clamp(0, 1), cfg.output_size)
        yield batch, (to_uint8(images) if output == "uint8" else images.clamp(0, 1).contiguous())


def generate_images(pipeline, records: Sequence[PromptRecord], config: "DiffusionConfig | None" = None, *,
                    batch_size: int = 4, output: str = "uint8", progress: bool = False, **options) -> torch.Tensor:
    """Generate one image per record: ``[N, 3, H, W]`` uint8 (``output="uint8"``) or float in [0, 1].

    Sampling follows ``config`` (a :class:`~dfqkern.datagen.config.DiffusionConfig`; its prompt
    fields are unused here: the records are the prompts), with any of its fields given as keywords
    (``steps=2``) replacing its values. Records with ``class_texts`` use embedding-level mixup
    (prompt_embeds).
    """
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(records), desc="diffusion", unit="img", disable=not progress) as bar:
        for _, images in iter_images(pipeline, records, config, batch_size=batch_size, output=output, **options):
            out.append(images)
            bar.update(len(images))
    if not out:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8 if output == "uint8" else torch.float32)
    return torch.cat(out)


# ----------------------------------------------------------------------------- synthetic set

def generate_diffusion_set(out_dir: "str | Path", pipeline, config: "DiffusionConfig | None" = None, *,
                           classes="imagenet", num_images: int = 1000, batch_size: int = 4, shard_size: int = 256,
                           scheduler: "str | None" = None, device: "str | torch.device | None" = None,
                           dtype: "torch.dtype | None" = None, local_files_only: "bool | None" = None,
                           overwrite: bool = False, progress: bool = True, rank: "int | None" = None,
                           world_size: "int | None" = None, precision: "str | None" = None, **options) -> Path:
    """Generate (or resume) a text-to-image synthetic set in ``out_dir``; returns ``out_dir``.

    ``pipeline``: a hub id or directory (loaded with :func:`load_pipeline` only if images are
    missing) or an already loaded pipeline. The prompt and sampling options are ``config`` with any
    :class:`~dfqkern.datagen.config.DiffusionConfig` field given as a keyword replacing its value;
    ``config.to_dict()`` is recorded in the manifest. Prompts come from
    :func:`~dfqkern.datagen.prompts.build_prompts`. Finished shards and images already on disk are
    skipped; with several ranks (torch.distributed, accelerate or RANK/WORLD_SIZE) each rank fills
    its own shards and the manifest is written once all are finished. Open the result with
    :func:`~dfqkern.datagen.store.load_synthetic`. ``batch_size`` and ``device`` do not enter the
    resume check (they do not change what is asked for, only how fast it is made).

    ``precision`` (``fp32`` / ``bf16`` / ``fp16``, fp16 on CUDA only) is the pipeline's dtype when it
    is loaded here (default: fp16 on CUDA, fp32 elsewhere; ``dtype`` is the same as a torch dtype).
    ``batch_size="auto"``: on CUDA the largest batch that fits the free memory, from the peak memory
    of one probe image at one step (:func:`auto_diffusion_batch_size`); on the CPU the default 4.
    Attention runs through SDPA (:func:`ensure_sdpa`). ``device``: a bare ``cuda`` is ``cuda:LOCAL_RANK``.
    """
    from .prompts import CLASS_SETS, build_prompts, class_names as _class_names
    from .store import SyntheticSetWriter, fill_set

    import diffusers

    cfg = DiffusionConfig.build(config, **options)
    rank, world_size = check_rank(rank, world_size)
    names = _class_names(classes)
    records = build_prompts(names, num_images, cfg.prompt_mode, mixup_k=cfg.mixup_k, mixup_level=cfg.mixup_level,
                            weights=cfg.weights, dirichlet_alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    auto = batch_size == AUTO_BATCH
    _check_generation_args(records, 1 if auto else batch_size, "uint8")
    loaded = not isinstance(pipeline, (str, Path))
    dev = resolve_device(device) if device is not None else (
        getattr(pipeline, "device", None) if loaded else None) or default_device()
    if precision is not None:
        check_precision(precision, dev)
        if dtype is not None and dtype != DTYPES[precision]:
            raise ValueError(f"precision {precision!r} and dtype {dtype} disagree; give one")
        dtype = DTYPES[precision]
    if loaded:
        for name, value in (("scheduler", scheduler), ("dtype", dtype), ("local_files_only", local_files_only)):
            if value is not None:
                raise ValueError(f"{name} applies when the pipeline is loaded by id or directory; a loaded "
                                 f"pipeline is used as it is (set it up before passing it)")
        info = pipeline_info(pipeline)
        pipe_id, sched_name, dtype_name = info["id"], info["scheduler"], info["dtype"]
    else:
        # Record what the loaded pipeline will report, so a run started from an id and resumed with
        # the loaded pipeline (or the other way round) has the same config.
        pipe_id = _source_name(pipeline)
        sched_name = SCHEDULERS.get(scheduler.lower(), scheduler) if scheduler else _default_scheduler(
            pipeline, local_files_only)
        resolved = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        dtype_name = str(resolved).replace("torch.", "")
    record = {"source": "diffusion", "pipeline": pipe_id, "scheduler": sched_name, "dtype": dtype_name,
              # a named class set, or "custom" (the names themselves are in the manifest and the plan)
              "classes": str(classes).lower() if str(classes).lower() in CLASS_SETS else "custom",
              "num_images": num_images, **cfg.to_dict()}
    entries = []
    for r in records:
        e = {"prompt": r.text, "classes": list(r.classes), "class_names": [names[c] for c in r.classes],
             "weights": list(r.weights), "template": r.template, "seed": r.seed, "mode": r.mode}
        if r.class_texts:
            e["class_texts"] = list(r.class_texts)
        entries.append(e)
    meta = {"source": "diffusion", "generator": {"id": pipe_id, "library": "diffusers",
                                                 "version": diffusers.__version__},
            "class_names": names, "num_classes": len(names), "label_type": "soft"}
    writer = SyntheticSetWriter(out_dir, entries=entries, config=record, meta=meta, channels=3,
                                shard_size=shard_size, overwrite=overwrite)
    state = {"pipe": pipeline if loaded else None}

    def produce(indices):
        if state["pipe"] is None:  # load only when some image is actually missing
            state["pipe"] = load_pipeline(pipeline, dev, dtype, scheduler, local_files_only)
        if "batch" not in state:
            state["batch"] = auto_diffusion_batch_size(state["pipe"], records[0], cfg)[0] if auto else batch_size
            writer.meta["generator"]["attention"] = attention_kind(ensure_sdpa(state["pipe"]))
        for batch, images in iter_images(state["pipe"], [records[i] for i in indices], cfg, batch_size=state["batch"]):
            yield [r.index for r in batch], images

    fill_set(writer, produce, rank=rank, world_size=world_size, progress=progress, desc="diffusion set")
    return Path(out_dir)


def auto_diffusion_batch_size(pipeline, record: PromptRecord, config: DiffusionConfig,
                              free_bytes: "int | None" = None) -> tuple[int, str]:
    """``(batch size, why)`` for ``batch_size="auto"``: on CUDA, the peak memory of one image of
    ``record`` sampled for one step is measured and :func:`~dfqkern.datagen.resources.auto_batch_size`
    fits the free memory with it; elsewhere the default 4 (see the module :mod:`~dfqkern.datagen.resources`)."""
    import inspect

    default = inspect.signature(generate_diffusion_set).parameters["batch_size"].default
    device = torch.device(getattr(pipeline, "device", "cpu"))
    if device.type != "cuda":
        return default, "auto: the CPU default"
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    next(iter_images(pipeline, [record], dataclasses.replace(config, steps=1), batch_size=1))
    per_image = max(1, torch.cuda.max_memory_allocated(device) - base)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return auto_batch_size(free, per_image), f"auto: {per_image / 2**20:.1f} MiB per image measured"


@dataclasses.dataclass(frozen=True)
class DiffusionPlan:
    """What :func:`generate_diffusion_set` would do (``dfqkern generate --dry-run``): whole shards
    dealt round-robin to ``world_size`` ranks, ``batch_size`` images per pipeline call at ``dtype``;
    ``weights_bytes`` the size of a local pipeline's weight files (None: a hub id, not looked up)."""
    num_images: int
    shard_size: int
    batch_size: "int | str"
    dtype: str
    device: str
    world_size: int
    weights_bytes: "int | None"

    def rank_shards(self) -> list[list[int]]:
        shards = -(-self.num_images // self.shard_size)
        return [list(range(r, shards, self.world_size)) for r in range(self.world_size)]

    def rank_images(self) -> list[int]:
        size = lambda s: min(self.shard_size, self.num_images - s * self.shard_size)  # noqa: E731
        return [sum(size(s) for s in shards) for shards in self.rank_shards()]

    def describe(self) -> str:
        batch = ("auto (measured on CUDA from one probe image; 4 on the CPU)" if self.batch_size == AUTO_BATCH
                 else self.batch_size)
        parts = ", ".join(f"rank {r}: {n} images in {len(sh)} shard(s)"
                          for r, (n, sh) in enumerate(zip(self.rank_images(), self.rank_shards())))
        weights = ("unknown (hub id)" if self.weights_bytes is None
                   else f"{self.weights_bytes / 2**20:.1f} MiB of weight files")
        return (f"diffusion: {self.num_images} images in {-(-self.num_images // self.shard_size)} shard(s) of up to "
                f"{self.shard_size}; batch size {batch}; {self.dtype} on {self.device}, SDPA attention; "
                f"{self.world_size} rank(s), whole shards round-robin: {parts}; memory: {weights} per rank plus "
                f"the activations of one batch")


def plan_diffusion(pipeline, *, num_images: int, device: "str | torch.device | None" = None,
                   batch_size: "int | str" = 4, shard_size: int = 256, precision: "str | None" = None,
                   world_size: "int | None" = None, **options) -> DiffusionPlan:
    """The plan of :func:`generate_diffusion_set` with these arguments, without loading the pipeline
    (options are checked as :class:`~dfqkern.datagen.config.DiffusionConfig` fields / ``classes``)."""
    options.pop("classes", None)
    DiffusionConfig.build(**options)
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    _, world = check_rank(0, world_size) if world_size is not None else check_rank(None, None)
    dev = resolve_device(device)
    if precision is not None:
        check_precision(precision, dev)
    dtype = precision or ("fp16" if dev.type == "cuda" else "fp32")
    path = Path(str(pipeline)).expanduser()
    weights = None
    if path.is_dir():
        weights = sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt"))
    return DiffusionPlan(num_images, shard_size, batch_size, dtype, str(dev), world, weights)


def records_from_manifest(manifest: dict) -> list[PromptRecord]:
    """The prompt records of a diffusion set, rebuilt from its manifest entries."""
    if manifest.get("source") != "diffusion":
        raise ValueError(f"not a diffusion set (source={manifest.get('source')!r})")
    return [PromptRecord(index=int(e["index"]), text=e["prompt"], classes=tuple(e["classes"]),
                         weights=tuple(e["weights"]), template=int(e["template"]), seed=int(e["seed"]),
                         mode=e.get("mode", "single"), class_texts=tuple(e.get("class_texts", ())))
            for e in manifest["images"]]


def regenerate_images(pipeline, synthetic_set, indices: Sequence[int], *, batch_size: int = 1) -> torch.Tensor:
    """Regenerate images of a finished diffusion set from its manifest (prompt, seed, settings).

    Returns uint8 ``[n, 3, H, W]``. With the batch composition of the original run (e.g.
    ``batch_size=1`` for a set made with ``batch_size=1``) the result is bit-identical; otherwise
    batched floating-point arithmetic may move isolated pixels by one 8-bit level.
    """
    from .store import SyntheticSet

    ds = synthetic_set if isinstance(synthetic_set, SyntheticSet) else SyntheticSet(synthetic_set, verify=False)
    records = records_from_manifest(ds.manifest)
    cfg = DiffusionConfig.from_dict(ds.manifest["config"])
    return generate_images(pipeline, [records[int(i)] for i in indices], cfg, batch_size=batch_size, output="uint8")
