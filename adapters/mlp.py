"""The LLaVA-1.5 projector: a two-layer GELU MLP per token (Liu et al., *Improved Baselines with Visual Instruction
Tuning*, arXiv 2310.03744, Sec. 3.2).

Shapes: (B, N, D_vision) -> linear_1 -> (B, N, D_lm) -> GELU -> linear_2 -> (B, N, D_lm); N' = N.
Parameters: ``linear_1`` = nn.Linear(D_vision, D_lm), ``linear_2`` = nn.Linear(D_lm, D_lm), weights trunc-normal
(std=0.02), biases zero. The leaf names and the activation module ``act`` are those of transformers'
``LlavaMultiModalProjector``, so with ``output_norm=None`` the state dict loads into it unchanged: an export to a Llava
checkpoint renames the prefix only (``...adapter.`` -> ``model.multi_modal_projector.``), with
``projector_hidden_act=hidden_act`` and ``multimodal_projector_bias=bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import Adapter, AdapterConfig


@dataclass(kw_only=True)
class MLPAdapterConfig(AdapterConfig):
    """Config of ``MLPAdapter``; the shared fields are documented on ``AdapterConfig``.

    Args:
        hidden_act: the activation between the two layers, a key of transformers' ``ACT2FN`` (LLaVA: ``"gelu"``).
        bias: whether both linear layers have a bias (LLaVA: yes).
    """

    adapter_type: str = field(default="mlp", init=False)
    hidden_act: str = "gelu"
    bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not known; use one of {sorted(ACT2FN)}")


class MLPAdapter(Adapter):
    """Linear(D_in, D_lm), activation, Linear(D_lm, D_lm) on every token; D_in = D_vision here."""

    config_class = MLPAdapterConfig

    def __init__(self, config: MLPAdapterConfig) -> None:
        super().__init__(config)
        self.linear_1 = nn.Linear(self._mlp_input_size(config), config.text_hidden_size, bias=config.bias)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(config.text_hidden_size, config.text_hidden_size, bias=config.bias)
        self._build_output_norm()
        self.reset_parameters()

    @staticmethod
    def _mlp_input_size(config: MLPAdapterConfig) -> int:
        return config.vision_hidden_size

    def project(self, image_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))
