"""Pixel-shuffle token reduction, then the LLaVA-1.5 MLP (the Idefics3 / InternVL / nanoVLM connector).

Each r x r block of neighbouring tokens on the patch grid becomes one token of r*r times the width (space-to-depth),
so a 4x6 grid with r=2 gives 2x3 = 6 tokens. Those go through the same two-layer MLP as ``MLPAdapter``:
Linear(D_vision * r^2, D_lm), GELU, Linear(D_lm, D_lm). (Idefics3 and nanoVLM use one bias-free linear layer after
the shuffle, InternVL LayerNorm + the two-layer MLP; the MLP is the LLaVA-1.5 finding applied here.)

Shapes: (B, grid_h * grid_w, D_vision) -> shuffle -> (B, (grid_h/r) * (grid_w/r), r*r*D_vision) -> MLP ->
(B, N', D_lm). Non-square grids are fine. A side not divisible by r (SigLIP-384's 27x27 with r=2) is zero-padded
at the bottom/right up to the next multiple (``uneven_grid="pad"``, the default: N' = ceil(h/r) * ceil(w/r)), or
refused with the fix named (``uneven_grid="refuse"``). Output tokens are row-major on the (ceil(h/r), ceil(w/r))
grid. Within a token, channels are ordered
``(dy, dx, d)``: the block's token at row offset dy, column offset dx fills channels
``[(dy * r + dx) * D, (dy * r + dx + 1) * D)``, i.e. the block read row-major. For square grids this is exactly
transformers' ``Idefics3Connector.pixel_shuffle`` (InternVL's version transposes the block, ``(dx, dy, d)``).
Parameters and init: as ``MLPAdapter`` (trunc-normal std 0.02 weights, zero biases), ``linear_1`` being D*r^2 wide.

Prefix tokens ([CLS], registers; the VLM's ``keep_prefix_tokens``) have no place on the grid: each one is tiled r*r
times, as if it filled a whole block, and goes through the same MLP (no parameters of its own), so
``linear_1`` sees it through the sum of its r*r weight blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import check_features, check_positive_int
from .mlp import MLPAdapter, MLPAdapterConfig

UNEVEN_GRIDS = ("pad", "refuse")


def check_grid_divisible(grid_h: int, grid_w: int, scale_factor: int) -> None:
    """Raises ValueError unless both grid sides are divisible by ``scale_factor``."""
    if grid_h % scale_factor or grid_w % scale_factor:
        raise ValueError(
            f"pixel_shuffle with scale_factor r={scale_factor} needs both sides of the patch grid divisible by "
            f"{scale_factor}, got grid {grid_h}x{grid_w}; resize the image so that each side is a multiple of "
            f"{scale_factor} patches, choose a scale_factor that divides both sides, or set uneven_grid='pad' in "
            "the adapter config (zero-pads the grid to the next multiple)"
        )


def pad_grid(image_features: torch.Tensor, grid_size: tuple[int, int], scale_factor: int):
    """Zero-pads a row-major (B, H*W, D) token grid at the bottom/right to sides divisible by ``scale_factor``.

    Returns the padded features (B, H'*W', D) and the padded grid (H', W'), H' = ceil(H/r) * r.
    """
    grid_h, grid_w = grid_size
    r = scale_factor
    padded_h, padded_w = math.ceil(grid_h / r) * r, math.ceil(grid_w / r) * r
    if (padded_h, padded_w) == (grid_h, grid_w):
        return image_features, (grid_h, grid_w)
    batch, _, dim = image_features.shape
    x = image_features.reshape(batch, grid_h, grid_w, dim)
    x = torch.nn.functional.pad(x, (0, 0, 0, padded_w - grid_w, 0, padded_h - grid_h))  # (B, H', W', D)
    return x.reshape(batch, padded_h * padded_w, dim), (padded_h, padded_w)


def pixel_shuffle(image_features: torch.Tensor, grid_size: tuple[int, int], scale_factor: int) -> torch.Tensor:
    """Space-to-depth on a token grid: (B, H*W, D) -> (B, (H/r)*(W/r), r*r*D), channels ordered (dy, dx, d).

    Args:
        image_features: (B, H*W, D), row-major on the (H, W) grid.
        grid_size: (H, W); both divisible by ``scale_factor``.
        scale_factor: r.
    """
    grid_h, grid_w = grid_size
    check_grid_divisible(grid_h, grid_w, scale_factor)
    batch, _, dim = image_features.shape
    r = scale_factor
    x = image_features.reshape(batch, grid_h // r, r, grid_w // r, r, dim)  # (B, H/r, dy, W/r, dx, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/r, W/r, dy, dx, D)
    return x.reshape(batch, (grid_h // r) * (grid_w // r), r * r * dim)  # (B, N', r*r*D)


@dataclass(kw_only=True)
class PixelShuffleAdapterConfig(MLPAdapterConfig):
    """Config of ``PixelShuffleAdapter``: the ``MLPAdapterConfig`` fields plus the ratio.

    Args:
        scale_factor: r, the side of the token block merged into one token (transformers' Idefics3 name); the token
            count drops by r^2. Default 2.
        uneven_grid: what a grid side not divisible by r does: ``"pad"`` (default) zero-pads the grid at the
            bottom/right to the next multiple of r; ``"refuse"`` raises, naming the fix.
    """

    adapter_type: str = field(default="pixel_shuffle", init=False)
    scale_factor: int = 2
    uneven_grid: str = "pad"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("scale_factor", self.scale_factor)
        if self.uneven_grid not in UNEVEN_GRIDS:
            raise ValueError(
                f"uneven_grid={self.uneven_grid!r} is not known; use one of {list(UNEVEN_GRIDS)} ('pad' zero-pads a "
                "grid whose side is not divisible by scale_factor, 'refuse' raises)"
            )


class PixelShuffleAdapter(MLPAdapter):
    """Pixel shuffle by r, then Linear(D_vision * r^2, D_lm), GELU, Linear(D_lm, D_lm)."""

    config_class = PixelShuffleAdapterConfig

    @staticmethod
    def _mlp_input_size(config: PixelShuffleAdapterConfig) -> int:
        return config.vision_hidden_size * config.scale_factor**2

    def _count_output_tokens(self, grid_h: int, grid_w: int) -> int:
        r = self.config.scale_factor
        if self.config.uneven_grid == "refuse":
            check_grid_divisible(grid_h, grid_w, r)
        return math.ceil(grid_h / r) * math.ceil(grid_w / r)

    def forward_prefix_tokens(self, prefix_features: torch.Tensor) -> torch.Tensor:
        """(B, P, D_vision) -> (B, P, D_lm): each prefix token tiled over a block, then the MLP (module docstring)."""
        check_features("prefix_features", prefix_features)
        if prefix_features.dim() != 3 or prefix_features.shape[-1] != self.config.vision_hidden_size:
            raise ValueError(
                f"prefix_features must be (batch, num_prefix_tokens, {self.config.vision_hidden_size}), got shape "
                f"{tuple(prefix_features.shape)}"
            )
        tiled = self._as_own_dtype(prefix_features).repeat(1, 1, self.config.scale_factor**2)
        return self._output(super().project(tiled, 1, prefix_features.shape[1]))

    def project(self, image_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        features, grid = pad_grid(image_features, (grid_h, grid_w), self.config.scale_factor)  # refused earlier if so
        shuffled = pixel_shuffle(features, grid, self.config.scale_factor)  # (B, N', r*r*D)
        return super().project(shuffled, grid_h, grid_w)
