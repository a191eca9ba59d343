"""Shared tiny configurations: every test runs on CPU in seconds."""

from __future__ import annotations

import pytest
import torch

import vlm_vision  # noqa: F401  registers the Auto classes
from vlm_vision import VisionTransformerConfig

TINY = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 48,
}


def tiny_config(**overrides) -> VisionTransformerConfig:
    return VisionTransformerConfig(**{**TINY, **overrides})


@pytest.fixture
def config() -> VisionTransformerConfig:
    return tiny_config()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A sentencepiece tokenizer trained once per test session on the tiny VQA corpus (tests/vlm_helpers.py)."""
    from tests.vlm_helpers import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save_pretrained(path)
    return path
