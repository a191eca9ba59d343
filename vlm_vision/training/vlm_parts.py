"""The parts a VLM recipe builds: the vision tower (a folder, the pre-trained classifier's, or a fresh ViT),
the tokenizer (the LM's, or sentencepiece trained on the data), the language model, and the VLM with its
processor."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..encoder.configuration_vit import VisionTransformerConfig
from ..encoder.image_processing_vit import VisionTransformerImageProcessor
from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel
from ..encoder.position_embeddings import MAX_RESAMPLE_FACTOR
from ..export.encoder_folder import image_processor_for
from ..vlm.modeling_vlm import VisionLanguageForConditionalGeneration, takes_native_inputs
from ..vlm.processing_vlm import (
    IMAGE_TOKEN,
    TILE_SEPARATOR_TOKENS,
    VisionLanguageProcessor,
    resolve_chat_template,
)
from ..vlm.smollm import as_plain_model
from ..vlm.tokenizer import chat_texts, train_sentencepiece_tokenizer
from ..vlm.towers import load_vision_tower, resolve_dtype
from .loop import process_state
from .vlm_data import open_training_data
from .vlm_schema import LM_KEYS, VISION_KEYS, VISION_PROCESSING_KEYS, VLMRecipe

logger = logging.getLogger(__name__)

TOKENIZER_TRAINING_SAMPLES = 200_000  # a tiny LM's tokenizer is trained on at most this many conversations


def fresh_tower_config(recipe: VLMRecipe) -> VisionTransformerConfig:
    fields_ = {k: v for k, v in recipe.vision.items() if k not in (*VISION_KEYS, *VISION_PROCESSING_KEYS)}
    return VisionTransformerConfig(**fields_)


def build_tower(recipe: VLMRecipe, classifier: VisionTransformerForImageClassification | None):
    """(tower, image processor): the pre-trained classifier's tower, a tower folder, or a fresh ViT."""
    if classifier is not None:
        return classifier.vit, image_processor_for(classifier.vit.config)
    vision = recipe.vision
    if vision.get("path"):
        return load_vision_tower(
            vision["path"],
            image_processor=vision.get("image_processor"),
            convert=vision.get("convert", True),
            dtype=vision.get("dtype"),
            attn_implementation=vision.get("attn_implementation"),
        )
    tower = VisionTransformerModel(fresh_tower_config(recipe))
    return tower, image_processor_for(tower.config)


def build_tokenizer(recipe: VLMRecipe, tokenizer_folder: Path):
    """(tokenizer, chat template): the language model's own, or a sentencepiece tokenizer trained on the data."""
    lm = recipe.language_model
    if lm.get("path"):
        kwargs = {"gguf_file": lm["gguf_file"]} if lm.get("gguf_file") else {}
        tokenizer = AutoTokenizer.from_pretrained(lm["path"], **kwargs)
        return tokenizer, resolve_chat_template(lm.get("chat_template"), tokenizer, where=lm["path"])
    chat_template = resolve_chat_template(lm.get("chat_template", "user_assistant"), None)
    return _trained_tokenizer(recipe, tokenizer_folder, chat_template), chat_template


def build_language_model(recipe: VLMRecipe, tokenizer) -> nn.Module:
    """The causal LM from its folder, or a fresh tiny Llama sized for `tokenizer` (its vocabulary and `<image>`)."""
    lm = recipe.language_model
    if lm.get("path"):
        kwargs = {key: lm[key] for key in ("gguf_file", "attn_implementation") if lm.get(key)}
        dtype = resolve_dtype(lm.get("dtype"), "language_model") or torch.float32
        model = AutoModelForCausalLM.from_pretrained(lm["path"], dtype=dtype, **kwargs)
        return as_plain_model(model) if lm.get("gguf_file") else model
    config = {k: v for k, v in lm.items() if k not in LM_KEYS}
    config = {"tie_word_embeddings": True, "max_position_embeddings": recipe.max_length, **config}
    attention = {"attn_implementation": lm["attn_implementation"]} if lm.get("attn_implementation") else {}
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), **config), **attention)


def _trained_tokenizer(recipe: VLMRecipe, folder: Path, chat_template: str):
    """A sentencepiece tokenizer trained on the first VLM stage's conversations as the template renders them."""
    process = process_state()
    if process.is_main_process and not (folder / "tokenizer.json").is_file():
        first = next(s for s in recipe.stages if s.kind != "vision_pretrain")
        index = open_training_data(recipe.stage_data(first), recipe.seed, first.name)
        positions = range(len(index))
        if len(index) > TOKENIZER_TRAINING_SAMPLES:
            positions = sorted(random.Random(recipe.seed).sample(positions, TOKENIZER_TRAINING_SAMPLES))
        conversations = []
        for i in positions:
            try:
                conversations.append(index.sample(i).messages)
            except ValueError:
                continue  # a malformed entry: the data set reports it when training reaches it
        texts = chat_texts(conversations, chat_template)  # what the LM reads, the template's markup included
        tokenizer = train_sentencepiece_tokenizer(texts, vocab_size=recipe.tokenizer.get("vocab_size", 512))
        tokenizer.save_pretrained(folder)
    process.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)


def build_vlm(recipe: VLMRecipe, classifier, tokenizer_folder: Path):
    """The VLM (tower + fresh adapter + LM) and its processor (the tower's image processor, the LM's tokenizer)."""
    tower, image_processor = build_tower(recipe, classifier)
    mode = recipe.vision.get("image_mode", "fixed")
    packing = {k: recipe.vision[k] for k in ("pack_images", "max_packed_length") if k in recipe.vision}
    image_processor = mode_image_processor(
        tower, image_processor, mode, recipe.vision.get("max_num_patches"), **packing
    )
    tokenizer, chat_template = build_tokenizer(recipe, tokenizer_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    separators = {}
    if mode == "tiles":
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(TILE_SEPARATOR_TOKENS)}, replace_extra_special_tokens=False
        )
        separators["tile_separator_token_ids"] = tokenizer.convert_tokens_to_ids(list(TILE_SEPARATOR_TOKENS))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    language_model = build_language_model(recipe, tokenizer)
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    model = VisionLanguageForConditionalGeneration.from_parts(
        tower,
        language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        adapter_config=recipe.adapter,
        vision_feature_layer=recipe.vision_feature_layer,
        keep_prefix_tokens=recipe.keep_prefix_tokens,
        **separators,
    )
    for side, part in (("vision", model.vision_tower), ("language_model", model.language_model)):
        if getattr(recipe, side).get("gradient_checkpointing"):
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if getattr(recipe, side).get("compile"):
            compile_layers(part)
    processor = VisionLanguageProcessor.from_model_config(
        model.config,
        image_processor,
        tokenizer,
        chat_template=chat_template,
        image_aspect_ratio=recipe.vision.get("image_aspect_ratio", "squash"),
        image_mode=mode,
        max_tiles=recipe.vision.get("max_tiles"),
    )
    if processor.num_image_tokens >= recipe.max_length:
        raise ValueError(
            f"One image takes {processor.num_image_tokens} tokens ({model.config.grid_size[0]}x"
            f"{model.config.grid_size[1]} patches through the {recipe.adapter.get('adapter_type', 'mlp')} adapter), "
            f"which leaves no room for text within max_length={recipe.max_length}: raise max_length (LLaVA uses "
            "2048) or use an adapter that reduces tokens (pixel_shuffle, resampler)."
        )
    return model, processor


def mode_image_processor(tower, image_processor, mode: str, max_num_patches: int | None = None, **packing):
    """The image processor of `vision.image_mode` for the tower's own `image_processor`.

    - "native": ours in native-resolution mode with the tower processor's resize rule, rescale and normalisation
      and the recipe's patch budget (`native_image_processor`; `packing`: its `pack_images`, `max_packed_length`).
    - "fixed" / "tiles" with a NaFlex processor (SigLIP2's `Siglip2ImageProcessor`, which patchifies every image):
      ours in classic mode at the square of the tower's position table (`square_image_processor`).
    - otherwise the tower's own, unchanged.
    """
    if mode == "native":
        return native_image_processor(tower, image_processor, max_num_patches, **packing)
    if getattr(image_processor, "max_num_patches", None) is not None:
        return square_image_processor(tower, image_processor, mode)
    return image_processor


def _processing_settings(tower, image_processor) -> dict:
    """What an image processor of the tower does to pixels: resampling, rescale, normalisation, RGB conversion."""
    settings = {
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "resample": image_processor.resample,
        "do_convert_rgb": getattr(image_processor, "do_convert_rgb", None),
    }
    for key in ("do_rescale", "rescale_factor", "do_normalize"):
        if getattr(image_processor, key, None) is not None:
            settings[key] = getattr(image_processor, key)
    if settings["do_convert_rgb"] is None and tower.config.num_channels == 3:
        settings["do_convert_rgb"] = True  # grayscale, CMYK, RGBA files: an RGB image is left as it is
    return settings


def native_image_processor(
    tower, image_processor, max_num_patches: int | None = None, **packing
) -> VisionTransformerImageProcessor:
    """The tower's image processor (its resampling, rescale, mean and std) in native-resolution mode: aspect ratio
    kept, at most `max_num_patches` patches of the tower's patch size (None: the tower processor's own budget). For a
    SigLIP2 NaFlex folder this is its `Siglip2ImageProcessor` with the recipe's budget (the same resize rule,
    `get_image_size_for_max_num_patches`)."""
    if max_num_patches is None:
        max_num_patches = getattr(image_processor, "max_num_patches", None)
        if not isinstance(max_num_patches, int):
            raise ValueError(
                "vision.image_mode='native' needs vision.max_num_patches (an int: the patch budget per image, e.g. "
                f"576): the tower's {type(image_processor).__name__} has no budget of its own to take it from."
            )
    if not takes_native_inputs(tower):
        raise ValueError(
            f"vision.image_mode='native' needs a tower that takes masked patch sequences; {type(tower).__name__} "
            "doesn't: load it with vision.convert=true (converted into VisionTransformerModel), or use 'fixed' / "
            "'tiles'."
        )
    patch = tower.config.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if patch_h != patch_w:
        raise ValueError(f"vision.image_mode='native' needs square patches, got {patch_h}x{patch_w}.")
    saved_patch = getattr(image_processor, "patch_size", None)
    if isinstance(saved_patch, int) and getattr(image_processor, "max_num_patches", None) and saved_patch != patch_h:
        raise ValueError(
            f"The tower's image processor cuts patches of {saved_patch} pixels but the tower's patch_size is "
            f"{patch_h}: fix patch_size in its preprocessor_config.json (or pass vision.image_processor FOLDER)."
        )
    if isinstance(tower, VisionTransformerModel):
        # every grid side is at most max_num_patches (a 1 x N image), and our tower stretches its position table at
        # most MAX_RESAMPLE_FACTOR times along a side: within this budget every image fits, whatever its shape
        table_h, table_w = tower.config.grid_size
        limit = MAX_RESAMPLE_FACTOR * min(table_h, table_w)
        if max_num_patches > limit:
            raise ValueError(
                f"vision.max_num_patches={max_num_patches} is beyond what the tower's {table_h}x{table_w} position "
                f"table allows: an image of aspect ratio 1:{max_num_patches} would get a 1 x {max_num_patches} grid, "
                f"stretching the table more than {MAX_RESAMPLE_FACTOR}x along a side. Set vision.max_num_patches to "
                f"at most {limit} (SigLIP2 NaFlex's 16x16 table: 1024)."
            )
    if packing.get("pack_images") and not isinstance(tower, VisionTransformerModel):
        raise ValueError(
            "vision.pack_images needs a tower that keeps packed images apart (patch_image_ids); "
            f"{type(tower).__name__} doesn't: load it with vision.convert=true (converted into "
            "VisionTransformerModel), or drop pack_images."
        )
    return VisionTransformerImageProcessor(
        patch_size=patch_h,
        max_num_patches=max_num_patches,
        **packing,
        do_center_crop=False,
        **_processing_settings(tower, image_processor),
    )


def square_image_processor(tower, image_processor, mode: str) -> VisionTransformerImageProcessor:
    """A NaFlex tower in `fixed` / `tiles` mode: every image (tile) resized to the square of the tower's position
    table, with the NaFlex processor's resampling, rescale and normalisation. The tower then adds its table as it is:
    exactly `Siglip2VisionModel` with `spatial_shapes` (side, side) on that image (for a square image of any size,
    `Siglip2ImageProcessor(max_num_patches=side * side)` gives the same pixels)."""
    if not isinstance(tower, VisionTransformerModel):
        raise ValueError(
            f"vision.image_mode={mode!r} feeds (images, channels, height, width) pixels, which "
            f"{type(tower).__name__} (a NaFlex tower: patchified pixel_values with pixel_attention_mask and "
            "spatial_shapes) does not take: use vision.image_mode='native' with vision.max_num_patches, or "
            "vision.convert=true (converted into VisionTransformerModel, which takes square images at its position "
            "table's size)."
        )
    height, width = tower.config.image_size_hw
    return VisionTransformerImageProcessor(
        size={"height": height, "width": width},
        do_center_crop=False,
        **_processing_settings(tower, image_processor),
    )


def compile_layers(part: nn.Module) -> int:
    """`torch.compile` each transformer layer of `part` in place (the classes of its `_no_split_modules`): regional
    compilation, as accelerate's `compile_regions`: one layer's graph serves all of them (compiled once), the
    module tree and its state-dict names stay as they are, and the tower's `get_intermediate_layers` (which a
    compiled `forward` would bypass) runs compiled layers too. Returns the number of layers compiled."""
    classes = set(getattr(part, "_no_split_modules", None) or ())
    layers = [m for m in part.modules() if type(m).__name__ in classes and m is not part]
    if not layers:
        raise ValueError(f"{type(part).__name__} names no layer classes (_no_split_modules) to compile.")
    for layer in layers:
        layer.compile()
    logger.info("torch.compile: %d %s layers", len(layers), type(part).__name__)
    return len(layers)
