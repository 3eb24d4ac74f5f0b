"""Synthetic calibration data: diffusion prompts (single / GenQ / mixup-class), BN-statistics
inversion (ZeroQ / Genie / HAST / DGH), filters, and on-disk synthetic sets. The generators'
options are :class:`BNInversionConfig` and :class:`DiffusionConfig`.

Layer rule: this package imports neither ``dfqkern.kernels`` nor ``dfqkern.nn``; diffusers,
transformers and timm are imported inside the functions that need them.
"""
from .bn_inversion import (InversionResult, bn_statistics_loss, generate_bn_inversion_set, invert_bn,
                           make_targets)
from .config import BNInversionConfig, DiffusionConfig
from .diffusion import (PipelineUnavailableError, dist_info, generate_diffusion_set, generate_images,
                        load_pipeline, pipeline_info, records_from_manifest, regenerate_images,
                        resize_center_crop, shard_records)
from .filters import (bn_sensitivity_filter, bn_sensitivity_scores, energy_filter, energy_scores,
                      select_lowest)
from .prompts import (PromptRecord, balanced_class_groups, build_prompts, class_names, encode_text,
                      image_seed, interpolate_embeddings, mixup_prompt_embeds)
from .store import SyntheticSet, SyntheticSetError, SyntheticSetWriter, load_synthetic

__all__ = [
    "BNInversionConfig", "DiffusionConfig",
    "InversionResult", "bn_statistics_loss", "generate_bn_inversion_set", "invert_bn", "make_targets",
    "PipelineUnavailableError", "dist_info", "generate_diffusion_set", "generate_images", "load_pipeline",
    "pipeline_info", "records_from_manifest", "regenerate_images", "resize_center_crop", "shard_records",
    "bn_sensitivity_filter", "bn_sensitivity_scores", "energy_filter", "energy_scores", "select_lowest",
    "PromptRecord", "balanced_class_groups", "build_prompts", "class_names", "encode_text", "image_seed",
    "interpolate_embeddings", "mixup_prompt_embeds",
    "SyntheticSet", "SyntheticSetError", "SyntheticSetWriter", "load_synthetic",
]
