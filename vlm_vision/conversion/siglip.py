"""--from siglip and --from siglip2: transformers SiglipVisionModel (also the fixed-resolution SigLIP2
checkpoints) and Siglip2VisionModel (NaFlex: a linear patch embedding over pre-cut patches, a square position
table resized to every image's grid), or the vision tower of a composite folder."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers.image_utils import (
    PILImageResampling,
)

from ..encoder.configuration_vit import VisionTransformerConfig
from .clip import _VM, CLIP_LAYOUTS, CLIP_RULES, NOT_THE_VISION_TOWER
from .engine import _common_fields, _detect, _Plan, _transformer_fields, _transformers_vision_config
from .preprocessing import PREPROCESSOR_CONFIG
from .reading import _read_json


def _convert_siglip(source, folder, overrides):
    from transformers import SiglipConfig, SiglipVisionConfig

    cfg = _transformers_vision_config(folder, SiglipVisionConfig, SiglipConfig, "siglip")
    _detect(source, CLIP_LAYOUTS, "siglip")
    if any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have a class_embedding: a CLIP tower? Use --from clip.")
    if any(k.endswith("embeddings.patch_embedding.weight") and v.dim() == 2 for k, v in source.items()):
        raise ValueError("These weights embed patches with a linear layer: a SigLIP2 NaFlex tower? Use --from siglip2.")
    has_head = any(k.endswith("head.probe") for k in source)
    # SigLIP: no [CLS] (num_prefix_tokens = 0: a VLM keeps every token), post_layernorm on every token, then the
    # attention-pooling head. Without the head (vision_use_head=False) pooler_output is the mean of the tokens,
    # which has no weights and which the source does not define.
    fields = {**_common_fields(cfg), "use_class_token": False, "pooling": "map" if has_head else "mean"}
    notes = ["SigLIP vision tower (transformers SiglipVisionModel); no [CLS] token."]
    return _Plan(fields, CLIP_RULES, NOT_THE_VISION_TOWER, notes, source)


def _convert_siglip2(source, folder, overrides):
    from transformers import Siglip2Config, Siglip2VisionConfig

    cfg = _transformers_vision_config(folder, Siglip2VisionConfig, Siglip2Config, "siglip2")
    _detect(source, CLIP_LAYOUTS, "siglip2")
    if any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have a class_embedding: a CLIP tower? Use --from clip.")
    patch = next((v for k, v in source.items() if k.endswith("embeddings.patch_embedding.weight")), None)
    if patch is not None and patch.dim() != 2:
        raise ValueError("These weights embed patches with a convolution: a SigLIP tower? Use --from siglip.")
    side = math.isqrt(cfg.num_patches)
    if side * side != cfg.num_patches:
        raise ValueError(
            f"The source config's num_patches={cfg.num_patches} is not a square: Siglip2VisionModel reshapes its "
            "position table to a square grid, so this config.json does not belong to a Siglip2 tower."
        )
    size, channels, dim = cfg.patch_size, cfg.num_channels, cfg.hidden_size

    def patch_kernel(t: torch.Tensor) -> torch.Tensor:
        # nn.Linear over a patch flattened (P, P, C) -> the same map as a Conv2d kernel (D, C, P, P)
        return t.reshape(dim, size, size, channels).permute(0, 3, 1, 2)

    rules = [
        (_VM + r"embeddings\.patch_embedding\.weight", "embeddings.patch_embeddings.projection.weight", patch_kernel),
        *CLIP_RULES,
    ]
    has_head = any(k.endswith("head.probe") for k in source)
    fields = {
        **_transformer_fields(cfg),
        "image_size": side * size,  # the table's grid, side x side
        "patch_size": size,
        "num_channels": channels,
        "use_class_token": False,
        "pooling": "map" if has_head else "mean",
    }
    notes = [
        f"SigLIP2 NaFlex vision tower (transformers Siglip2VisionModel); no [CLS] token; a {side}x{side} position "
        "table resized to each image's grid (antialiased bilinear, `interpolation_mode='triangle'`). It takes the "
        "native-resolution form: pixel_values (B, N, C*P*P), pixel_attention_mask, spatial_shapes."
    ]
    return _Plan(fields, rules, NOT_THE_VISION_TOWER, notes, source)


def _siglip2_image_processor(folder: Path | None, config: VisionTransformerConfig):
    """Our processor in native-resolution mode with the source's settings (its preprocessor_config.json, else
    Siglip2ImageProcessor's defaults: bilinear, mean = std = 0.5, max_num_patches = the table's size)."""
    from ..encoder.image_processing_vit import VisionTransformerImageProcessor

    settings = {
        "patch_size": config.patch_size_hw[0],
        "max_num_patches": config.num_patches,
        "resample": PILImageResampling.BILINEAR,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    saved = (_read_json(folder, PREPROCESSOR_CONFIG) if folder is not None else None) or {}
    keys = ("patch_size", "max_num_patches", "resample", "image_mean", "image_std", "rescale_factor")
    keys += ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
    settings.update({k: saved[k] for k in keys if saved.get(k) is not None})
    if settings["patch_size"] != config.patch_size_hw[0]:
        raise ValueError(
            f"The source's {PREPROCESSOR_CONFIG} cuts patches of {settings['patch_size']} pixels but its model's "
            f"patch_size is {config.patch_size}: fix that file (or remove it for Siglip2's defaults)."
        )
    return VisionTransformerImageProcessor(**settings)
