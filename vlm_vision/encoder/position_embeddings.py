"""Resampling learned 1-D position embeddings to another patch grid (ViT paper, Sec. 3.2).

The paper fine-tunes at a higher resolution than it pre-trains: the patch size stays, so the sequence gets longer and
the pre-trained position embeddings "may no longer be meaningful". It therefore performs "2D interpolation of the
pre-trained position embeddings, according to their location in the original image". This module is that operation
as a pure function, used at run time (`interpolate_pos_encoding=True`), when a checkpoint is loaded into a config of
another image size, and by the converters.

This file imports only torch: it is copied next to the model code into saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact", "triangle")
# Each side of a resampled grid may be at most this many times the table's side (and at least 1 patch). Beyond it
# the table is stretched so far that neighbouring patches share one learned position: most likely `spatial_shapes`
# in pixels instead of patches, or a table too small for the inputs. SigLIP2 NaFlex's widest use, a 1 x 1024 grid
# from its 16 x 16 table, is 64x.
MAX_RESAMPLE_FACTOR = 64


def _grid(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be a (rows, columns) pair of ints, got {value!r}.")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {pair}.")
    return pair


def infer_square_grid(num_patches: int) -> tuple[int, int]:
    """The (side, side) grid of `num_patches` patches, or a ValueError when it is not a perfect square."""
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches <= 0:
        raise ValueError(f"Cannot infer the patch grid of {num_patches!r} position embeddings: need a positive count.")
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"Cannot infer the patch grid of {num_patches} position embeddings: it is not a perfect square. "
            "Pass the source grid explicitly (old_grid=(grid_h, grid_w))."
        )
    return side, side


def _triangle_weights(new: int, old: int) -> torch.Tensor:
    """(new, old) weights of an antialiased linear resize along one axis: a triangle filter at each output's centre
    in source coordinates (half-pixel convention), widened by the down-sampling factor, normalised over the source
    rows it covers. These are the weights of `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`
    and of PIL's BILINEAR."""
    scale = old / new
    support = max(scale, 1.0)
    center = (torch.arange(new, dtype=torch.float32) + 0.5) * scale - 0.5
    source = torch.arange(old, dtype=torch.float32)
    weights = (1 - (source[None, :] - center[:, None]).abs() / support).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def resample_position_embeddings(
    position_embeddings: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resample the patch part of a position-embedding table to another grid; prefix rows are kept as they are.

    The patch rows are laid out row-major on `old_grid`; they are reshaped to an image of D channels, interpolated to
    `new_grid` in float32 (bicubic in half precision is visibly wrong) and flattened back. Rows for prefix tokens
    ([CLS]) have no location, so they are copied untouched.

    Args:
        position_embeddings: `(1, P + H_old * W_old, D)` or `(P + H_old * W_old, D)` where P = `num_prefix_tokens`.
        new_grid: `(H_new, W_new)` target grid in patches.
        old_grid: `(H_old, W_old)` source grid; inferred as square when None.
        num_prefix_tokens: leading rows that are not patches (1 for [CLS], 0 for models without it).
        mode: `torch.nn.functional.interpolate` mode. "bicubic" (default) is what the reference implementations use.
            "triangle": antialiased bilinear as explicit separable weights (always antialiased; leave `antialias`
            False), the way transformers' Siglip2 `resize_positional_embeddings` computes it. Its weights are those
            of `F.interpolate(mode="bilinear", antialias=True)`, but that kernel (torch 2.13, CPU) was seen to give
            every row the first row's value for a one-column grid (a 4x4 table to 16x1) on some inputs and not on
            others of the same shape; explicit weights don't depend on it.
        antialias: anti-aliasing when down-sampling (bilinear/bicubic only). False matches transformers' and the
            original ViT fine-tuning code; timm's `resample_abs_pos_embed` uses True.

    Returns:
        Same layout and dtype as the input, with `P + H_new * W_new` rows.
    """
    if not isinstance(position_embeddings, torch.Tensor) or not position_embeddings.is_floating_point():
        got = position_embeddings.dtype if isinstance(position_embeddings, torch.Tensor) else type(position_embeddings)
        raise TypeError(f"position_embeddings must be a float torch.Tensor (1, T, D) or (T, D), got {got}.")
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"Unknown interpolation mode {mode!r}; use one of {INTERPOLATION_MODES}.")
    if not isinstance(antialias, bool):
        raise ValueError(f"antialias must be True or False, got {antialias!r}.")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"antialias=True needs mode 'bilinear' or 'bicubic', got {mode!r}.")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise ValueError(f"num_prefix_tokens must be an int (1 for [CLS], 0 without), got {num_prefix_tokens!r}.")
    new_grid = _grid(new_grid, "new_grid")
    squeeze = position_embeddings.dim() == 2
    table = position_embeddings.unsqueeze(0) if squeeze else position_embeddings
    if table.dim() != 3 or table.shape[0] != 1:
        raise ValueError(
            f"Expected position embeddings of shape (1, T, D) or (T, D), got {tuple(position_embeddings.shape)}."
        )
    if not 0 <= num_prefix_tokens <= table.shape[1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} is outside [0, {table.shape[1]}].")
    num_patches = table.shape[1] - num_prefix_tokens
    if num_patches == 0:
        raise ValueError(
            f"The table has {table.shape[1]} rows, all prefix rows (num_prefix_tokens={num_prefix_tokens}): there are "
            "no patch rows to resample."
        )
    old_grid = _grid(old_grid, "old_grid") if old_grid is not None else infer_square_grid(num_patches)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(
            f"old_grid={old_grid} holds {old_grid[0] * old_grid[1]} patches but the table has {num_patches} patch "
            f"rows (after {num_prefix_tokens} prefix rows)."
        )
    if new_grid == old_grid:
        return position_embeddings

    dim = table.shape[-1]
    prefix, patches = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    patches = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H_old, W_old)
    if mode == "triangle":  # (1, D, H_old, W_old) -> (1, D, H_new, W_new), rows then columns
        rows, cols = _triangle_weights(new_grid[0], old_grid[0]), _triangle_weights(new_grid[1], old_grid[1])
        patches = torch.einsum("ih,jw,ndhw->ndij", rows.to(patches.device), cols.to(patches.device), patches)
    else:
        align = False if mode in ("bilinear", "bicubic") else None
        patches = F.interpolate(patches, size=new_grid, mode=mode, align_corners=align, antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, H_new * W_new, D)
    out = torch.cat([prefix, patches.to(table.dtype)], dim=1)
    return out.squeeze(0) if squeeze else out
