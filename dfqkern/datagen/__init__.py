"""Synthetic calibration data: diffusion prompts (single / GenQ / mixup-class), BN-statistics
inversion (ZeroQ / Genie / HAST / DGH), GenQ filters, and on-disk synthetic sets. The generators'
options are :class:`BNInversionConfig` and :class:`DiffusionConfig`.

Layer rule: this package imports neither ``dfqkern.kernels`` nor ``dfqkern.nn``; diffusers,
transformers and timm are imported inside the functions that need them.
"""
from .bn_inversion import (InversionResult, ShardPlan, bn_statistics_loss, generate_bn_inversion_set, invert_bn,
                           make_targets, plan_shards, resolve_batch_size)
from .config import BNInversionConfig, DiffusionConfig, FilterStep, parse_filters, pool_size
from .diffusion import (PipelineUnavailableError, dist_info, generate_diffusion_set, generate_images,
                        load_pipeline, pipeline_info, records_from_manifest, regenerate_images,
                        resize_center_crop, shard_records)
from .distributed import init_from_env, resolve_device
from .filters import (bn_deviation_filter, bn_deviation_scores, bn_sensitivity_filter, bn_sensitivity_scores,
                      energy_filter, energy_scores, filter_synthetic_set, select_lowest)
from .prompts import (PromptRecord, balanced_class_groups, build_prompts, class_names, encode_text,
                      image_seed, interpolate_embeddings, mixup_prompt_embeds)
from .resources import auto_batch_size
from .store import SyntheticSet, SyntheticSetError, SyntheticSetWriter, load_synthetic

__all__ = [
    "BNInversionConfig", "DiffusionConfig", "FilterStep", "parse_filters", "pool_size",
    "InversionResult", "ShardPlan", "bn_statistics_loss", "generate_bn_inversion_set", "invert_bn",
    "make_targets", "plan_shards", "resolve_batch_size", "auto_batch_size", "init_from_env", "resolve_device",
    "PipelineUnavailableError", "dist_info", "generate_diffusion_set", "generate_images", "load_pipeline",
    "pipeline_info", "records_from_manifest", "regenerate_images", "resize_center_crop", "shard_records",
    "bn_deviation_filter", "bn_deviation_scores", "bn_sensitivity_filter", "bn_sensitivity_scores", "energy_filter",
    "energy_scores", "filter_synthetic_set", "select_lowest",
    "PromptRecord", "balanced_class_groups", "build_prompts", "class_names", "encode_text", "image_seed",
    "interpolate_embeddings", "mixup_prompt_embeds",
    "SyntheticSet", "SyntheticSetError", "SyntheticSetWriter", "load_synthetic",
]
