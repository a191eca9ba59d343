"""Vision towers from local folders saved by transformers (CLIP, SigLIP, SigLIP2, DINOv2, ViT) or by us, with their
own image processors: what a VLM recipe's `vision: {"path": ...}` and `--vision PATH` load.

    tower, image_processor = load_vision_tower("./clip-vit-large-patch14-336")

- The family is read from the folder's `config.json` (`model_type`). A whole dual-encoder folder (`CLIPModel`,
  `SiglipModel`, `Siglip2Model`) gives its vision tower; the text tower is left out.
- Where a converter exists (:mod:`vlm_vision.conversion`), the weights are converted in memory into our
  `VisionTransformerModel`, exactly as `vlm-vision-convert` does (strict: every key used, numerical parity tested),
  so the VLM runs only the blocks its feature layer needs; `convert=False` keeps transformers' own class. Either way
  the hidden size, patch grid and prefix tokens come from the tower's config.
- The image processor is the one saved with the tower (`preprocessor_config.json` through `AutoImageProcessor`:
  CLIP's shortest-edge resize + centre crop and its mean/std, SigLIP's resize and 0.5/0.5, DINOv2's ImageNet
  statistics, SigLIP2 NaFlex's `Siglip2ImageProcessor`: patch budget, aspect-preserving resize). A folder without
  one is refused unless `image_processor` names a folder that has one.
- SigLIP2 NaFlex (`siglip2`, `siglip2_vision_model`) takes patchified images with a patch mask and per-image grids:
  the VLM's `image_mode="native"` (`vlm_vision.training.vlm_parts.mode_image_processor` turns the folder's
  `Siglip2ImageProcessor` into ours with the same settings). Fixed-resolution SigLIP2 checkpoints are `siglip`
  folders and load as SigLIP.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# model_type in config.json -> (converter source format or None, transformers class of the vision tower)
TOWER_FAMILIES = {
    "vlm_vit": (None, None),
    "vit": ("hf", "ViTModel"),
    "clip": ("clip", "CLIPVisionModel"),
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "siglip": ("siglip", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "siglip2": ("siglip2", "Siglip2VisionModel"),
    "siglip2_vision_model": ("siglip2", "Siglip2VisionModel"),
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """`"bfloat16"` (or a torch dtype, or None) -> the torch dtype, with an error naming the choices."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{what} dtype={dtype!r}; choose one of {sorted(DTYPES)} (or leave it unset for float32).")
    return DTYPES[dtype]


def tower_family(path: str | os.PathLike) -> str:
    """The `model_type` of the tower folder at `path`, checked to be one this package can load."""
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"Vision tower folder {path} does not exist: give a folder saved by transformers.")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} has no config.json: a vision tower is a folder saved by transformers' save_pretrained."
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}): check the file is complete.") from error
    if model_type not in TOWER_FAMILIES:
        raise ValueError(
            f"{path}: vision towers of type {model_type!r} are not supported. Supported: "
            f"{sorted(TOWER_FAMILIES)} (CLIP, SigLIP, SigLIP2, DINOv2, transformers ViT and vlm-vision folders)."
        )
    return model_type


def load_vision_tower(
    path: str | os.PathLike,
    *,
    image_processor: str | os.PathLike | None = None,
    convert: bool = True,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, object]:
    """The vision tower saved in the folder `path` and its image processor.

    Args:
        path: a folder saved by transformers (a `CLIPModel`/`CLIPVisionModel`, `SiglipModel`/`SiglipVisionModel`,
            `Siglip2Model`/`Siglip2VisionModel` (NaFlex), `Dinov2Model`, `ViTModel`) or a vlm-vision encoder folder.
        image_processor: a folder whose `preprocessor_config.json` to use instead of the tower's own (needed when
            the tower folder has none).
        convert: load into our `VisionTransformerModel` where a converter exists (exact; the VLM then runs only
            the blocks up to its feature layer); False keeps transformers' own vision class.
        dtype: "float32" (default), "bfloat16" or "float16".
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ...

    Returns:
        (tower, image_processor): the tower in eval mode, and the image processor (PIL backend where torchvision is
        not installed).
    """
    from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel

    model_type = tower_family(path)
    torch_dtype = resolve_dtype(dtype, "vision")
    source_format, transformers_class = TOWER_FAMILIES[model_type]
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if model_type == "vlm_vit":
        tower = VisionTransformerModel.from_pretrained(path, **kwargs)
    elif convert and source_format is not None:
        from ..conversion import convert_checkpoint

        tower = convert_checkpoint(source_format, path).model
        if isinstance(tower, VisionTransformerForImageClassification):
            tower = tower.vit  # a classifier's head plays no part in a VLM
        if attn_implementation:
            tower.set_attn_implementation(attn_implementation)
        logger.info("converted %s (%s) into VisionTransformerModel in memory", path, model_type)
    else:
        import transformers

        tower = getattr(transformers, transformers_class).from_pretrained(path, **kwargs)
    if torch_dtype is not None:
        tower = tower.to(torch_dtype)
    return tower.eval(), load_image_processor(path, image_processor)


def load_image_processor(tower_path: str | os.PathLike, override: str | os.PathLike | None = None):
    """The image processor saved with a tower (or in the `override` folder), refused when there is none."""
    folder = Path(override) if override is not None else Path(tower_path)
    if not (folder / "preprocessor_config.json").is_file():
        if override is not None:
            raise FileNotFoundError(f"--image-processor {override} has no preprocessor_config.json.")
        raise FileNotFoundError(
            f"The vision tower folder {tower_path} has no preprocessor_config.json, so how its images were resized "
            "and normalised is unknown (guessing would feed the tower images unlike its training data). Pass "
            "--image-processor FOLDER (vision.image_processor in a recipe): a folder with the tower's "
            "preprocessor_config.json, e.g. the original Hub folder's."
        )
    from ..export.encoder_folder import load_image_processor as load_saved_processor

    return load_saved_processor(folder)  # AutoImageProcessor, with RGB conversion for folders that predate it


__all__ = ["TOWER_FAMILIES", "load_image_processor", "load_vision_tower", "resolve_dtype", "tower_family"]
