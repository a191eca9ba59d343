"""The simplest adapter: one linear map per token (LLaVA-1.0's projector, nanoVLM's modality projection).

Shapes: (B, N, D_vision) -> (B, N, D_lm); N' = N = grid_h * grid_w.
Parameters: ``proj`` = nn.Linear(D_vision, D_lm), weight trunc-normal(std=0.02), bias zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Adapter, AdapterConfig


@dataclass(kw_only=True)
class LinearAdapterConfig(AdapterConfig):
    """Config of ``LinearAdapter``; the shared fields are documented on ``AdapterConfig``.

    Args:
        bias: whether ``proj`` has a bias.
    """

    adapter_type: str = field(default="linear", init=False)
    bias: bool = True


class LinearAdapter(Adapter):
    """One nn.Linear(D_vision, D_lm) applied to every token: (B, N, D_vision) -> (B, N, D_lm)."""

    config_class = LinearAdapterConfig

    def __init__(self, config: LinearAdapterConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.vision_hidden_size, config.text_hidden_size, bias=config.bias)
        self._build_output_norm()
        self.reset_parameters()

    def project(self, image_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        return self.proj(image_features)
