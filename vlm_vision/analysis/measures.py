"""What a trained Vision Transformer has learned: Figure 7 of the ViT paper, and attention rollout.

Pure tensor functions (torch only, no model code, no plotting), computed in fp32 whatever the input dtype:

- :func:`patch_embedding_principal_components`: Fig. 7 (left) of Dosovitskiy et al. 2020, "An Image is Worth
  16x16 Words" (arXiv 2010.11929): the top principal components of the patch-embedding filters E.
- :func:`position_embedding_similarity`: Fig. 7 (centre): cosine similarity of each patch's position embedding
  with every other patch's.
- :func:`mean_attention_distance`: Fig. 7 (right): per layer and head, how far in input pixels a query patch looks,
  weighted by its attention ("attention distance", the analogue of a CNN's receptive field size).
- :func:`attention_rollout` and :func:`attention_rollout_map`: Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers" (arXiv 2005.00928): attention propagated through the layers, with the residual stream, as a map
  over the image for overlays (the ViT paper's Fig. 6 and 14 use it, Appendix D.8).

Shape convention, as the model lays out its tokens and as transformers returns them with ``output_attentions=True``
(vlm-vision's model computes them eagerly when asked, even under SDPA; other models may need
``attn_implementation="eager"``):

- ``L`` layers, ``B`` images, ``H`` heads, ``D`` hidden size, ``C`` input channels, ``(P_h, P_w)`` patch size;
- ``(grid_h, grid_w)`` patch grid, ``N = grid_h * grid_w`` patches;
- ``T = num_prefix_tokens + N`` tokens: the prefix tokens ([CLS], then register tokens, if any) come first, then the
  patches in row-major order, so token ``num_prefix_tokens + i * grid_w + j`` is patch ``(i, j)`` (row ``i`` from
  the top, column ``j`` from the left);
- attention weights ``(B, H, T, T)`` per layer, rows (queries) summing to 1 over the keys (last axis).

Inputs are checked once at these public functions; a wrong shape raises ``ValueError`` naming it and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "attention_rollout",
    "attention_rollout_map",
    "mean_attention_distance",
    "patch_embedding_principal_components",
    "patch_grid_coordinates",
    "position_embedding_similarity",
]

_HEAD_FUSIONS = ("mean", "max", "min")


# ---------------------------------------------------------------------------------------------------------------------
# Input checks (public boundary only)
# ---------------------------------------------------------------------------------------------------------------------


def _check_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7`` or ``(7, 9)`` -> ``(7, 9)``, both positive ints, else ValueError."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (height, width); got {value!r}.")
    return pair


def _check_num_prefix_tokens(num_prefix_tokens: int) -> None:
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(
            f"num_prefix_tokens must be an int >= 0 (1 for a [CLS] token, plus any register tokens); "
            f"got {num_prefix_tokens!r}."
        )


def _check_num_tokens(num_tokens: int, grid: tuple[int, int], num_prefix_tokens: int, what: str) -> None:
    expected = num_prefix_tokens + grid[0] * grid[1]
    if num_tokens != expected:
        raise ValueError(
            f"{what} has T={num_tokens} tokens, but num_prefix_tokens={num_prefix_tokens} + grid "
            f"{grid[0]}x{grid[1]} = {expected}. Pass grid_size=(image_height // patch_height, "
            f"image_width // patch_width) of the images the model saw, and the model's num_prefix_tokens "
            f"(1 for [CLS], plus register tokens; 0 without a class token)."
        )


def _check_attentions(attentions: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Accept L tensors (B, H, T, T) or one (L, B, H, T, T); return the L per-layer tensors (views, no copy)."""
    fix = (
        "Pass the `attentions` a transformers model returns with output_attentions=True (a sequence of L tensors "
        "(B, H, T, T)), or one tensor (L, B, H, T, T)"
    )
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() != 5:
            raise ValueError(
                f"attentions is one tensor of shape {tuple(attentions.shape)}; expected (L, B, H, T, T). {fix}; "
                f"for one layer (B, H, T, T) use [attn], for one image (H, T, T) use attn[None]."
            )
        layers = list(attentions.unbind(0))
    elif isinstance(attentions, Sequence) and len(attentions) > 0:
        layers = list(attentions)
    else:
        raise ValueError(f"attentions must be a non-empty sequence of tensors or a tensor; got {attentions!r}. {fix}.")

    for index, layer in enumerate(layers):
        if layer is None:
            raise ValueError(
                f"attentions[{index}] is None: SDPA attention does not return weights. Load or run the model with "
                f"attn_implementation='eager' and output_attentions=True."
            )
        if not isinstance(layer, torch.Tensor) or layer.dim() != 4 or layer.shape[-1] != layer.shape[-2]:
            shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
            raise ValueError(
                f"attentions[{index}] has shape {shape}; expected (B, H, T, T). {fix}; for one image (H, T, T) "
                f"use attn[None]."
            )
        if layer.shape != layers[0].shape:
            raise ValueError(
                f"attentions[{index}] has shape {tuple(layer.shape)} but attentions[0] has {tuple(layers[0].shape)}; "
                f"every layer must have the same (B, H, T, T): pass the layers of one forward pass."
            )
    return layers


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


def patch_grid_coordinates(
    grid_size: tuple[int, int], patch_size: int | tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Pixel centres of the patches of a grid, in the model's (row-major) token order.

    Args:
        grid_size: ``(grid_h, grid_w)``, patches per column and per row.
        patch_size: ``P`` or ``(P_h, P_w)``, in input pixels.
        device: Where to create the result.

    Returns:
        ``(N, 2)`` fp32, ``N = grid_h * grid_w``; row ``i * grid_w + j`` is ``((i + 0.5) * P_h, (j + 0.5) * P_w)``,
        the (y, x) pixel centre of patch ``(i, j)``. Euclidean distances between rows are distances in input pixels.
    """
    grid_h, grid_w = _check_pair(grid_size, "grid_size")
    patch_h, patch_w = _check_pair(patch_size, "patch_size")
    rows = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) * patch_h
    cols = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) * patch_w
    y, x = torch.meshgrid(rows, cols, indexing="ij")  # (grid_h, grid_w) each
    return torch.stack([y, x], dim=-1).reshape(grid_h * grid_w, 2)  # (N, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Figure 7: mean attention distance (right), position-embedding similarity (centre), filter PCA (left)
# ---------------------------------------------------------------------------------------------------------------------


def mean_attention_distance(
    attentions: torch.Tensor | Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Mean attention distance per layer and head, in input pixels (Fig. 7, right, of the ViT paper).

    For each query patch, the distance between its centre and each key patch's centre, weighted by the attention
    weight, summed over keys; then averaged over query patches and over images. The paper (Appendix D.7) uses 128
    images; a head with a small value attends locally, a large value means global attention.

    Only patch-to-patch attention counts: prefix tokens ([CLS], registers) have no position in the image, so they are
    dropped as queries and as keys, and each query's remaining weights are renormalised to sum to 1 (the distance is
    then a weighted mean over the patches it looks at, as in the reference analyses that exclude [CLS]). Uniform
    attention over all ``T`` tokens therefore gives the same value as uniform attention over the ``N`` patches. A
    query that puts all its weight on prefix tokens has no patch to measure and contributes 0.

    Args:
        attentions: ``L`` tensors ``(B, H, T, T)`` (``output_attentions=True``) or one tensor ``(L, B, H, T, T)``,
            ``T = num_prefix_tokens + grid_h * grid_w``.
        grid_size: ``(grid_h, grid_w)`` of the images the attentions came from.
        patch_size: ``P`` or ``(P_h, P_w)`` in input pixels; distances are scaled by it.
        num_prefix_tokens: Tokens before the patches (1 for [CLS], plus register tokens; 0 without a class token).

    Returns:
        ``(L, H)`` fp32 mean distances in pixels.
    """
    layers = _check_attentions(attentions)
    _check_num_prefix_tokens(num_prefix_tokens)
    grid = _check_pair(grid_size, "grid_size")
    _check_num_tokens(layers[0].shape[-1], grid, num_prefix_tokens, "attentions")

    coordinates = patch_grid_coordinates(grid, patch_size, device=layers[0].device)  # (N, 2)
    distances = torch.cdist(coordinates, coordinates)  # (N, N) pixels, query x key
    result = []
    for layer in layers:  # one layer at a time: never an fp32 copy of all L layers
        weights = layer[..., num_prefix_tokens:, num_prefix_tokens:].float()  # (B, H, N, N)
        mass = weights.sum(dim=-1)  # (B, H, N), weight on patches per query
        per_query = torch.einsum("bhqk,qk->bhq", weights, distances) / mass.clamp_min(torch.finfo(torch.float32).tiny)
        result.append(per_query.mean(dim=(0, 2)))  # (H,), over images and query patches
    return torch.stack(result)  # (L, H)


def position_embedding_similarity(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Cosine similarity between the position embeddings of all patch pairs (Fig. 7, centre, of the ViT paper).

    Args:
        position_embeddings: ``(1, T, D)`` (as stored in the model) or ``(T, D)``,
            ``T = num_prefix_tokens + grid_h * grid_w``; the prefix rows are dropped.
        grid_size: ``(grid_h, grid_w)`` the embeddings were trained for.
        num_prefix_tokens: Rows before the patches (1 for [CLS], plus register tokens; 0 without a class token).

    Returns:
        ``(grid_h, grid_w, grid_h, grid_w)`` fp32: ``out[i, j]`` is the ``grid_h x grid_w`` map of the similarity of
        patch ``(i, j)`` with every patch, one tile of the paper's figure. Symmetric, 1 on the diagonal; an all-zero
        embedding has similarity 0 with everything (itself included).
    """
    _check_num_prefix_tokens(num_prefix_tokens)
    grid = _check_pair(grid_size, "grid_size")
    embeddings = position_embeddings
    if embeddings.dim() == 3 and embeddings.shape[0] == 1:
        embeddings = embeddings[0]
    if embeddings.dim() != 2:
        raise ValueError(
            f"position_embeddings has shape {tuple(position_embeddings.shape)}; expected (1, T, D) or (T, D). "
            f"Pass the model's position-embedding parameter (its .data), not embedded tokens."
        )
    _check_num_tokens(embeddings.shape[0], grid, num_prefix_tokens, "position_embeddings")

    patches = F.normalize(embeddings[num_prefix_tokens:].float(), dim=-1)  # (N, D), unit rows
    similarity = patches @ patches.T  # (N, N)
    return similarity.reshape(grid[0], grid[1], grid[0], grid[1])  # (grid_h, grid_w, grid_h, grid_w)


def patch_embedding_principal_components(
    weight: torch.Tensor, num_components: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal components of the patch-embedding filters (Fig. 7, left, of the ViT paper: 28 components).

    The ``D`` filters are the rows of the flattened Conv2d weight, ``(D, C * P_h * P_w)`` (the paper's E, transposed).
    They are centred (the mean filter subtracted) and decomposed with an SVD; the right singular vectors are the
    components, largest variance first.

    Sign: a singular vector's sign is arbitrary, so each component is flipped to make its largest-magnitude element
    positive (the first such element on ties); repeated calls and other backends then agree.

    Display: each component is rescaled on its own to ``[0, 1]`` (min to 0, max to 1; a constant component becomes
    0.5), so that an RGB one shows as an image. The rescaling is affine, so it loses the component's scale and offset,
    not its pattern.

    Args:
        weight: ``(D, C, P_h, P_w)`` patch-embedding Conv2d weight, e.g.
            ``model.get_input_embeddings().projection.weight``.
        num_components: ``k``, at most ``min(D, C * P_h * P_w)``.

    Returns:
        ``(components, explained_variance_ratio)``: ``(k, C, P_h, P_w)`` fp32 filters in ``[0, 1]``, and ``(k,)`` the
        fraction of the filters' total variance each component explains (descending, sums to at most 1).
    """
    if weight.dim() != 4:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected the patch-embedding Conv2d weight (D, C, P_h, P_w). "
            f"For a linear patch embedding (D, C * P_h * P_w), reshape it to (D, C, P_h, P_w) first."
        )
    hidden_size, *filter_shape = weight.shape
    filters = weight.reshape(hidden_size, -1).float()  # (D, C*P_h*P_w)
    max_components = min(filters.shape)
    if not isinstance(num_components, int) or not 1 <= num_components <= max_components:
        raise ValueError(
            f"num_components={num_components!r} but a ({hidden_size}, {filters.shape[1]}) filter matrix has at most "
            f"min(D, C * P_h * P_w) = {max_components} components; pass 1 <= num_components <= {max_components}."
        )

    centred = filters - filters.mean(dim=0, keepdim=True)
    _, singular_values, right_vectors = torch.linalg.svd(centred, full_matrices=False)  # Vh: (min, C*P_h*P_w)
    variance = singular_values.square()
    ratio = variance[:num_components] / variance.sum().clamp_min(torch.finfo(torch.float32).tiny)  # (k,)

    components = right_vectors[:num_components]  # (k, C*P_h*P_w), unit rows
    peak = components.gather(1, components.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    components = components * torch.where(peak < 0, -1.0, 1.0)
    low = components.min(dim=1, keepdim=True).values
    span = components.max(dim=1, keepdim=True).values - low
    display = torch.where(span > 0, (components - low) / span.clamp_min(torch.finfo(torch.float32).tiny), 0.5)
    return display.reshape(num_components, *filter_shape), ratio  # (k, C, P_h, P_w), (k,)


# ---------------------------------------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema 2020)
# ---------------------------------------------------------------------------------------------------------------------


def attention_rollout(
    attentions: torch.Tensor | Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    add_residual: bool = True,
) -> torch.Tensor:
    """Attention rollout: how much each input token flows into each output token (Abnar & Zuidema 2020).

    Per layer ``l``, with ``A_l`` the ``(B, T, T)`` attention after head fusion:

    1. Fuse heads: mean, max or min over ``H``.
    2. If ``discard_ratio > 0``: in each row (query), zero the ``floor(discard_ratio * (T - 1))`` smallest
       off-diagonal weights. The diagonal is never discarded, so every row keeps its own token and the
       renormalisation below never divides by zero. (The reference code, jacobgil/vit-explain, drops the smallest
       weights of the whole matrix and spares only [CLS]-to-[CLS]; per row keeps every query comparable.)
    3. If ``add_residual``: ``A_l + I``, the residual connection around attention (the paper's ``0.5 A + 0.5 I``).
    4. Renormalise each row to sum to 1.

    Then ``R = A_L' @ ... @ A_2' @ A_1'`` (the last layer on the left): ``R[b, i, j]`` is the share of input token
    ``j`` in output token ``i``; every row of ``R`` sums to 1.

    Args:
        attentions: ``L`` tensors ``(B, H, T, T)`` (``output_attentions=True``) or one tensor ``(L, B, H, T, T)``.
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        discard_ratio: Fraction in ``[0, 1)`` of each row's off-diagonal weights to zero before propagating.
        add_residual: Add the identity for the residual stream (the paper does; without it, attention alone).

    Returns:
        ``(B, T, T)`` fp32 rollout; use :func:`attention_rollout_map` for an image-shaped map.
    """
    layers = _check_attentions(attentions)
    if head_fusion not in _HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r}; choose one of {', '.join(map(repr, _HEAD_FUSIONS))}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio!r} must be in [0, 1): it is the fraction of weights zeroed.")

    batch_size, _, num_tokens, _ = layers[0].shape
    identity = torch.eye(num_tokens, device=layers[0].device)  # (T, T)
    num_discarded = int(discard_ratio * (num_tokens - 1))
    rollout = identity.expand(batch_size, num_tokens, num_tokens)  # (B, T, T)
    for layer in layers:
        attention = layer.float()  # (B, H, T, T)
        if head_fusion == "mean":
            fused = attention.mean(dim=1)
        elif head_fusion == "max":
            fused = attention.amax(dim=1)
        else:
            fused = attention.amin(dim=1)  # (B, T, T)
        if num_discarded > 0:
            # the diagonal ranks as +inf so it is never among the smallest
            ranked = fused.masked_fill(identity.bool(), float("inf"))
            smallest = ranked.topk(num_discarded, dim=-1, largest=False).indices  # (B, T, num_discarded)
            fused = fused.scatter(-1, smallest, 0.0)
        if add_residual:
            fused = fused + identity
        fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        rollout = fused @ rollout  # (B, T, T): this layer on the left of the layers below it
    return rollout


def attention_rollout_map(
    rollout: torch.Tensor,
    grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    token_index: int | None = None,
) -> torch.Tensor:
    """The rollout of one output token over the image's patches, as a ``(grid_h, grid_w)`` map with max 1.

    Args:
        rollout: ``(B, T, T)`` from :func:`attention_rollout`, ``T = num_prefix_tokens + grid_h * grid_w``.
        grid_size: ``(grid_h, grid_w)`` of the images.
        num_prefix_tokens: Tokens before the patches (1 for [CLS], plus register tokens; 0 without a class token).
        token_index: The output token (row of ``rollout``) to explain; any index in ``[-T, T)``, e.g. a patch
            token ``num_prefix_tokens + i * grid_w + j`` for what patch ``(i, j)`` draws on. ``None`` (default):
            the [CLS] token (index 0) when there are prefix tokens; without them (mean-pooled models, no class
            token), the mean of all patch rows, the rollout of the mean-pooled output that such a model's head sees.

    Returns:
        ``(B, grid_h, grid_w)`` fp32, non-negative, each map divided by its maximum (so the max is 1; an all-zero map
        stays 0). Upsample it to the image size for an overlay.
    """
    _check_num_prefix_tokens(num_prefix_tokens)
    grid = _check_pair(grid_size, "grid_size")
    if rollout.dim() != 3 or rollout.shape[-1] != rollout.shape[-2]:
        raise ValueError(
            f"rollout has shape {tuple(rollout.shape)}; expected (B, T, T) from attention_rollout. For one image "
            f"(T, T) use rollout[None]."
        )
    num_tokens = rollout.shape[-1]
    _check_num_tokens(num_tokens, grid, num_prefix_tokens, "rollout")
    if token_index is not None and not -num_tokens <= token_index < num_tokens:
        raise ValueError(f"token_index={token_index} is out of range for T={num_tokens} tokens; pass -T <= index < T.")

    patch_columns = rollout[..., num_prefix_tokens:].float()  # (B, T, N)
    if token_index is not None:
        row = patch_columns[:, token_index]  # (B, N)
    elif num_prefix_tokens > 0:
        row = patch_columns[:, 0]  # [CLS]
    else:
        row = patch_columns.mean(dim=1)  # mean-pooled output
    row = row / row.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return row.reshape(-1, grid[0], grid[1])  # (B, grid_h, grid_w)
