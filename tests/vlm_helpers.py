"""Tiny vision-language models for tests: our ViT + an adapter + a tiny Llama with a real sentencepiece tokenizer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import LlamaConfig

from tests.conftest import tiny_config
from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, VisionLanguageProcessor
from vlm_vision.export.encoder_folder import image_processor_for
from vlm_vision.vlm.tokenizer import train_sentencepiece_tokenizer

CORPUS = [
    "what is the blue shape?",
    "what color is the circle?",
    "is there a red triangle in the image?",
    "does the image contain a green rectangle?",
    "yes",
    "no",
    "a blue circle",
    "a gray rectangle",
    "describe the image.",
    "the shape is a yellow triangle on a white background.",
]


def train_tokenizer():
    return train_sentencepiece_tokenizer(CORPUS * 20, vocab_size=400)


def tiny_text_config(vocab_size: int, **overrides) -> LlamaConfig:
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**fields, **overrides})


def build_vlm(tokenizer, adapter=None, seed=0, vision_overrides=None, **config_kwargs):
    """A tiny VLM and its processor. `<image>` is added to the tokenizer by the processor."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = VisionLanguageConfig(
        vision_config=tiny_config(**(vision_overrides or {})),
        text_config=tiny_text_config(len(tokenizer)),
        adapter_config=adapter or {"adapter_type": "mlp"},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = VisionLanguageForConditionalGeneration(config)
    processor = VisionLanguageProcessor.from_model_config(config, image_processor_for(config.vision_config), tokenizer)
    return model, processor


def shapes_image(seed: int, size: int = 48) -> Image.Image:
    """A small RGB picture: a coloured square on a light background."""
    rng = np.random.default_rng(seed)
    array = np.full((size, size, 3), 230, np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    array[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(array)


def vqa(question: str, answer: str, images: int = 1) -> list[dict]:
    return [
        {"role": "user", "content": "<image>\n" * images + question},
        {"role": "assistant", "content": answer},
    ]
