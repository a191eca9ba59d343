"""The image processor a converted folder carries: the source's own (its `preprocessor_config.json`), or its
family's defaults (`DEFAULT_IMAGE_PROCESSORS`), sized for the model; and how each source resamples position
embeddings (`INTERPOLATION`)."""

from __future__ import annotations

import math
from pathlib import Path

from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
    SizeDict,
)
from transformers.utils import IMAGE_PROCESSOR_NAME

from .reading import _read_json


# The image processor of each source whose folder has no preprocessor_config.json, at the model's (H, W) `size`: the
# family's transformers class with its published defaults (openai/clip-*, google/siglip-*, facebook/dinov2-*: resize
# the shortest edge to 256 and crop 224, ImageNet mean/std), scaled to other sizes like timm's crop_pct (224 / 256).
def _clip_processor(size: tuple[int, int]):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": max(size)}, crop_size={"height": size[0], "width": size[1]})


def _siglip_processor(size: tuple[int, int]):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size[0], "width": size[1]})


def _dinov2_processor(size: tuple[int, int]):
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": math.floor(max(size) * 256 / 224)},
        crop_size={"height": size[0], "width": size[1]},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def _vit_processor(size: tuple[int, int]):  # transformers' ViT, and the JAX reference: resize, x / 127.5 - 1
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size[0], "width": size[1]}, do_convert_rgb=True)


DEFAULT_IMAGE_PROCESSORS = {
    "hf": _vit_processor,
    "clip": _clip_processor,
    "siglip": _siglip_processor,
    "dinov2": _dinov2_processor,
    "npz": _vit_processor,
}
# timm's vision_transformer `_cfg`, for a state dict without a pretrained_cfg
TIMM_DEFAULT_CFG = {
    "mean": IMAGENET_STANDARD_MEAN,
    "std": IMAGENET_STANDARD_STD,
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
}
# transformers sources whose own image processor the converted folder keeps
PROCESSOR_SOURCES = ("hf", "clip", "siglip", "dinov2")
FAMILY_IMAGE_PROCESSORS = {
    "hf": "ViTImageProcessorPil",
    "clip": "CLIPImageProcessorPil",
    "siglip": "SiglipImageProcessorPil",
    "dinov2": "BitImageProcessorPil",
}
PREPROCESSOR_CONFIG = IMAGE_PROCESSOR_NAME  # transformers' "preprocessor_config.json"

# How each source resamples position embeddings to another grid (run time and `image_size=`): (mode, antialias).
# transformers' ViT/CLIP/SigLIP/DINOv2 interpolate bicubic without antialias; timm's `resample_abs_pos_embed` uses
# bicubic with antialias; big_vision's `resample_posemb` uses `jax.image.resize(..., "bilinear")`, which antialiases
# when down-sampling. (The original DINOv2 repository interpolates with a +0.1 offset in the scale factor; at the
# native size nothing is interpolated, so parity is exact there, and at other sizes we follow transformers' DINOv2.)
INTERPOLATION = {
    "hf": ("bicubic", False),
    "clip": ("bicubic", False),
    "siglip": ("bicubic", False),
    # Siglip2VisionEmbeddings.resize_positional_embeddings: antialiased bilinear as explicit separable weights, for
    # every image (also at the table's own grid, where they are the identity). "triangle" is that computation;
    # F.interpolate(bilinear, antialias=True) has the same weights but was seen to go wrong on one-column grids.
    "siglip2": ("triangle", False),
    "dinov2": ("bicubic", False),
    "timm": ("bicubic", True),
    "npz": ("bilinear", True),
}


def _source_image_processor(source_format: str, folder: Path | None):
    """The source folder's own image processor (transformers sources with a preprocessor_config.json), or None."""
    if source_format not in PROCESSOR_SOURCES or folder is None or not (folder / PREPROCESSOR_CONFIG).is_file():
        return None
    import transformers

    saved = _read_json(folder, PREPROCESSOR_CONFIG)  # an empty or truncated file is named
    try:
        if saved.get("image_processor_type") or saved.get("feature_extractor_type"):
            return transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
        # no class named (transformers' vision-only towers have no image processor mapping): the family's
        return getattr(transformers, FAMILY_IMAGE_PROCESSORS[source_format]).from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Cannot load the source's image processor {folder / PREPROCESSOR_CONFIG} ({str(error)[:300]}): fix that "
            f"file, or remove it to use the {source_format} family's default preprocessing."
        ) from error


def _timm_image_processor(folder: Path | None, size: tuple[int, int]):
    """timm's eval transform from the folder's `pretrained_cfg` (else its ViT `_cfg`): resize to size / crop_pct
    (the shortest edge, or both sides with crop_mode 'squash'), centre-crop `size`, normalise."""
    from transformers import ViTImageProcessorPil

    config_json = (_read_json(folder, "config.json") if folder is not None else None) or {}
    pretrained = config_json.get("pretrained_cfg") or {} if "architecture" in config_json else {}
    cfg = {**TIMM_DEFAULT_CFG, **{k: v for k, v in pretrained.items() if v is not None}}
    crop_pct = float(cfg["crop_pct"])
    interpolation = str(cfg["interpolation"]).upper()
    resample = PILImageResampling[interpolation] if interpolation in PILImageResampling.__members__ else None
    if cfg["crop_mode"] == "squash":
        resize = {"height": math.floor(size[0] / crop_pct), "width": math.floor(size[1] / crop_pct)}
    else:  # "center" (timm's default); "border" pads instead of cropping, which this processor does not do
        resize = {"shortest_edge": math.floor(max(size) / crop_pct)}
    return ViTImageProcessorPil(
        size=resize,
        do_center_crop=True,
        crop_size={"height": size[0], "width": size[1]},
        resample=resample or PILImageResampling.BICUBIC,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
        do_convert_rgb=True,
    )


def _processor_output_size(processor) -> tuple[int, int] | None:
    """(H, W) of what `processor` produces: its crop, else a fixed resize; None when it depends on the image."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None and crop.height and crop.width:
        return crop.height, crop.width
    size = getattr(processor, "size", None)
    if size is not None and size.height and size.width:
        return size.height, size.width
    return None


def _fit_image_processor(processor, size: tuple[int, int]) -> None:
    """Make `processor` produce `size`, scaling its resize by the same factor as its crop."""
    old = _processor_output_size(processor)
    resize = processor.size
    if getattr(processor, "do_center_crop", False) and old is not None:
        if resize.shortest_edge:
            processor.size = SizeDict(shortest_edge=round(resize.shortest_edge * max(size) / max(old)))
        elif resize.height and resize.width:
            processor.size = SizeDict(
                height=round(resize.height * size[0] / old[0]), width=round(resize.width * size[1] / old[1])
            )
        processor.crop_size = SizeDict(height=size[0], width=size[1])
    else:
        processor.size = SizeDict(height=size[0], width=size[1])


def _describe(processor) -> str:
    if getattr(processor, "max_num_patches", None) is not None:
        resample = PILImageResampling(processor.resample).name.lower()
        return (
            f"`{type(processor).__name__}` in native-resolution mode: aspect-preserving resize ({resample}) to at most "
            f"{processor.max_num_patches} patches of {processor.patch_size} pixels, mean "
            f"{[round(v, 4) for v in processor.image_mean]}, std {[round(v, 4) for v in processor.image_std]}"
        )
    size = {k: v for k, v in dict(processor.size).items() if v is not None}
    crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    resample = PILImageResampling(processor.resample).name.lower()
    return (
        f"`{type(processor).__name__}`: resize to {size} ({resample})"
        + (f", centre crop { ({k: v for k, v in crop.items() if v is not None}) }" if crop else "")
        + f", mean {[round(v, 4) for v in processor.image_mean]}, std {[round(v, 4) for v in processor.image_std]}"
    )
