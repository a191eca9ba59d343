"""Interop with transformers' LLaVA: export a VLM with the `mlp` adapter to a `LlavaForConditionalGeneration` folder.

Our encoder also works directly as the `vision_config` of a `LlavaConfig` (LLaVA builds its tower with
`AutoModel.from_config`, which finds our registered class after `import vlm_vision`; LLaVA's `save_pretrained`
doesn't copy the tower's code, so loaders import the package first).
"""

from __future__ import annotations

import logging
import os

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from .modeling_vlm import VisionLanguageForConditionalGeneration

logger = logging.getLogger(__name__)


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
    """Save `model` as a LLaVA checkpoint folder (and a `LlavaProcessor` when `processor` is given)."""
    llava = to_llava(model)
    llava.save_pretrained(out_dir)
    if processor is not None:
        config = llava.config
        patch = config.vision_config.patch_size
        LlavaProcessor(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            patch_size=patch if isinstance(patch, int) else patch[0],
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=model.config.prefix_tokens,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
        ).save_pretrained(out_dir)
    logger.info("exported a LLaVA checkpoint to %s", out_dir)
    return llava
