"""A Perceiver resampler: K learned queries cross-attend to the vision tokens (Alayrac et al., *Flamingo*,
arXiv 2204.14198, Sec. 2.1 / App. A.1.1; Qwen-VL's single-layer variant adds 2-D positions to the keys).

Shapes::

    image_features (B, N, D_vision) -> kv_proj -> context (B, N, H)
    latents = queries (K, H) broadcast to (B, K, H)
    num_layers x:  latents += o_proj(attention(q=LN(latents), k=LN(context) + pos, v=LN(context)))   (pre-LN)
                   latents += fc2(act(fc1(LN(latents))))
    output = proj(LN(latents))  -> (B, K, D_lm);  N' = K whatever the grid.

H is ``hidden_size`` (default D_lm); queries and the attention live in H, and ``proj`` maps to D_lm at the end.
``pos`` is a fixed 2-D sin-cos embedding of each token's (row, column) on the grid (``position_embedding=
"sincos_2d"``, no parameters, any grid size), added to the keys only, as Qwen-VL does; with ``None`` the resampler
is blind to token order. Deviation from Flamingo: keys/values are the vision tokens only, not vision tokens
concatenated with the latents. Attention is ``F.scaled_dot_product_attention``; projection names (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``fc1``, ``fc2``) are those LoRA presets already target.
Init: linear weights trunc-normal(std=0.02), biases zero, LayerNorms one/zero, ``queries`` trunc-normal(std=0.02).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .base import INIT_STD, Adapter, AdapterConfig, check_positive_int

POSITION_EMBEDDINGS = (None, "sincos_2d")


def sincos_2d_position_embedding(
    grid_h: int, grid_w: int, dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a row-major (grid_h, grid_w) grid, computed in fp32.

    Channels ``[0, dim/2)`` encode the row, ``[dim/2, dim)`` the column, each as ``[sin(p * w_k), cos(p * w_k)]``
    with ``w_k = 10000^(-k / (dim/4))``, ``k = 0 .. dim/4 - 1`` (the MAE / Qwen-VL form).

    Returns:
        (grid_h * grid_w, dim); row ``i * grid_w + j`` is the embedding of grid cell (i, j).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)[:, None] * omega  # (grid_h, dim/4)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)[:, None] * omega  # (grid_w, dim/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(grid_h, grid_w, dim // 2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(grid_h, grid_w, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid_h * grid_w, dim).to(dtype)  # (N, dim)


@dataclass(kw_only=True)
class ResamplerAdapterConfig(AdapterConfig):
    """Config of ``ResamplerAdapter``; the shared fields are documented on ``AdapterConfig``.

    Args:
        num_queries: K, the number of learned queries and so of output tokens. Default 64.
        num_layers: cross-attention blocks. Default 2.
        hidden_size: H, the width of queries and attention; ``None`` (default) means D_lm, resolved on creation.
        num_attention_heads: heads; must divide H. Default 8.
        intermediate_size: the MLP's hidden width; ``None`` (default) means 4 * H, resolved on creation.
        hidden_act: the MLP activation, a key of transformers' ``ACT2FN``.
        position_embedding: ``"sincos_2d"`` (default) or ``None``; see the module docstring.
    """

    adapter_type: str = field(default="resampler", init=False)
    num_queries: int = 64
    num_layers: int = 2
    hidden_size: int | None = None
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    position_embedding: str | None = "sincos_2d"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is None:
            self.hidden_size = self.text_hidden_size
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 4 * self.hidden_size
        for name in ("num_queries", "num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "choose a head count that divides it (or set hidden_size)"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not known; use one of {sorted(ACT2FN)}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding={self.position_embedding!r} is not known; use one of {list(POSITION_EMBEDDINGS)}"
            )
        if self.position_embedding == "sincos_2d" and self.hidden_size % 4:
            raise ValueError(
                f"position_embedding='sincos_2d' needs hidden_size divisible by 4, got {self.hidden_size}; "
                "set hidden_size or position_embedding=None"
            )


class ResamplerLayer(nn.Module):
    """One pre-LN block: latents cross-attend to the context, then an MLP; each with a residual."""

    def __init__(self, config: ResamplerAdapterConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.norm_eps
        self.num_heads = config.num_attention_heads
        self.norm_latents = nn.LayerNorm(hidden, eps=eps)
        self.norm_context = nn.LayerNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.norm_mlp = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, hidden)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        """latents (B, K, H), context (B, N, H), position (N, H) or None -> latents (B, K, H)."""
        batch, num_latents, hidden = latents.shape
        num_tokens, head_dim = context.shape[1], hidden // self.num_heads
        context = self.norm_context(context)
        keys = context if position is None else context + position
        q = self.q_proj(self.norm_latents(latents)).view(batch, num_latents, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(keys).view(batch, num_tokens, self.num_heads, head_dim).transpose(1, 2)  # (B, nh, N, hs)
        v = self.v_proj(context).view(batch, num_tokens, self.num_heads, head_dim).transpose(1, 2)  # (B, nh, N, hs)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, nh, K, hs)
        latents = latents + self.o_proj(attended.transpose(1, 2).reshape(batch, num_latents, hidden))  # (B, K, H)
        return latents + self.fc2(self.act(self.fc1(self.norm_mlp(latents))))


class ResamplerAdapter(Adapter):
    """K learned queries attending to the vision tokens: (B, N, D_vision) -> (B, K, D_lm) for any grid."""

    config_class = ResamplerAdapterConfig
    supports_prefix_tokens = False  # its queries attend over the whole grid

    def __init__(self, config: ResamplerAdapterConfig) -> None:
        super().__init__(config)
        self.queries = nn.Parameter(torch.empty(config.num_queries, config.hidden_size))
        self.kv_proj = nn.Linear(config.vision_hidden_size, config.hidden_size)
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.text_hidden_size)
        self._build_output_norm()
        self.reset_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ResamplerAdapter):
            init.trunc_normal_(module.queries, std=INIT_STD)

    def _count_output_tokens(self, grid_h: int, grid_w: int) -> int:
        return self.config.num_queries

    def project(self, image_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        context = self.kv_proj(image_features)  # (B, N, H)
        position = None
        if self.config.position_embedding == "sincos_2d":
            position = sincos_2d_position_embedding(
                grid_h, grid_w, self.config.hidden_size, device=context.device, dtype=context.dtype
            )  # (N, H)
        latents = self.queries.unsqueeze(0).expand(context.shape[0], -1, -1)  # (B, K, H)
        for layer in self.layers:
            latents = layer(latents, context, position)
        return self.proj(self.norm(latents))  # (B, K, D_lm)
