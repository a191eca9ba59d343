"""Interop with transformers' LLaVA: export a VLM with the `mlp` adapter to a `LlavaForConditionalGeneration` folder.

Our encoder also works directly as the `vision_config` of a `LlavaConfig` (LLaVA builds its tower with
`AutoModel.from_config`, which finds our registered class after `import vlm_vision`; LLaVA's `save_pretrained`
doesn't copy the tower's code, so loaders import the package first).

What LLaVA's processor can express is one fixed-size image per `<image>` tag, each the same number of tokens: our
`image_mode="fixed"`, with `image_aspect_ratio="squash"` (the tower's image processor as it is) or `"pad"`
(transformers' `LlavaImageProcessor(do_pad=True)`: the same `int(255 * mean)` background, centred the same way,
before the same resize/crop/normalisation). `"native"` and `"tiles"`, and towers that take only patchified images
(SigLIP2 NaFlex), are refused: ship the VLM folder itself for those.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_processing_backends import PilBackend, TorchvisionBackend

from ..encoder.image_processing_vit import VisionTransformerImageProcessor
from .configuration_vlm import NAFLEX_VISION_MODEL_TYPES
from .modeling_vlm import VisionLanguageForConditionalGeneration

logger = logging.getLogger(__name__)


USE_THE_VLM_FOLDER = (
    "or ship the VLM folder itself (model.save_pretrained(folder) and processor.save_pretrained(folder); it loads "
    "with AutoModelForImageTextToText and AutoProcessor)"
)
# the settings of a tower's image processor that `LlavaImageProcessor` takes over as they are
LLAVA_IMAGE_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "default_to_square",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def check_llava_image_mode(model: VisionLanguageForConditionalGeneration, processor=None) -> None:
    """Refuse a model (and processor) whose image inputs LLaVA cannot reproduce, naming the fix.

    The model config alone records tiles (`tile_separator_token_ids`) and NaFlex towers; native mode with our tower
    is only in the processor (`image_mode`), so a model exported without its processor is checked for the rest only.
    """
    config = model.config
    if config.vision_config.model_type in NAFLEX_VISION_MODEL_TYPES:
        raise ValueError(
            f"The vision tower is transformers' {config.vision_config.model_type} (SigLIP2 NaFlex), which takes only "
            "patchified images (pixel_values (I, N, C*P*P) with pixel_attention_mask and spatial_shapes); LLaVA feeds "
            "its tower whole images (B, C, H, W). Load the tower converted into ours (load_vision_tower(folder), "
            "whose default is convert=True) and train with image_mode='fixed' to export to LLaVA, "
            + USE_THE_VLM_FOLDER
            + "."
        )
    mode = getattr(processor, "image_mode", "fixed")
    if mode == "tiles" or config.tile_separator_token_ids is not None:
        raise ValueError(
            "image_mode='tiles' (image splitting: a grid of tower-size tiles with <tile_col>/<tile_row> separators "
            "and a thumbnail per image; the model config has tile_separator_token_ids) has no LLaVA counterpart: "
            "LLaVA gives each <image> one tower-size image. Train with image_mode='fixed' to export to LLaVA, "
            + USE_THE_VLM_FOLDER
            + "."
        )
    if mode == "native":
        raise ValueError(
            "image_mode='native' (each image on its own patch grid, a token count per image) has no LLaVA "
            "counterpart: LLaVA resizes every image to the tower's size and gives it the same number of tokens. Train "
            "with image_mode='fixed' to export to LLaVA, " + USE_THE_VLM_FOLDER + "."
        )


def llava_image_processor(processor):
    """The image processor of the exported `LlavaProcessor`, giving the same pixel_values as `processor`.

    "squash": the tower's own. "pad": transformers' `LlavaImageProcessor` (or `LlavaImageProcessorPil`, the
    tower's backend) with `do_pad=True` and the tower's resize/crop/rescale/normalisation settings. It pads as
    `pad_to_square` does (an `int(255 * mean)` background, the image at `(side - w) // 2, (side - h) // 2`) and then
    runs transformers' standard resize -> centre crop -> rescale -> normalise, so the tower's processor must be
    exactly that pipeline; others are refused, and the result is checked on non-square images before it is used.
    """
    image_processor = processor.image_processor
    if processor.image_aspect_ratio == "squash":
        return image_processor
    name = type(image_processor).__name__
    standard = (PilBackend._preprocess, TorchvisionBackend._preprocess)
    if isinstance(image_processor, VisionTransformerImageProcessor):
        plain = image_processor.max_num_patches is None  # its classic mode is the standard pipeline
    else:
        plain = name.startswith("LlavaImageProcessor") or type(image_processor)._preprocess in standard
    if not plain or (getattr(image_processor, "do_pad", None) and not name.startswith("LlavaImageProcessor")):
        raise ValueError(
            f"image_aspect_ratio='pad' is exported as transformers' LlavaImageProcessor(do_pad=True), which pads to a "
            f"square and then resizes, centre-crops, rescales and normalises; the tower's {name} "
            f"{'pads its output too (do_pad=True)' if plain else 'preprocesses its own way'}, so a LLaVA folder "
            "would not reproduce the model's pixels. Use a tower image processor with the standard pipeline (ViT's, "
            "CLIP's, SigLIP's), " + USE_THE_VLM_FOLDER + "."
        )
    if isinstance(image_processor, TorchvisionBackend):
        from transformers import LlavaImageProcessor as llava_class
    else:
        from transformers import LlavaImageProcessorPil as llava_class
    settings = image_processor.to_dict()
    settings = {k: settings[k] for k in LLAVA_IMAGE_PROCESSOR_FIELDS if settings.get(k) is not None}
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):  # unset is off, not LLaVA's default
        settings[key] = bool(getattr(image_processor, key, False))
    if not settings.get("image_mean"):  # our processor pads with 0.5 grey when there is no mean
        settings["image_mean"] = [0.5] * 3
    # our processor converts every image to RGB before its image processor (`_as_rgb`)
    padding = llava_class(**settings, do_pad=True, do_convert_rgb=True)
    rng = np.random.default_rng(0)
    probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((23, 48), (61, 30))]
    ours = processor.process_images(probes)
    theirs = padding(images=probes, return_tensors="pt")["pixel_values"]
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-5):
        raise ValueError(
            f"{llava_class.__name__}(do_pad=True) with the settings of the tower's {name} ({settings}) does not give "
            "this processor's pixel_values for non-square images, so a LLaVA folder would not reproduce the model's "
            "inputs; " + USE_THE_VLM_FOLDER.removeprefix("or ") + "."
        )
    return padding


def llava_config_for(model: VisionLanguageForConditionalGeneration) -> LlavaConfig:
    """The `LlavaConfig` equivalent to `model`'s config; ValueError when LLaVA cannot express it."""
    config = model.config
    adapter = config.adapter_config
    if adapter["adapter_type"] != "mlp" or adapter.get("output_norm") or adapter.get("output_scale", 1.0) != 1.0:
        raise ValueError(
            f"Only the plain mlp adapter maps to LLaVA's projector (got {adapter['adapter_type']!r} with "
            f"output_norm={adapter.get('output_norm')}, output_scale={adapter.get('output_scale')})."
        )
    prefix = config.prefix_tokens
    if config.keep_prefix_tokens or prefix == 0:
        strategy = "full"
    elif prefix == 1:
        strategy = "default"
    else:
        raise ValueError(
            f"LLaVA's 'default' strategy drops exactly one prefix token, but this tower has {prefix} ([CLS] + "
            "registers): keep_prefix_tokens=True or a tower without registers is needed for a LLaVA export."
        )
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=adapter.get("hidden_act", "gelu"),
        multimodal_projector_bias=adapter.get("bias", True),
        tie_word_embeddings=config.tie_word_embeddings,
    )


def to_llava(model: VisionLanguageForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` holding the same weights as `model` (strictly: every key mapped)."""
    llava = LlavaForConditionalGeneration(llava_config_for(model)).to(model.dtype)
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower."):
            renamed[f"model.{key}"] = value
        elif key.startswith("adapter."):
            renamed["model.multi_modal_projector." + key.removeprefix("adapter.")] = value
        elif key.startswith("language_model.model."):
            renamed["model.language_model." + key.removeprefix("language_model.model.")] = value
        elif key == "language_model.lm_head.weight":
            renamed["lm_head.weight"] = value
        else:
            raise ValueError(f"No LLaVA counterpart for {key}.")
    missing, unexpected = llava.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"LLaVA export left keys unmatched: missing {missing}, unexpected {unexpected}.")
    return llava.eval()


def export_to_llava(
    model: VisionLanguageForConditionalGeneration, out_dir: str | os.PathLike, processor=None
) -> LlavaForConditionalGeneration:
    """Save `model` as a LLaVA checkpoint folder (and a `LlavaProcessor` when `processor` is given).

    Everything is checked before anything is written: image_mode "native" and "tiles" are refused (ValueError
    naming the fix), image_aspect_ratio "pad" gets a padding `LlavaImageProcessor` (`llava_image_processor`).
    Without `processor` only the model config is checked (`check_llava_image_mode`).
    """
    check_llava_image_mode(model, processor)
    image_processor = llava_image_processor(processor) if processor is not None else None
    llava = to_llava(model)
    llava.save_pretrained(out_dir)
    if processor is not None:
        config = llava.config
        patch = config.vision_config.patch_size
        LlavaProcessor(
            image_processor=image_processor,
            tokenizer=processor.tokenizer,
            patch_size=patch if isinstance(patch, int) else patch[0],
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=model.config.prefix_tokens,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
        ).save_pretrained(out_dir)
    logger.info("exported a LLaVA checkpoint to %s", out_dir)
    return llava
