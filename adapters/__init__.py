"""Projection adapters: vision tokens (B, N, D_vision) -> language-model embeddings (B, N', D_lm).

Installed as ``vlm_vision.adapters`` (the top-level name ``adapters`` belongs to a PyPI library). One file per
adapter; ``base`` holds what they share. Typical use::

    adapter = build_adapter({"adapter_type": "pixel_shuffle", "vision_hidden_size": 768, "text_hidden_size": 576})
    n = adapter.num_output_tokens(14, 14)  # 49: how many <image> placeholders the processor inserts
    embeds = adapter(patch_tokens, grid_size=(14, 14))  # (B, 196, 768) -> (B, 49, 576)
"""

from .base import (
    ADAPTER_CLASSES,
    ADAPTER_CONFIGS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterConfig,
    adapter_config_from_dict,
    build_adapter,
)
from .linear import LinearAdapter, LinearAdapterConfig
from .mlp import MLPAdapter, MLPAdapterConfig
from .pixel_shuffle import PixelShuffleAdapter, PixelShuffleAdapterConfig, pixel_shuffle
from .resampler import ResamplerAdapter, ResamplerAdapterConfig, sincos_2d_position_embedding

__all__ = [
    "ADAPTER_CLASSES",
    "ADAPTER_CONFIGS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterConfig",
    "LinearAdapter",
    "LinearAdapterConfig",
    "MLPAdapter",
    "MLPAdapterConfig",
    "PixelShuffleAdapter",
    "PixelShuffleAdapterConfig",
    "ResamplerAdapter",
    "ResamplerAdapterConfig",
    "adapter_config_from_dict",
    "build_adapter",
    "pixel_shuffle",
    "sincos_2d_position_embedding",
]
