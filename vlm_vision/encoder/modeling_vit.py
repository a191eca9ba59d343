"""The Vision Transformer of *An Image is Worth 16x16 Words* (Dosovitskiy et al., 2020, arXiv 2010.11929).

Read top-down, this file is the paper's Eq. 1-4:

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos       (Eq. 1)  VisionTransformerEmbeddings
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                     (Eq. 2)  VisionTransformerLayer (attention half)
    z_l  = MLP(LN(z'_l)) + z'_l                           (Eq. 3)  VisionTransformerLayer (MLP half)
    y    = LN(z_L^0)                                      (Eq. 4)  VisionTransformerModel.layernorm -> pooler_output

Deviations and additions, all off by default unless stated:
- The patch embedding E is a Conv2d with kernel = stride = P, which is the same linear map as flattening patches.
- Hybrid (Sec. 3.1): with `config.backbone_config`, the patches come from a CNN feature map (transformers' BiT
  backbone), projected by a 1x1 convolution (P / stride wide in general). `backbone_norm_eps` sets the GroupNorm
  epsilon of the backbone (the reference JAX ResNet's 1e-6 instead of BiT's 1e-5).
- Other resolutions (Sec. 3.2): the position embeddings are 2-D interpolated (`interpolate_pos_encoding=True` at run
  time; automatically when loading a checkpoint into a config of another image size).
- Switches for other towers: no class token, register tokens (no position embedding), a pre-encoder LayerNorm,
  LayerScale, the activation, the pooling (`cls`, `mean`, attention pooling `map`), the final LayerNorm on the pooled
  vector only (`final_norm="pooled"`: CLIP, timm's `fc_norm`), a dense pooler (`pooler_act`: transformers' ViTModel
  pooler) and a patch projection without bias (CLIP). The package's `conversion` module maps checkpoints onto them.
- MSA runs through transformers' attention interface (sdpa by default; eager when attention weights are asked for).
- Native resolution (SigLIP2 NaFlex's layout): pre-cut patches `(B, N, C*P*P)` of each image's own grid with
  `spatial_shapes` and an optional `pixel_attention_mask`; E_pos is resampled per image (Sec. 3.2's interpolation
  for every grid), padded patches are masked out of attention and pooling.
- Packed native resolution (NaViT, Dehghani et al. 2023): several images' patches in one row with `patch_image_ids`;
  each image gets its own prefix tokens at the start of its segment and attends only within itself (sdpa on each
  image alone, images of one length in one call; a block-diagonal mask on eager; varlen `cu_seq_lens` on flash
  attention). See `PackedLayout`.

Sequence layout: `[CLS]? [REG] * num_register_tokens [patch_1 ... patch_N]`, patches row-major on the grid (then
padding, in the native-resolution form).

This file imports only torch, transformers and sibling files: it is copied into saved checkpoints, so
`AutoModel.from_pretrained(path, trust_remote_code=True)` works without this package installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import operator
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import BitBackbone, BitConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_vit import VisionTransformerConfig
from .position_embeddings import MAX_RESAMPLE_FACTOR, infer_square_grid, resample_position_embeddings

logger = logging.get_logger(__name__)

POSITION_EMBEDDING_SUFFIX = "embeddings.position_embeddings"
# timm's names for `global_pool` in `reset_classifier`, and ours
GLOBAL_POOL_NAMES = {"token": "cls", "avg": "mean", "map": "map", "cls": "cls", "mean": "mean"}


def resample_for_config(
    table: torch.Tensor, config: VisionTransformerConfig, *, new_grid: tuple[int, int], old_grid: tuple[int, int]
) -> torch.Tensor:
    """`resample_position_embeddings` with the config's prefix tokens, interpolation mode and antialias: how a table
    of this model changes grid (at run time, when a checkpoint of another size loads, when a converter resizes)."""
    return resample_position_embeddings(
        table,
        new_grid=new_grid,
        old_grid=old_grid,
        num_prefix_tokens=int(config.use_class_token),
        mode=config.interpolation_mode,
        antialias=config.interpolation_antialias,
    )


class CheckpointMismatchError(RuntimeError, ValueError):
    """A checkpoint that does not fit the model: weights of another shape, or weights the model needs and the
    checkpoint lacks. A RuntimeError, as transformers raises for mismatched sizes, and a ValueError (bad input)."""


class CheckpointFileError(OSError, ValueError):
    """A weight file that cannot be read: truncated, empty or not a safetensors file. An OSError, as transformers
    raises for unreadable files, and a ValueError (bad input)."""


# Set by `from_pretrained(..., allow_missing_keys=True)` for the one load it runs (the loading hooks are static).
_ALLOW_MISSING_KEYS = contextvars.ContextVar("vlm_vit_allow_missing_keys", default=False)


class VisionTransformerPatchEmbeddings(nn.Module):
    """x (B, C, H, W) -> x_p E (B, N, D): linear projection of non-overlapping P x P patches (or of the 1x1 cells of a
    CNN feature map for the hybrid)."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size_hw
        if config.backbone_config is not None:
            self.backbone = BitBackbone(BitConfig(num_channels=config.num_channels, **config.backbone_config))
            if config.backbone_norm_eps is not None:  # nn.GroupNorm reads `eps` in forward
                for module in self.backbone.modules():
                    if isinstance(module, nn.GroupNorm):
                        module.eps = config.backbone_norm_eps
            stride = 4 * 2 ** max(len(self.backbone.config.depths) - 1, 0)  # stem /4, then /2 per stage after the first
            if self.patch_size[0] % stride or self.patch_size[1] % stride:
                raise ValueError(
                    f"patch_size={config.patch_size} must be a multiple of the backbone's feature stride {stride}."
                )
            in_channels, kernel = (
                self.backbone.channels[-1],
                (self.patch_size[0] // stride, self.patch_size[1] // stride),
            )
        else:
            self.backbone = None
            in_channels, kernel = config.num_channels, self.patch_size
        self.projection = nn.Conv2d(
            in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=config.patch_embedding_bias
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values).feature_maps[-1] if self.backbone is not None else pixel_values
        return self.projection(features).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class VisionTransformerEmbeddings(nn.Module):
    """Eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos, then the register tokens (without E_pos) after [CLS]."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = VisionTransformerPatchEmbeddings(config)
        dim = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_class_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim)) if config.num_register_tokens else None
        )
        num_positions = int(config.use_class_token) + config.num_patches
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, dim))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_embeddings_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """E_pos for a `grid` of patches, resampled from the config's grid when they differ. (1, [1] + h*w, D)."""
        return resample_for_config(self.position_embeddings, self.config, new_grid=grid, old_grid=self.config.grid_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        (patch_h, patch_w), expected = self.config.patch_size_hw, self.config.image_size_hw
        if (height, width) != expected and not interpolate_pos_encoding:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's image_size "
                f"{expected[0]}x{expected[1]}. "
                "Resize it with the image processor, or pass interpolate_pos_encoding=True to resample the position "
                "embeddings to this size."
            )
        embeddings = self.patch_embeddings(pixel_values)  # (B, N, D)
        if self.cls_token is not None:
            embeddings = torch.cat([self.cls_token.expand(batch_size, -1, -1), embeddings], dim=1)
        embeddings = embeddings + self.position_embeddings_for((height // patch_h, width // patch_w))
        if self.register_tokens is not None:
            cls, patches = (
                embeddings[:, : int(self.config.use_class_token)],
                embeddings[:, int(self.config.use_class_token) :],
            )
            embeddings = torch.cat([cls, self.register_tokens.expand(batch_size, -1, -1), patches], dim=1)
        return self.dropout(embeddings)  # (B, num_prefix_tokens + N, D)

    def forward_patches(self, patches: torch.Tensor, spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Eq. 1 for the native-resolution form: already patchified images, each on its own grid.

        `patches` (B, N, C * P_h * P_w) hold each image's patches row-major on its grid `spatial_shapes[i]` (h_i, w_i)
        in their first h_i * w_i rows, then padding; each patch is flattened (P_h, P_w, C), as transformers'
        Siglip2 image processor does. E_pos is resampled per image to its grid by the same function as for whole
        images; padded rows get none (what they hold is never attended to).
        """
        batch_size = patches.shape[0]
        weight = self.patch_embeddings.projection.weight  # (D, C, P_h, P_w): the same linear map on each patch
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (D, P_h * P_w * C)
        embeddings = nn.functional.linear(patches, weight, self.patch_embeddings.projection.bias)  # (B, N, D)
        num_prefix = int(self.config.use_class_token)
        positions = embeddings.new_zeros(embeddings.shape)
        tables = {}
        for i, grid in enumerate(spatial_shapes):
            if grid not in tables:
                tables[grid] = self.position_embeddings_for(grid)[0, num_prefix:]  # (h * w, D)
            positions[i, : grid[0] * grid[1]] = tables[grid]
        embeddings = embeddings + positions
        if self.cls_token is not None:
            cls = self.cls_token + self.position_embeddings[:, :1]  # [CLS]'s row is never resampled
            embeddings = torch.cat([cls.expand(batch_size, -1, -1), embeddings], dim=1)
        if self.register_tokens is not None:
            cls, patches_embedded = embeddings[:, :num_prefix], embeddings[:, num_prefix:]
            embeddings = torch.cat([cls, self.register_tokens.expand(batch_size, -1, -1), patches_embedded], dim=1)
        return self.dropout(embeddings)  # (B, num_prefix_tokens + N, D)

    def forward_packed(self, patches: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Eq. 1 for packed rows: `patches` (R, L, C * P_h * P_w) hold several images' patches one after another
        (`layout`, from `patch_image_ids`); each image gets E_pos resampled to its own grid and its own prefix tokens
        ([CLS] with its E_pos row, then the registers) at the start of its segment. Returns (R, T, D), T =
        `layout.num_tokens`; the row's trailing padding holds nothing meaningful (it is masked out)."""
        weight = self.patch_embeddings.projection.weight  # (D, C, P_h, P_w), as in forward_patches
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        embeddings = nn.functional.linear(patches, weight, self.patch_embeddings.projection.bias)  # (R, L, D)
        num_prefix = int(self.config.use_class_token)
        positions = embeddings.new_zeros(embeddings.shape)
        tables = {}
        for grid, row, start in zip(layout.grids, layout.rows, layout.patch_starts, strict=True):
            if grid not in tables:
                tables[grid] = self.position_embeddings_for(grid)[0, num_prefix:]  # (h * w, D)
            positions[row, start : start + grid[0] * grid[1]] = tables[grid]
        embeddings = embeddings + positions
        rows, length = embeddings.shape[:2]
        row_index = torch.arange(rows, device=embeddings.device)[:, None].expand(rows, length)
        tokens = embeddings.new_zeros(rows, layout.num_tokens, embeddings.shape[-1])
        tokens = tokens.index_put((row_index, layout.token_index.to(embeddings.device)), embeddings)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token[0] + self.position_embeddings[0, :1])  # [CLS]'s row is never resampled
        if self.register_tokens is not None:
            prefix.append(self.register_tokens[0])
        if prefix:
            prefix = torch.cat(prefix).to(embeddings.dtype)  # (num_prefix_tokens, D)
            count = prefix.shape[0]
            image_rows = torch.tensor(layout.rows, device=embeddings.device).repeat_interleave(count)
            starts = torch.tensor(layout.token_starts, device=embeddings.device)
            columns = (starts[:, None] + torch.arange(count, device=embeddings.device)).flatten()
            tokens = tokens.index_put((image_rows, columns), prefix.repeat(len(layout.rows), 1))
        return self.dropout(tokens)


class PackedLayout:
    """Where each image of a packed batch sits, read from `patch_image_ids` (R, L) (see `packed_layout`).

    Inputs: row r's patches are image segments one after another, then padding (-1): image i's h_i * w_i patches,
    row-major on its grid, contiguous in one row. The model's token rows put each image's prefix tokens before its
    patches, so row r holds `[prefix_a, patches_a, prefix_b, patches_b, ..., padding]`, T = L + K * num_prefix_tokens
    tokens (K the most images in one row).

    Attributes (per image i, in `spatial_shapes` order): `grids[i]`, `rows[i]`, `patch_starts[i]` (its first patch in
    the input row), `token_starts[i]` (its first prefix token in the token row), `num_prefix_tokens`; `token_index`
    (R, L): the token position of each input patch slot; `segment_ids` (R, T): the image of each token, and for
    padding a number of its own (< 0), so padding attends only to itself and nothing attends to it.
    """

    def __init__(self, grids, rows, patch_starts, num_prefix_tokens, num_rows, length):
        self.grids, self.rows, self.patch_starts = grids, rows, patch_starts
        self.num_prefix_tokens = num_prefix_tokens
        order = [0] * num_rows  # images seen so far in each row
        self.token_starts = []
        for row, start in zip(rows, patch_starts, strict=True):
            self.token_starts.append(start + order[row] * num_prefix_tokens)
            order[row] += 1
        self.num_tokens = length + max(order) * num_prefix_tokens
        token_index = torch.arange(length)[None, :].repeat(num_rows, 1)  # padding slot p -> p + K_row * prefix
        token_index += torch.tensor(order)[:, None] * num_prefix_tokens
        segment_ids = -1 - torch.arange(self.num_tokens)[None, :].repeat(num_rows, 1)
        for image, (grid, row, start, token) in enumerate(
            zip(grids, rows, patch_starts, self.token_starts, strict=True)
        ):
            count = grid[0] * grid[1]
            token_index[row, start : start + count] = torch.arange(count) + token + num_prefix_tokens
            segment_ids[row, token : token + num_prefix_tokens + count] = image
        self.token_index, self.segment_ids = token_index, segment_ids

    @property
    def lengths(self) -> list[int]:
        """Tokens per image: its prefix tokens plus its h * w patches."""
        return [self.num_prefix_tokens + h * w for h, w in self.grids]

    def attention_mask(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Block-diagonal additive mask (R, 1, T, T): 0 within an image's segment (and on padding's own diagonal),
        the dtype's minimum elsewhere (eager adds it, sdpa takes it as its float `attn_mask`)."""
        segments = self.segment_ids.to(device)
        allowed = segments[:, None, :, None] == segments[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def flash_attention_kwargs(self, device) -> dict:
        """transformers' varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`, as `DataCollatorWithFlattening` makes
        them) over the R * T flattened tokens: one sequence per image, and one per row's trailing padding."""
        boundaries, offset = [0], 0
        for row in range(self.segment_ids.shape[0]):
            ends = [t + n for r, t, n in zip(self.rows, self.token_starts, self.lengths, strict=True) if r == row]
            boundaries += [offset + end for end in sorted(ends)]
            offset += self.num_tokens
            if boundaries[-1] != offset:  # the row's padding, one sequence of its own
                boundaries.append(offset)
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32, device=device)
        longest = int(cu_seq_lens.diff().max())
        return {
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }

    def segment_attention(self, device) -> PackedSegmentAttention:
        """sdpa on each image alone, what sdpa gets instead of `attention_mask` (see `PackedSegmentAttention`)."""
        return PackedSegmentAttention(self, device)

    def split(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Token rows (R, T, ...) -> one (num_prefix_tokens + h_i * w_i, ...) tensor per image."""
        return [
            hidden_states[row, start : start + length]
            for row, start, length in zip(self.rows, self.token_starts, self.lengths, strict=True)
        ]

    def padded(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows (R, T, D) -> each image alone, padded: (I, num_prefix_tokens + max h*w, D) and its token
        mask (I, ...) (True = a real token), the form `VisionTransformerModel.pool` takes."""
        images = self.split(hidden_states)
        padded = nn.utils.rnn.pad_sequence(images, batch_first=True)
        lengths = torch.tensor(self.lengths, device=hidden_states.device)
        mask = torch.arange(padded.shape[1], device=hidden_states.device)[None, :] < lengths[:, None]
        return padded, mask

    def patch_slots(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token rows (R, T, D) -> the patch tokens back at their input slots (R, L, D), aligned with
        `patch_image_ids` (slots of padding hold nothing meaningful)."""
        index = self.token_index.to(hidden_states.device)[..., None].expand(-1, -1, hidden_states.shape[-1])
        return hidden_states.gather(1, index)


class PackedSegmentAttention:
    """Attention of packed rows, each image's segment alone: the images of one token count stacked into one sdpa
    call (so a batch of images of a few sizes costs a few calls, not one per image), and a padding token attending
    only to itself (its output is its value, as under the block-diagonal mask). What `attention_mask` gives, without
    building the (R, 1, T, T) mask or computing the T x T scores of a row: sdpa's cost is the sum of the images'
    squared lengths. Indices are built once per forward, on `device`; every layer reuses them."""

    def __init__(self, layout: PackedLayout, device):
        rows, tokens = layout.segment_ids.shape
        starts_by_length: dict[int, list[int]] = {}
        for row, start, length in zip(layout.rows, layout.token_starts, layout.lengths, strict=True):
            starts_by_length.setdefault(length, []).append(row * tokens + start)
        self.groups = [  # (images, length) indices into the R * T flattened tokens
            (torch.tensor(starts)[:, None] + torch.arange(length)).to(device)
            for length, starts in starts_by_length.items()
        ]
        in_image = torch.zeros(rows * tokens, dtype=torch.bool)
        in_image[torch.cat([group.flatten().cpu() for group in self.groups])] = True
        self.padding = (~in_image).nonzero().squeeze(1).to(device)
        order = torch.cat([*(group.flatten() for group in self.groups), self.padding])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(len(order), device=order.device)
        self.shape = (rows, tokens)

    def __call__(self, query, key, value, dropout: float, scaling: float) -> torch.Tensor:
        """(R, heads, T, head_dim) each -> the attention output (R, T, heads, head_dim), as the interface returns."""
        rows, heads, tokens, head_dim = query.shape
        flat = [x.transpose(1, 2).reshape(rows * tokens, heads, head_dim) for x in (query, key, value)]
        pieces = []
        for index in self.groups:
            q, k, v = (x[index].transpose(1, 2) for x in flat)  # (images, heads, length, head_dim)
            out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
            pieces.append(out.transpose(1, 2).reshape(-1, heads, head_dim))
        pieces.append(flat[2][self.padding])
        return torch.cat(pieces)[self.inverse].view(rows, tokens, heads, head_dim)


class VisionTransformerAttention(nn.Module):
    """Multi-head self-attention (MSA, Appendix A of the paper) with separate q/k/v/o projections."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(dim, dim)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, heads, T, head_dim)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # sdpa/flash/flex never materialise the weights; when the caller asks for them, this call runs eager instead
        # of returning None (which is what transformers does since v5).
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        segments = kwargs.pop("packed_segments", None)  # packed rows under sdpa: each image alone, no mask
        if segments is not None:
            attn_output = segments(query, key, value, dropout, self.scaling).reshape(*input_shape, -1)
            return self.o_proj(attn_output), None
        implementation = self.config._attn_implementation
        wants_weights = kwargs.get("output_attentions", self.config.output_attentions)
        attention_interface: Callable = eager_attention_forward
        if implementation not in (None, "eager") and not wants_weights:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,  # None, or additive (B, 1, 1, T): padded keys at the dtype's minimum
            dropout=dropout,
            scaling=self.scaling,
            **{k: v for k, v in kwargs.items() if k != "output_attentions"},
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, D)
        return self.o_proj(attn_output), attn_weights


class VisionTransformerMLP(nn.Module):
    """The block's two-layer MLP with a GELU (or the configured) non-linearity."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VisionTransformerLayerScale(nn.Module):
    """Per-channel scaling of a residual branch (LayerScale, Touvron et al. 2021), as DINOv2 uses."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class VisionTransformerLayer(GradientCheckpointingLayer):
    """One pre-LN block: Eq. 2 (MSA with residual) then Eq. 3 (MLP with residual)."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VisionTransformerAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionTransformerMLP(config)
        use_scale = config.layer_scale_init_value is not None
        self.layer_scale1 = VisionTransformerLayerScale(config) if use_scale else nn.Identity()
        self.layer_scale2 = VisionTransformerLayerScale(config) if use_scale else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(self.layer_scale1(attn_output))  # Eq. 2
        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        return hidden_states + self.dropout(self.layer_scale2(mlp_output))  # Eq. 3


class VisionTransformerAttentionPoolingHead(nn.Module):
    """Multi-head attention pooling ("MAP", big_vision; SigLIP's head): a learned probe attends to all tokens."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionTransformerMLP(config)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        padding = None if token_mask is None else ~token_mask  # (B, T), True = not attended to
        pooled = self.attention(probe, hidden_states, hidden_states, key_padding_mask=padding, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class VisionTransformerPooler(nn.Module):
    """A dense layer and an activation on the pooled vector (`config.pooler_act`): transformers' ViTModel pooler, where
    the ImageNet-21k checkpoints keep their pre-logits layer."""

    def __init__(self, config: VisionTransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(pooled))


class VisionTransformerPreTrainedModel(PreTrainedModel):
    config_class = VisionTransformerConfig
    config: VisionTransformerConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionTransformerEmbeddings", "VisionTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": VisionTransformerLayer, "attentions": VisionTransformerAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal weights and zero biases (as timm and transformers' ViT); zero-initialised classifier."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(
            module.weight, torch.nn.UninitializedParameter
        ):
            if getattr(module, "_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VisionTransformerEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            for token in (module.cls_token, module.register_tokens):
                if token is not None:
                    init.trunc_normal_(token, mean=0.0, std=std)
        elif isinstance(module, VisionTransformerLayerScale):
            init.constant_(module.lambda1, self.config.layer_scale_init_value)
        elif isinstance(module, VisionTransformerAttentionPoolingHead):
            init.trunc_normal_(module.probe, mean=0.0, std=std)
            init.xavier_uniform_(module.attention.in_proj_weight)
            init.zeros_(module.attention.in_proj_bias)

    # Modules that a checkpoint of another task may lack: loading an encoder into a classifier gives a new head.
    _new_head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: VisionTransformerConfig, *inputs, **kwargs):
        # by model type: with trust_remote_code the config class may come from another copy of this file
        if getattr(config, "model_type", None) != VisionTransformerConfig.model_type or not hasattr(
            config, "check_fields"
        ):
            raise TypeError(
                f"{type(self).__name__} takes a VisionTransformerConfig, got {type(config).__name__}. Build one with "
                "VisionTransformerConfig(...) or VisionTransformerConfig.from_preset('vit-b16'); a transformers "
                "ViT/CLIP/SigLIP/DINOv2 checkpoint converts with vlm-vision's converters (vlm-vision-convert)."
            )
        if inputs or kwargs:
            unknown = [*map(repr, inputs), *kwargs]
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {', '.join(unknown)}: it takes only its config. "
                + (config._unknown_fields_message(sorted(kwargs)) if kwargs else "")
            )
        config.check_fields()  # fields may have been set one by one since the config was made
        super().__init__(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_keys: bool = False, **kwargs):
        """transformers' `from_pretrained`, stricter about what the checkpoint holds.

        - A weight of another shape raises `CheckpointMismatchError` listing every such key (transformers raises a
          RuntimeError pointing at its log); `ignore_mismatched_sizes=True` re-initialises them instead.
        - A weight the checkpoint lacks raises `CheckpointMismatchError` listing the missing keys (transformers
          initialises them afresh with a log line). Exception: a classifier's head when the checkpoint has none
          of it (an encoder loaded into `...ForImageClassification`), which starts zero-initialised, as in
          transformers. `allow_missing_keys=True` (or the class attribute `_keys_to_ignore_on_load_missing`)
          accepts missing weights, freshly initialised.
        - A position-embedding table made for another grid is resampled (Sec. 3.2), never re-initialised.
        - A truncated or empty weight file raises `CheckpointFileError` naming it.
        """
        with allowing_missing_keys(allow_missing_keys):
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        _warn_if_processor_keeps_other_modes(pretrained_model_name_or_path, model.config)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, except that a file in the way raises (transformers logs and returns)."""
        if os.path.isfile(save_directory):
            raise FileExistsError(f"{save_directory} is a file: save_pretrained writes a folder; choose another path.")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        """Load as transformers does, but check the files first and resample a position-embedding table made for
        another grid.

        transformers would report a size mismatch (or re-initialise it with `ignore_mismatched_sizes=True`); the paper
        (Sec. 3.2) interpolates the pre-trained table instead, which is what happens here.
        """
        check_weight_files(checkpoint_files)
        state_dict = _resample_checkpoint_position_embeddings(model, state_dict, checkpoint_files)
        if state_dict is not None:
            checkpoint_files = None
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        """Refuse a checkpoint of another shape, or one that lacks weights, with the keys in the message
        (transformers only points at its log)."""
        raise_on_mismatched_shapes(model, load_config, loading_info)
        loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        missing = set(loading_info.missing_keys)
        head = {k for k in model.state_dict() if k.startswith(model._new_head_prefixes)}
        if head and head <= missing:  # an encoder checkpoint: the head is new, as the task is
            source = load_config.pretrained_model_name_or_path or "state dict"
            logger.info(f"{type(model).__name__}: a new head {sorted(head)} (the checkpoint {source} has none).")
            missing -= head
        raise_on_missing_keys(
            model, load_config, missing, "don't override fields such as pooling, pooler_act or num_register_tokens"
        )
        return loading_info


@contextlib.contextmanager
def allowing_missing_keys(allow: bool):
    """Within: `raise_on_missing_keys` accepts missing weights (for `from_pretrained(..., allow_missing_keys=True)`,
    whose loading hooks are static methods)."""
    if not isinstance(allow, bool):
        raise TypeError(f"allow_missing_keys must be True or False, got {allow!r}.")
    token = _ALLOW_MISSING_KEYS.set(allow)
    try:
        yield
    finally:
        _ALLOW_MISSING_KEYS.reset(token)


def raise_on_mismatched_shapes(model, load_config, loading_info) -> None:
    """Refuse a checkpoint with weights of another shape, every such key in the message (transformers only points at
    its log), unless `ignore_mismatched_sizes=True`."""
    if not loading_info.mismatched_keys or load_config.ignore_mismatched_sizes:
        return
    source = load_config.pretrained_model_name_or_path or "state dict"
    lines = sorted(
        f"  {key}: checkpoint {tuple(old)} vs model {tuple(new)}" for key, old, new in loading_info.mismatched_keys
    )
    raise CheckpointMismatchError(
        f"The checkpoint {source} has weights of another shape than this {type(model).__name__}:\n"
        + "\n".join(lines)
        + "\nLoad it with its own config.json (don't override sizes such as hidden_size or intermediate_size), or "
        "pass ignore_mismatched_sizes=True to re-initialise these weights."
    )


def raise_on_missing_keys(model, load_config, missing, hint: str) -> None:
    """Refuse a checkpoint that lacks weights of the model (transformers initialises them afresh with a log line),
    unless loading within `allowing_missing_keys(True)`; `hint` names the config fields that change the weights."""
    if not missing or _ALLOW_MISSING_KEYS.get():
        return
    source = load_config.pretrained_model_name_or_path or "state dict"
    raise CheckpointMismatchError(
        f"The checkpoint {source} lacks {len(missing)} weight(s) of this {type(model).__name__}: {sorted(missing)}. "
        f"It was saved by another architecture or config, or a save did not finish. Load it with its own config.json "
        f"({hint}), or pass allow_missing_keys=True to initialise them afresh."
    )


def check_weight_files(checkpoint_files) -> None:
    """Open every safetensors file's header, so that a truncated or empty file is named with the fix."""
    if not checkpoint_files:
        return
    from safetensors import SafetensorError, safe_open

    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            size = os.path.getsize(file) if os.path.exists(file) else 0
            raise CheckpointFileError(
                f"Cannot read the weights in {file} ({size} bytes: {error}): the file is truncated or corrupt, as "
                "after an interrupted save or download. Save or download the checkpoint again."
            ) from error


def _warn_if_processor_keeps_other_modes(folder, config) -> None:
    """Folders written before vlm-vision saved `do_convert_rgb` give grayscale/RGBA images to the model as 1 or 4
    channels, which transformers' ViT image processor then fails to normalise: say how to fix the folder."""
    path = os.path.join(str(folder), "preprocessor_config.json")
    if config.num_channels != 3 or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    if (
        isinstance(saved, dict)
        and saved.get("image_processor_type") == "ViTImageProcessor"
        and saved.get("do_convert_rgb") is None
    ):
        logger.warning_once(
            f"{path} does not convert images to RGB: AutoImageProcessor.from_pretrained({str(folder)!r}) fails on "
            'grayscale, RGBA and palette images. Add "do_convert_rgb": true to that file (`vlm-vision-create-'
            "checkpoint --upgrade FOLDER` does it), or pass do_convert_rgb=True when loading the processor."
        )


def _forward_kwargs() -> frozenset[str]:
    """What `forward` accepts besides its own arguments: transformers' shared kwargs (`output_hidden_states`,
    `return_dict`, attention options) and `image_sizes`, which transformers' LLaVA-family models pass to any tower."""
    from transformers.utils.generic import TransformersKwargs

    names = {k for c in TransformersKwargs.__mro__ for k in getattr(c, "__annotations__", {})}
    native = {"pixel_attention_mask", "spatial_shapes", "patch_image_ids"}
    return frozenset(names | native | {"pixel_values", "interpolate_pos_encoding", "return_dict", "image_sizes"})


def _check_forward_kwargs(module, args, kwargs) -> None:
    unknown = sorted(set(kwargs) - _forward_kwargs())
    if unknown:
        raise TypeError(
            f"{type(module).__name__}.forward got unexpected keyword arguments {unknown}: it takes pixel_values, "
            "interpolate_pos_encoding, pixel_attention_mask, spatial_shapes, patch_image_ids, output_hidden_states, "
            "output_attentions and return_dict."
        )
    for name in ("output_attentions", "return_dict"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], bool):
            raise TypeError(f"{name} must be True, False or None, got {kwargs[name]!r}.")
    selected = kwargs.get("output_hidden_states")
    if selected is None or isinstance(selected, bool):
        return
    num_states = module.config.num_hidden_layers + 1
    indices = _layer_indices(selected, "output_hidden_states")
    if any(not -num_states <= i < num_states for i in indices):
        raise ValueError(
            f"output_hidden_states={selected!r} is out of range: this model has {num_states} hidden states (indices "
            f"{-num_states}..{num_states - 1}); pass True for all of them."
        )


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def _resample_checkpoint_position_embeddings(model, state_dict, checkpoint_files):
    """The state dict to load with any position-embedding table resampled to the model's grid; `state_dict` unchanged
    (None when loading from files) when nothing needs resampling."""
    targets = {name: p for name, p in model.named_parameters() if name.endswith(POSITION_EMBEDDING_SUFFIX)}
    if not targets:
        return state_dict
    if state_dict is None:
        if not checkpoint_files or not all(f.endswith(".safetensors") for f in checkpoint_files):
            return None
        from safetensors import safe_open

        shapes = {}
        for file in checkpoint_files:
            with safe_open(file, framework="pt") as handle:
                shapes.update(
                    {k: handle.get_slice(k).get_shape() for k in handle.keys() if k.endswith(POSITION_EMBEDDING_SUFFIX)}  # noqa: SIM118
                )
        if all(tuple(shape) == tuple(p.shape) for shape in shapes.values() for p in targets.values()):
            return None
        from safetensors.torch import load_file

        state_dict = {}
        for file in checkpoint_files:
            state_dict.update(load_file(file))
    config = model.config
    old_grid = _checkpoint_grid(checkpoint_files)
    resampled = dict(state_dict)
    for key, value in state_dict.items():
        if not key.endswith(POSITION_EMBEDDING_SUFFIX):
            continue
        target = next(iter(targets.values()))
        if tuple(value.shape) == tuple(target.shape):
            continue
        if value.shape[-1] != target.shape[-1]:
            raise ValueError(
                f"Checkpoint position embeddings {key} have width {value.shape[-1]} but the model's hidden_size is "
                f"{target.shape[-1]}: this checkpoint belongs to another architecture."
            )
        num_prefix = int(config.use_class_token)
        grid = old_grid or infer_square_grid(value.shape[1] - num_prefix)
        logger.info(f"Resampling {key} from grid {grid} to {config.grid_size} ({config.interpolation_mode}).")
        resampled[key] = resample_for_config(value, config, new_grid=config.grid_size, old_grid=grid)
    return resampled


def _checkpoint_grid(checkpoint_files) -> tuple[int, int] | None:
    """The patch grid of the config.json saved next to the checkpoint, so non-square tables resample correctly."""
    if not checkpoint_files:
        return None
    path = os.path.join(os.path.dirname(checkpoint_files[0]), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    try:
        saved_config = VisionTransformerConfig(
            image_size=saved.get("image_size", 224), patch_size=saved.get("patch_size", 16)
        )
    except (ValueError, TypeError):
        return None
    return saved_config.grid_size


class VisionTransformerModel(VisionTransformerPreTrainedModel):
    """The ViT encoder: per-patch tokens and the pooled ([CLS]) representation.

    Outputs (`BaseModelOutputWithPooling`):
        last_hidden_state: `(B, num_prefix_tokens + N, D)`, after the final LayerNorm (before it with
            `final_norm="pooled"`, as CLIP's `last_hidden_state`).
        pooler_output: `(B, D)`: LN(z_L^0) for `pooling="cls"` (Eq. 4), else the mean or attention pool; then the
            dense pooler when `pooler_act` is set.
        hidden_states (with `output_hidden_states=True`): L + 1 tensors `(B, T, D)` in transformers' convention:
            index 0 is the input of the first block (embeddings, after `pre_norm` if any), index i the output of
            block i, index -1 the last block's output *before* the final LayerNorm, and -2 the penultimate block's
            output (the layer LLaVA-style VLMs take). `output_hidden_states` may also be an index or a list.
        attentions (with `output_attentions=True`): L tensors `(B, heads, T, T)`, computed eagerly even when the model
            runs sdpa.

    To get intermediate layers without running the blocks after them, use `get_intermediate_layers`.
    """

    def __init__(self, config: VisionTransformerConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.embeddings = VisionTransformerEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList([VisionTransformerLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = VisionTransformerAttentionPoolingHead(config) if config.pooling == "map" else None
        self.pooler = VisionTransformerPooler(config) if config.pooler_act is not None else None
        self.post_init()
        # before transformers' output capturing reads them: a misspelt or mistyped option fails here, named
        self.register_forward_pre_hook(_check_forward_kwargs, with_kwargs=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def check_pixel_values(
        self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool | None = None
    ) -> None:
        """Reject inputs the model cannot embed, with the fix in the message."""
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) tensor.")
        if not isinstance(pixel_values, torch.Tensor):
            kind = type(pixel_values).__module__.split(".")[0] + "." + type(pixel_values).__name__
            hint = (
                "torch.from_numpy(array) for a float array"
                if kind.startswith("numpy.")
                else "torch.tensor(...) for nested lists"
                if isinstance(pixel_values, (list, tuple))
                else "pass images through the image processor first"
            )
            raise TypeError(
                f"pixel_values must be a torch.Tensor (batch, channels, height, width), got {kind}: {hint}, or use "
                'AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt").'
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}, but the model takes normalised float pixel values: "
                "raw pixels (0-255) must be rescaled and normalised by the image processor "
                '(processor(images, return_tensors="pt")), or convert with .float() if they already are.'
            )
        if pixel_values.dim() != 4:
            hint = (
                " Add a batch dimension with pixel_values[None] for a single image; patchified (batch, patches, "
                "channels * patch_h * patch_w) pixel values need spatial_shapes (batch, 2) with them, as the image "
                "processor's native-resolution mode (max_num_patches=...) returns."
                if pixel_values.dim() == 3
                else " Pass one (batch, channels, height, width) tensor."
            )
            raise ValueError(
                f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
                + hint
            )
        batch, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            hint = (
                " This looks like channels-last (B, H, W, C): use pixel_values.permute(0, 3, 1, 2)."
                if pixel_values.shape[-1] == self.config.num_channels
                else " Convert images to RGB (PIL: image.convert('RGB'); the image processor's do_convert_rgb=True)."
            )
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects num_channels={self.config.num_channels} "
                f"(shape {tuple(pixel_values.shape)}, read as (batch, channels, height, width)).{hint}"
            )
        if batch == 0:
            raise ValueError(f"pixel_values holds no image (shape {tuple(pixel_values.shape)}): pass at least one.")
        if interpolate_pos_encoding is not None and not isinstance(interpolate_pos_encoding, bool):
            raise TypeError(f"interpolate_pos_encoding must be True, False or None, got {interpolate_pos_encoding!r}.")
        patch_h, patch_w = self.config.patch_size_hw
        if height < patch_h or width < patch_w:
            raise ValueError(
                f"Image size {height}x{width} is smaller than one patch ({patch_h}x{patch_w}): resize it to at least "
                "the patch size (the image processor resizes to the model's image_size)."
            )
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size {patch_h}x{patch_w}: resize or crop "
                "to a multiple of the patch size."
            )

    def check_patch_inputs(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None,
        spatial_shapes,
    ) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """Check the native-resolution form; return each image's grid and the patch mask `(B, N)` (bool, None when
        no patch is padding)."""
        if spatial_shapes is None or not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            if spatial_shapes is None:
                raise ValueError(
                    f"pixel_attention_mask was given without spatial_shapes (pixel_values {got}): the model needs each "
                    "image's (rows, columns) patch grid to place its position embeddings. Pass spatial_shapes from "
                    "the same image-processor call (native-resolution mode, max_num_patches=...)."
                )
            raise ValueError(
                f"pixel_attention_mask and spatial_shapes go with patchified pixel_values (batch, patches, channels * "
                f"patch_h * patch_w), got pixel_values {got}. (batch, channels, height, width) images have every "
                "patch valid: drop the mask and spatial_shapes, or preprocess with the image processor's "
                "max_num_patches=... mode."
            )
        if self.embeddings.patch_embeddings.backbone is not None:
            raise ValueError(
                "This is a hybrid ViT (a CNN backbone makes its patches), which needs whole (batch, channels, height, "
                "width) images: patchified pixel values with spatial_shapes cannot go through the backbone. Use the "
                "image processor's classic mode (max_num_patches=None)."
            )
        self._check_patch_values(pixel_values)
        batch, length, _ = pixel_values.shape
        if batch == 0:
            raise ValueError("pixel_values holds no image (batch 0): pass at least one.")
        shapes = torch.as_tensor(spatial_shapes)
        if shapes.dim() != 2 or shapes.shape != (batch, 2) or shapes.is_floating_point() or shapes.dtype == torch.bool:
            raise ValueError(
                f"spatial_shapes must be integers of shape (batch, 2) = ({batch}, 2), one (rows, columns) patch grid "
                f"per image, got {tuple(shapes.shape)} {shapes.dtype}: pass the image processor's spatial_shapes."
            )
        grids = self._checked_grids(shapes, length)
        counts = torch.tensor([h * w for h, w in grids], device=pixel_values.device)
        expected_mask = torch.arange(length, device=pixel_values.device)[None, :] < counts[:, None]  # (B, N)
        if pixel_attention_mask is not None:
            mask = pixel_attention_mask
            if not isinstance(mask, torch.Tensor) or mask.shape != (batch, length) or mask.is_floating_point():
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"pixel_attention_mask must be a (batch, patches) = ({batch}, {length}) tensor of 0/1 or bools, "
                    f"one per patch row of pixel_values, got {got}: pass the image processor's pixel_attention_mask."
                )
            mask = mask.to(device=pixel_values.device) != 0
            wrong = (mask != expected_mask).any(dim=1)
            if bool(wrong.any()):
                i = int(wrong.nonzero()[0, 0])
                grid_h, grid_w = grids[i]
                raise ValueError(
                    f"pixel_attention_mask[{i}] marks {int(mask[i].sum())} valid patches, but spatial_shapes[{i}] = "
                    f"({grid_h}, {grid_w}) holds {grid_h * grid_w}, which must come first, then padding. Pass "
                    "pixel_values, pixel_attention_mask and spatial_shapes from the same image-processor call (or "
                    "leave the mask out: it follows from spatial_shapes)."
                )
        if bool(expected_mask.all()):
            return grids, None
        implementation = self.config._attn_implementation
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(
                f"attn_implementation={implementation!r} cannot take this batch's padding mask in this model, so "
                "padded patches would be attended to. Load or set the model with attn_implementation='sdpa' (or "
                "'eager'), or batch images of one grid (no padding)."
            )
        return grids, expected_mask

    def _check_patch_values(self, pixel_values: torch.Tensor) -> None:
        """Patchified pixel values: float, with the model's C * P_h * P_w values per patch."""
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}; the model takes normalised float patches from the image "
                "processor."
            )
        width = pixel_values.shape[-1]
        patch_h, patch_w = self.config.patch_size_hw
        expected = self.config.num_channels * patch_h * patch_w
        if width != expected:
            raise ValueError(
                f"Patchified pixel_values have {width} values per patch, but this model's patches hold num_channels * "
                f"patch_h * patch_w = {self.config.num_channels} * {patch_h} * {patch_w} = {expected}: preprocess "
                f"with patch_size={self.config.patch_size} (the image processor's patch_size must be the model's)."
            )

    def _checked_grids(self, shapes: torch.Tensor, length: int) -> list[tuple[int, int]]:
        """`spatial_shapes` as (rows, columns) pairs, each within one row of `length` patches and within the position
        table's resampling range."""
        grids = [(int(h), int(w)) for h, w in shapes.tolist()]
        table_h, table_w = self.config.grid_size
        limit_h, limit_w = MAX_RESAMPLE_FACTOR * table_h, MAX_RESAMPLE_FACTOR * table_w
        for i, (grid_h, grid_w) in enumerate(grids):
            if grid_h < 1 or grid_w < 1 or grid_h * grid_w > length:
                raise ValueError(
                    f"spatial_shapes[{i}] = ({grid_h}, {grid_w}) does not fit the {length} patch rows of pixel_values: "
                    "a grid needs 1..patches rows x columns in patches (not pixels). Pass pixel_values and "
                    "spatial_shapes from the same image-processor call."
                )
            if grid_h > limit_h or grid_w > limit_w:
                raise ValueError(
                    f"spatial_shapes[{i}] = ({grid_h}, {grid_w}) stretches the {table_h}x{table_w} position table more "
                    f"than {MAX_RESAMPLE_FACTOR}x along a side: allowed grids are 1..{limit_h} rows and 1..{limit_w} "
                    "columns. Lower the image processor's max_num_patches, crop extreme aspect ratios, or use a "
                    "model whose image_size gives a larger table."
                )
        return grids

    def check_packed_inputs(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes,
        patch_image_ids: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> PackedLayout:
        """Check the packed native form (several images per row, `patch_image_ids`) and return its layout."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"patch_image_ids packs patchified images: pixel_values must be (rows, patches, channels * patch_h * "
                f"patch_w), got {got}. (batch, channels, height, width) images cannot be packed: preprocess with the "
                "image processor's max_num_patches=..., pack_images=True, or drop patch_image_ids."
            )
        if spatial_shapes is None:
            raise ValueError(
                "patch_image_ids was given without spatial_shapes: the model needs each image's (rows, columns) patch "
                "grid. Pass spatial_shapes (num_images, 2) from the same image-processor call (pack_images=True)."
            )
        if self.embeddings.patch_embeddings.backbone is not None:
            raise ValueError(
                "This is a hybrid ViT (a CNN backbone makes its patches): it cannot take patchified, packed images. "
                "Use the image processor's classic mode (max_num_patches=None, pack_images=False)."
            )
        implementation = self.config._attn_implementation
        flash = implementation is not None and "flash" in implementation
        if implementation not in (None, "eager", "sdpa") and not flash:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot keep packed images apart in this model (it takes no "
                "block-diagonal mask here), so images would attend to each other. Load or set the model with "
                "attn_implementation='sdpa' (or 'eager', or 'flash_attention_2' on a GPU), or use padded rows "
                "(pack_images=False)."
            )
        if flash and output_attentions:
            raise ValueError(
                "output_attentions=True computes the weights eagerly, which the flash-attention varlen path of packed "
                "images cannot give: set attn_implementation='eager' (or 'sdpa') for attention weights."
            )
        self._check_patch_values(pixel_values)
        rows, length, _ = pixel_values.shape
        if isinstance(patch_image_ids, torch.Tensor) and patch_image_ids.shape != (rows, length):
            raise ValueError(
                f"patch_image_ids must have the shape (rows, patches) = ({rows}, {length}) of pixel_values, one image "
                f"id per patch slot (-1 for padding), got {tuple(patch_image_ids.shape)}: pass the image processor's "
                "patch_image_ids (pack_images=True)."
            )
        return self.packed_layout(patch_image_ids, spatial_shapes, pixel_attention_mask)

    def packed_layout(self, patch_image_ids: torch.Tensor, spatial_shapes, pixel_attention_mask=None) -> PackedLayout:
        """Check `patch_image_ids` (rows, patches) against `spatial_shapes` (num_images, 2) and return where each
        image sits (`PackedLayout`)."""
        if not isinstance(patch_image_ids, torch.Tensor) or patch_image_ids.dim() != 2:
            got = (
                tuple(patch_image_ids.shape)
                if isinstance(patch_image_ids, torch.Tensor)
                else type(patch_image_ids).__name__
            )
            raise ValueError(
                f"patch_image_ids must be a (rows, patches) integer tensor, the image of each patch slot (-1 for "
                f"padding), got {got}: pass the image processor's patch_image_ids (pack_images=True)."
            )
        rows, length = patch_image_ids.shape
        ids = patch_image_ids
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"patch_image_ids must hold integers (the image of each patch slot, -1 for padding), got {ids.dtype}: "
                "pass the image processor's patch_image_ids (pack_images=True)."
            )
        shapes = torch.as_tensor(spatial_shapes)
        if shapes.dim() != 2 or shapes.shape[1:] != (2,) or shapes.is_floating_point() or shapes.dtype == torch.bool:
            raise ValueError(
                f"spatial_shapes must be integers of shape (num_images, 2), one (rows, columns) patch grid per packed "
                f"image, got {tuple(shapes.shape)} {shapes.dtype}: pass the image processor's spatial_shapes."
            )
        if shapes.shape[0] == 0:
            raise ValueError("spatial_shapes holds no image (0 grids): pack at least one image.")
        grids = self._checked_grids(shapes, length)
        ids = ids.cpu().long()
        if pixel_attention_mask is not None:
            mask = torch.as_tensor(pixel_attention_mask).cpu()
            if mask.shape != ids.shape or not torch.equal(mask != 0, ids >= 0):
                raise ValueError(
                    "pixel_attention_mask does not match patch_image_ids (-1 = padding): in the packed form the ids "
                    "already mark the padding; leave pixel_attention_mask out."
                )
        runs = []  # (row, image, first slot, patches) of every run of one id
        for row in range(rows):
            values, counts = torch.unique_consecutive(ids[row], return_counts=True)
            if bool((values[:-1] == -1).any()):
                after = int(values[1:][values[:-1] == -1][0])
                raise ValueError(
                    f"patch_image_ids[{row}] has padding (-1) before image {after}: a row holds its images first, then "
                    "its padding. Pack with the image processor (pack_images=True)."
                )
            starts = [0, *torch.cumsum(counts, 0).tolist()]
            runs += [
                (row, v, start, n)
                for v, start, n in zip(values.tolist(), starts[:-1], counts.tolist(), strict=True)
                if v != -1
            ]
        image_rows, patch_starts = [None] * len(grids), [None] * len(grids)
        for row, image, start, _ in runs:
            if not 0 <= image < len(grids):
                raise ValueError(
                    f"patch_image_ids[{row}] holds {image}, but spatial_shapes has {len(grids)} images: ids are "
                    f"0..{len(grids) - 1} (an index into spatial_shapes) and -1 for padding."
                )
            if image_rows[image] is not None:
                raise ValueError(
                    f"Image {image}'s patches are split (patch_image_ids rows {image_rows[image]} and {row}): each "
                    "image's patches must be one contiguous run in one row."
                )
            image_rows[image], patch_starts[image] = row, start
        for _, image, _, count in runs:
            grid_h, grid_w = grids[image]
            if count != grid_h * grid_w:
                raise ValueError(
                    f"patch_image_ids marks {count} patches of image {image}, but spatial_shapes[{image}] = "
                    f"({grid_h}, {grid_w}) holds {grid_h * grid_w}: pass pixel_values, patch_image_ids and "
                    "spatial_shapes from the same image-processor call."
                )
        missing = [i for i, row in enumerate(image_rows) if row is None]
        if missing:
            raise ValueError(
                f"spatial_shapes lists {len(grids)} images but patch_image_ids has no patch of image(s) {missing}: "
                "every image of spatial_shapes must be packed into some row."
            )
        return PackedLayout(grids, image_rows, patch_starts, self.num_prefix_tokens, rows, length)

    def unpack_image_tokens(self, hidden_states: torch.Tensor, patch_image_ids: torch.Tensor, spatial_shapes) -> list:
        """Per-image tokens of a packed output: token rows `(R, T, D)` (`last_hidden_state`, a hidden state, a layer
        of `get_intermediate_layers`) -> one `(num_prefix_tokens + h_i * w_i, D)` tensor per image of
        `spatial_shapes`, in that order: the image's [CLS]/registers, then its patches row-major, as for the image
        alone. (Patch-slot outputs `(R, L, D)`, from `drop_prefix_tokens=True`, need no helper:
        `features[patch_image_ids == i]` is image i's `(h_i * w_i, D)`.)"""
        layout = self.packed_layout(patch_image_ids, spatial_shapes)
        expected = (patch_image_ids.shape[0], layout.num_tokens)
        if not isinstance(hidden_states, torch.Tensor) or tuple(hidden_states.shape[:2]) != expected:
            got = (
                tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            )
            raise ValueError(
                f"unpack_image_tokens takes the packed token rows (rows, tokens, ...) = {expected} of this "
                f"patch_image_ids (each image's {self.num_prefix_tokens} prefix tokens included), got {got}: pass "
                "last_hidden_state, a hidden state or a get_intermediate_layers output of the same call."
            )
        return layout.split(hidden_states)

    def grid_size_for(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of the patch grid for these pixel values."""
        patch_h, patch_w = self.config.patch_size_hw
        return pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w

    def _embed(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z_0 and the token mask `(B, T)` (True = a real token; None when none is padding)."""
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_attention_mask is None and spatial_shapes is None:
            self.check_pixel_values(pixel_values, interpolate_pos_encoding)
            hidden_states = self.embeddings(
                pixel_values.to(dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding)
            )
            token_mask = None
        else:  # native resolution: the position table is resampled to each image's grid whatever the flag says
            if pixel_values is None:
                self.check_pixel_values(pixel_values)
            grids, patch_mask = self.check_patch_inputs(pixel_values, pixel_attention_mask, spatial_shapes)
            hidden_states = self.embeddings.forward_patches(pixel_values.to(dtype), grids)
            token_mask = None
            if patch_mask is not None:  # prefix tokens are always real
                prefix = patch_mask.new_ones(patch_mask.shape[0], self.num_prefix_tokens)
                token_mask = torch.cat([prefix, patch_mask], dim=1)
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        return hidden_states, token_mask

    def _embed_packed(
        self, pixel_values, spatial_shapes, patch_image_ids, pixel_attention_mask=None, output_attentions=False
    ) -> tuple[torch.Tensor, PackedLayout, torch.Tensor | None, dict]:
        """The packed form: z_0 (R, T, D), its layout, and what attention takes: each image's segment alone and no
        mask (sdpa), transformers' varlen kwargs and no mask (flash attention), or a block-diagonal additive mask
        (eager, and whenever the attention weights are asked for)."""
        layout = self.check_packed_inputs(
            pixel_values, spatial_shapes, patch_image_ids, pixel_attention_mask, output_attentions
        )
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings.forward_packed(pixel_values.to(dtype), layout)
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        implementation = self.config._attn_implementation
        if implementation is not None and "flash" in implementation:
            return hidden_states, layout, None, layout.flash_attention_kwargs(hidden_states.device)
        if implementation == "sdpa" and not output_attentions:
            return hidden_states, layout, None, {"packed_segments": layout.segment_attention(hidden_states.device)}
        return hidden_states, layout, layout.attention_mask(hidden_states.dtype, hidden_states.device), {}

    @staticmethod
    def _attention_mask(token_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, T) bool -> additive (B, 1, 1, T): 0 for real keys, the dtype's minimum for padded ones (eager adds it,
        sdpa takes it as its float `attn_mask`)."""
        if token_mask is None:
            return None
        mask = torch.zeros(token_mask.shape, dtype=dtype, device=token_mask.device)
        return mask.masked_fill(~token_mask, torch.finfo(dtype).min)[:, None, None, :]

    def pool(self, last_hidden_state: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pooler_output from `last_hidden_state` (B, T, D) -> (B, D); padded tokens (`token_mask` False) are left out.

        With `final_norm="all"` the tokens are already normalised; with `"pooled"` the final LayerNorm is applied to
        the pooled vector here (CLIP: LN(z_L^0); timm `fc_norm`: LN(mean of the patch tokens))."""
        if self.config.pooling == "cls":
            pooled = last_hidden_state[:, 0]  # y = LN(z_L^0), Eq. 4
        elif self.config.pooling == "mean" and token_mask is None:
            pooled = last_hidden_state[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.config.pooling == "mean":
            weights = token_mask[:, self.num_prefix_tokens :, None].to(last_hidden_state.dtype)  # (B, N, 1)
            patches = last_hidden_state[:, self.num_prefix_tokens :]
            pooled = (patches * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            pooled = self.head(last_hidden_state, token_mask)
        if self.config.final_norm == "pooled":
            pooled = self.layernorm(pooled)
        return self.pooler(pooled) if self.pooler is not None else pooled

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values: `(B, C, H, W)`; H and W equal `config.image_size` unless `interpolate_pos_encoding`. Or the
                native-resolution form `(B, N, C * P_h * P_w)`: each image's patches row-major on its own grid, then
                zero padding (the image processor with `max_num_patches`; transformers' Siglip2 layout).
            interpolate_pos_encoding: resample the position embeddings to the input's grid (Sec. 3.2). The native
                form always resamples them, per image.
            pixel_attention_mask: native form, `(B, N)` 1 for a patch, 0 for padding. Padded patches are never
                attended to and never pooled; their rows in the outputs hold no meaning. Optional: it follows from
                `spatial_shapes`, and is checked against it when given.
            spatial_shapes: native form, `(B, 2)` each image's (rows, columns) in patches. Required with that form.
            patch_image_ids: packed native form (the image processor's `pack_images=True`): `pixel_values` are then
                `(R, L, C * P_h * P_w)` rows each holding several images' patches one after another, then padding;
                `patch_image_ids` `(R, L)` gives each patch slot's image (an index into `spatial_shapes`, which is
                then `(num_images, 2)`), -1 for padding. Each image gets its own prefix tokens at the start of its
                segment and attends only within itself. `last_hidden_state` and `hidden_states` keep the packed
                layout `(R, T, D)` (`unpack_image_tokens` splits them per image); `pooler_output` is
                `(num_images, D)`, one per image. See `PackedLayout`.
        """
        if patch_image_ids is not None:
            wants_weights = kwargs.get("output_attentions") or self.config.output_attentions
            hidden_states, layout, attention_mask, varlen = self._embed_packed(
                pixel_values, spatial_shapes, patch_image_ids, pixel_attention_mask, bool(wants_weights)
            )
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask, **kwargs, **varlen)
            last_hidden_state = self.layernorm(hidden_states) if self.config.final_norm == "all" else hidden_states
            return BaseModelOutputWithPooling(
                last_hidden_state=last_hidden_state, pooler_output=self.pool(*layout.padded(last_hidden_state))
            )
        hidden_states, token_mask = self._embed(
            pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes
        )
        attention_mask = self._attention_mask(token_mask, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        last_hidden_state = self.layernorm(hidden_states) if self.config.final_norm == "all" else hidden_states
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=self.pool(last_hidden_state, token_mask)
        )

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        layers: int | Sequence[int] = -2,
        *,
        interpolate_pos_encoding: bool | None = None,
        apply_layernorm: bool = False,
        drop_prefix_tokens: bool = False,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Hidden states of the selected layers, running the blocks only up to the deepest one.

        Args:
            pixel_values: `(B, C, H, W)`, or the native form `(B, N, C * P_h * P_w)` with `spatial_shapes` (and
                optionally `pixel_attention_mask`), as in `forward`: padded patches are not attended to.
            layers: indices in the `hidden_states` convention (0 = embeddings, i = output of block i, -1 = last block,
                -2 = penultimate, the usual VLM feature layer).
            apply_layernorm: apply the final LayerNorm to each selected state (DINOv2's `norm=True`).
            drop_prefix_tokens: return only the patch tokens `(B, N, D)` (no [CLS], no registers).
            patch_image_ids: the packed form, as in `forward`. Each layer is then `(R, T, D)` in the packed token
                layout (`unpack_image_tokens` splits it per image); with `drop_prefix_tokens=True` it is `(R, L, D)`,
                each patch token back at its input slot (`features[patch_image_ids == i]` is image i's patches).

        Returns:
            One `(B, T, D)` (or `(B, N, D)`) tensor per requested index, in the order asked.
        """
        _check_flags(apply_layernorm=apply_layernorm, drop_prefix_tokens=drop_prefix_tokens)
        indices = _layer_indices(layers, "layers")
        num_states = self.config.num_hidden_layers + 1
        if not indices or any(not -num_states <= i < num_states for i in indices):
            raise ValueError(
                f"layers={layers} is out of range: this model has {num_states} hidden states (indices "
                f"{-num_states}..{num_states - 1}; 0 = embeddings, -1 = last block)."
            )
        resolved = [i % num_states for i in indices]
        layout, varlen = None, {}
        if patch_image_ids is not None:
            hidden_states, layout, attention_mask, varlen = self._embed_packed(
                pixel_values, spatial_shapes, patch_image_ids, pixel_attention_mask
            )
        else:
            hidden_states, token_mask = self._embed(
                pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes
            )
            attention_mask = self._attention_mask(token_mask, hidden_states.dtype)
        states = {0: hidden_states}
        for depth, layer in enumerate(self.layers[: max(resolved)], start=1):
            hidden_states = layer(hidden_states, attention_mask, **varlen)
            states[depth] = hidden_states
        outputs = []
        for i in resolved:
            state = self.layernorm(states[i]) if apply_layernorm else states[i]
            if drop_prefix_tokens:
                state = layout.patch_slots(state) if layout is not None else state[:, self.num_prefix_tokens :]
            outputs.append(state)
        return tuple(outputs)

    def patch_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The patch tokens of a `(B, T, D)` sequence, without [CLS] and registers: `(B, N, D)`."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            is_tensor = isinstance(hidden_states, torch.Tensor)
            got = tuple(hidden_states.shape) if is_tensor else type(hidden_states).__name__
            raise ValueError(
                f"patch_tokens takes a (batch, tokens, hidden_size) tensor such as outputs.last_hidden_state or a "
                f"hidden state, got {got}."
            )
        if hidden_states.shape[1] <= self.num_prefix_tokens or hidden_states.shape[2] != self.config.hidden_size:
            raise ValueError(
                f"patch_tokens got shape {tuple(hidden_states.shape)}, but this model's sequences are "
                f"{self.num_prefix_tokens} prefix tokens then the patches, {self.config.hidden_size} wide: pass "
                "outputs.last_hidden_state (or a hidden state) of this model, not patch tokens or pooled outputs."
            )
        return hidden_states[:, self.num_prefix_tokens :]

    # timm's model contract (timm.models.vision_transformer.VisionTransformer), for users and libraries built on it.

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **native
    ) -> torch.Tensor:
        """timm's `forward_features`: the token sequence after the blocks, `(B, num_prefix_tokens + N, D)`; the same
        tensor as `last_hidden_state` (timm applies its final `norm` here, as `final_norm="all"` does; with
        `final_norm="pooled"` the norm acts on the pooled vector, like timm's `fc_norm`, in `forward_head`).
        `native`: `pixel_attention_mask` and `spatial_shapes` for the native-resolution form, as in `forward`."""
        return self(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **native).last_hidden_state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's `forward_head` on `forward_features`' output: the pooled vector `(B, D)` (`pooler_output`). An
        encoder has no classifier (timm's `num_classes=0`), so `pre_logits` changes nothing here. It sees no padding
        mask: for the native-resolution form take `pooler_output`, which leaves padded patches out."""
        self.patch_tokens(x)  # checks the shape
        return self.pool(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
    ):
        """timm's `forward_intermediates`: the outputs of chosen blocks, and the final features.

        Args:
            x: pixel values `(B, C, H, W)`.
            indices: as timm, over the blocks (0 = the first block's output, i.e. `hidden_states[1]`): None for
                every block, an int n for the last n blocks, a sequence for those blocks (negative from the end).
            return_prefix_tokens: pair each intermediate with its prefix tokens `(B, num_prefix_tokens, D)` (when the
                model has any).
            norm: apply the final LayerNorm to each intermediate.
            stop_early: run no block after the deepest one asked for (the final features are then the normalised
                output of that block, as in timm).
            output_fmt: `"NCHW"`: patch tokens as a `(B, D, grid_h, grid_w)` map; `"NLC"`: `(B, N, D)`.
            intermediates_only: return only the list of intermediates.
            interpolate_pos_encoding: as in `forward`, for inputs of another size.
            pixel_attention_mask, spatial_shapes: the native-resolution form, as in `forward` (with
                `output_fmt="NLC"`: images of different grids make no one feature map).

        Returns:
            `(final_features, intermediates)`, or `intermediates`: a list in block order, each as `output_fmt`, or
            `(patches, prefix_tokens)` pairs with `return_prefix_tokens`. `final_features` is `forward_features`'.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}; use 'NCHW' (a feature map per layer) or 'NLC' (tokens).")
        if patch_image_ids is not None:
            raise ValueError(
                "forward_intermediates does not take packed images (patch_image_ids): timm's layout has one image "
                "per row. Use get_intermediate_layers(pixel_values, layers, spatial_shapes=..., patch_image_ids=...) "
                "and unpack_image_tokens, or padded rows (pack_images=False)."
            )
        _check_flags(
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            stop_early=stop_early,
            intermediates_only=intermediates_only,
        )
        num_blocks = self.config.num_hidden_layers
        if indices is None:
            take = list(range(num_blocks))
        elif _is_index(indices):
            count = operator.index(indices)
            if not 0 < count <= num_blocks:
                raise ValueError(
                    f"indices={indices}: an int takes the last n blocks, so it must be in 1..{num_blocks} (this model "
                    f"has {num_blocks} blocks); pass a list such as [-2] for single blocks."
                )
            take = list(range(num_blocks - count, num_blocks))
        else:
            requested = _layer_indices(indices, "indices")
            if not requested or any(not -num_blocks <= i < num_blocks for i in requested):
                raise ValueError(
                    f"indices={indices} is out of range: this model has {num_blocks} blocks (indices "
                    f"{-num_blocks}..{num_blocks - 1}; 0 = the first block's output)."
                )
            take = [i % num_blocks for i in requested]
        native = pixel_attention_mask is not None or spatial_shapes is not None
        if native and output_fmt == "NCHW":
            raise ValueError(
                "output_fmt='NCHW' makes one (B, D, grid_h, grid_w) map, which images of their own grids (the "
                "native-resolution form) do not share: pass output_fmt='NLC' and use spatial_shapes to reshape each."
            )
        hidden_states, token_mask = self._embed(x, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        attention_mask = self._attention_mask(token_mask, hidden_states.dtype)
        grid_h, grid_w = (0, 0) if native else self.grid_size_for(x)
        blocks = self.layers[: max(take) + 1] if stop_early else self.layers
        intermediates = []
        for index, layer in enumerate(blocks):
            hidden_states = layer(hidden_states, attention_mask)
            if index in take:
                intermediates.append(self.layernorm(hidden_states) if norm else hidden_states)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":  # (B, N, D) -> (B, D, grid_h, grid_w), patches row-major
            intermediates = [
                y.reshape(y.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        final = self.layernorm(hidden_states) if self.config.final_norm == "all" or stop_early else hidden_states
        return final, intermediates

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's `reset_classifier`. An encoder has no classifier: only `num_classes=0` is accepted (the pooled
        features), and `global_pool` ('token'/'cls', 'avg'/'mean', or 'map' if the model has the MAP head) changes
        `pooler_output`."""
        if _checked_num_classes(num_classes):
            raise ValueError(
                f"{type(self).__name__} is an encoder without a classifier, so reset_classifier({num_classes}) has no "
                "head to replace: load VisionTransformerForImageClassification.from_pretrained(folder, "
                f"num_labels={num_classes}), or use vlm-vision's training.prepare_classifier."
            )
        if global_pool is not None:
            _set_pooling(self, global_pool)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's `set_grad_checkpointing`: transformers' (non-reentrant) activation checkpointing of every block."""
        _set_grad_checkpointing(self, enable)

    def no_weight_decay(self) -> set[str]:
        """timm's `no_weight_decay`: the parameters timm keeps out of weight decay by name (its `pos_embed`,
        `cls_token`, `reg_token`): position embeddings, [CLS] and register tokens. Biases and norms (1-D) are left
        out by the optimiser's own rule, as in timm."""
        return _no_weight_decay(self)


def _is_index(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _layer_indices(layers, name: str) -> list[int]:
    """An int or a sequence of ints (numpy and 0-d tensor ints too) as a list of Python ints; bools refused."""
    if _is_index(layers):
        return [operator.index(layers)]
    try:
        values = None if isinstance(layers, (str, bytes, dict)) else list(layers)
    except TypeError:
        values = None
    if values is None or not all(_is_index(i) for i in values):
        raise TypeError(f"{name} must be an int or a sequence of ints (e.g. -2 or [-2, -1]), got {layers!r}.")
    return [operator.index(i) for i in values]


def _checked_num_classes(num_classes) -> int:
    if not _is_index(num_classes) or operator.index(num_classes) < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier layer), got {num_classes!r}.")
    return operator.index(num_classes)


def _set_pooling(encoder: VisionTransformerModel, global_pool: str) -> None:
    """Switch `encoder`'s pooling to timm's `global_pool` name (or ours), as `reset_classifier` does in timm."""
    if global_pool not in GLOBAL_POOL_NAMES:
        raise ValueError(
            f"global_pool={global_pool!r} is not supported; use one of {sorted(GLOBAL_POOL_NAMES)} (timm's '' returns "
            "the unpooled tokens: that is forward_features)."
        )
    pooling = GLOBAL_POOL_NAMES[global_pool]
    if pooling == "map" and encoder.head is None:
        raise ValueError(
            "global_pool='map' needs the attention-pooling head, which this model does not have (as in timm, it "
            "cannot be added here): build the model with pooling='map'."
        )
    config_dict = {**encoder.config.to_dict(), "pooling": pooling}
    type(encoder.config).from_dict(config_dict)  # refuses e.g. 'token' without [CLS], naming the field
    encoder.config.pooling = pooling
    if pooling != "map":
        encoder.head = None


def _set_grad_checkpointing(model: PreTrainedModel, enable: bool) -> None:
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be True or False, got {enable!r}.")
    if enable:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()


def _no_weight_decay(model: nn.Module) -> set[str]:
    names = ("embeddings.position_embeddings", "embeddings.cls_token", "embeddings.register_tokens")
    return {name for name, _ in model.named_parameters() if name.endswith(names)}


class VisionTransformerForImageClassification(VisionTransformerPreTrainedModel):
    """ViT with a classification head on the pooled representation y.

    `config.classifier_head="mlp"`: the pre-training head, one hidden layer (`representation_size`, tanh) then a
    linear layer. `"linear"`: the fine-tuning head (Sec. 3.2), a single D x K layer. The final layer is
    zero-initialised in both, as in the reference code, so a fresh head starts from uniform predictions. With
    `num_labels=0` there is no final layer and `logits` are the pre-logits features (timm's `num_classes=0`).
    """

    _new_head_prefixes = ("classifier.", "pre_logits.")

    def __init__(self, config: VisionTransformerConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.num_labels = config.num_labels
        self.vit = VisionTransformerModel(config)
        if config.classifier_head == "mlp":
            features = config.representation_size or config.hidden_size
            self.pre_logits = nn.Sequential(nn.Linear(config.hidden_size, features), nn.Tanh())
        else:
            self.pre_logits = None
        self.classifier = self._new_classifier(config.num_labels)
        self.post_init()

    @property
    def num_features(self) -> int:
        """The width of the features the last layer reads (timm's `num_features`)."""
        return self.pre_logits[0].out_features if self.pre_logits is not None else self.config.hidden_size

    def _new_classifier(self, num_labels: int) -> nn.Module:
        if num_labels == 0:
            return nn.Identity()
        classifier = nn.Linear(self.num_features, num_labels)
        classifier._zero_init = True
        return classifier

    def get_input_embeddings(self) -> nn.Module:
        return self.vit.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self._head(outputs.pooler_output)  # pooled with the padding mask, if any
        loss = None
        if labels is not None:
            self._check_labels(labels, logits)
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _check_labels(self, labels, logits: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a torch.Tensor of class indices (batch,), got {type(labels).__name__}: "
                "torch.tensor(labels)."
            )
        if self.config.num_labels == 0:
            raise ValueError("This classifier has num_labels=0 (no last layer): it has no classes for a loss.")
        if labels.dim() == 0 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but the batch holds {logits.shape[0]} images: give one label "
                "per image."
            )
        if labels.is_floating_point():  # transformers reads float labels as regression or multi-label targets
            if self.config.problem_type == "single_label_classification":
                raise ValueError(
                    f"labels are {labels.dtype}, but this classifier's problem_type is single_label_classification "
                    "(set by its config or its first loss): class indices are integers, labels.long()."
                )
            if self.config.num_labels > 1 and labels.shape != logits.shape:
                raise ValueError(
                    f"float labels of shape {tuple(labels.shape)} are read as multi-label targets, which need the "
                    f"logits' shape {tuple(logits.shape)}; class indices are integers: labels.long()."
                )
        elif self.config.num_labels > 1:
            outside = (labels >= self.config.num_labels) | ((labels < 0) & (labels != -100))  # -100: ignored
            if bool(outside.any()):
                raise ValueError(
                    f"labels {sorted(set(labels[outside].tolist()))[:5]} are outside 0..{self.config.num_labels - 1} "
                    f"(num_labels={self.config.num_labels}); -100 marks an ignored image."
                )

    # timm's model contract (see VisionTransformerModel)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None
    ) -> torch.Tensor:
        """timm's `forward_features`: the encoder's token sequence `(B, num_prefix_tokens + N, D)`."""
        return self.vit.forward_features(pixel_values, interpolate_pos_encoding)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's `forward_head`: logits `(B, num_labels)` from `forward_features`' output; with `pre_logits=True` the
        features the last layer reads `(B, num_features)` (after the MLP head's tanh layer, if any)."""
        return self._head(self.vit.forward_head(x), pre_logits)

    def _head(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.pre_logits(pooled) if self.pre_logits is not None else pooled
        return features if pre_logits else self.classifier(features)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's `forward_intermediates` of the encoder (see `VisionTransformerModel.forward_intermediates`)."""
        return self.vit.forward_intermediates(x, *args, **kwargs)

    def get_classifier(self) -> nn.Module:
        """timm's `get_classifier`: the last layer (`nn.Identity` when `num_labels=0`)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's `reset_classifier`: a new last layer with `num_classes` outputs, zero-initialised like the paper's
        fine-tuning head (0: none, `logits` are the pre-logits features); `config.num_labels` follows, with generic
        `id2label` names when the count changes. `global_pool` ('token'/'cls', 'avg'/'mean', 'map' when the model
        has the MAP head) changes the pooling. The MLP head's hidden layer stays: for the paper's linear fine-tuning
        head use vlm-vision's `training.prepare_classifier(model, head="linear", ...)`."""
        num_classes = _checked_num_classes(num_classes)
        if global_pool is not None:
            _set_pooling(self.vit, global_pool)
            self.config.pooling = self.vit.config.pooling
        reference = self.vit.layernorm.weight
        classifier = self._new_classifier(num_classes).to(device=reference.device, dtype=reference.dtype)
        if num_classes:
            with torch.no_grad():
                classifier.weight.zero_()
                classifier.bias.zero_()
        self.classifier = classifier.train(self.training)
        self.config.num_labels = self.num_labels = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's `set_grad_checkpointing` (transformers' activation checkpointing of every block)."""
        _set_grad_checkpointing(self, enable)

    def no_weight_decay(self) -> set[str]:
        """timm's `no_weight_decay` (see `VisionTransformerModel.no_weight_decay`), with the `vit.` prefix."""
        return _no_weight_decay(self)


__all__ = [
    "CheckpointFileError",
    "CheckpointMismatchError",
    "VisionTransformerForImageClassification",
    "VisionTransformerModel",
    "VisionTransformerPreTrainedModel",
]
