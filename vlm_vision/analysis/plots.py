"""Pictures of what a Vision Transformer learned: the three panels of Figure 7 of the ViT paper and attention rollout.

Plotting only: the numbers come from :mod:`vlm_vision.analysis.measures`. matplotlib is an extra (`pip install
'vlm-vision[plots]'`), imported when a function here first runs, with the non-interactive Agg backend; every
function writes one PNG of `figsize x dpi` pixels and returns its path. :func:`write_analysis` runs a model on images
and writes all of them (what `scripts/analyze.py` does).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install 'vlm-vision[plots]' (or matplotlib).") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def first_rgb_filters(encoder) -> tuple[torch.Tensor, str]:
    """The filters that see the pixels: `(D, 3, k_h, k_w)` and what they are. For a ViT the patch embedding (Fig. 7,
    left, of the paper); for a hybrid (Sec. 3.1) its CNN's first convolution, since its patch embedding sees the
    CNN's feature map, not RGB."""
    embeddings = encoder.get_input_embeddings()
    if getattr(embeddings, "backbone", None) is None:
        return embeddings.projection.weight.detach(), "RGB embedding filters"
    for module in embeddings.backbone.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            return module.weight.detach(), "RGB filters of the hybrid's root convolution"
    raise ValueError("The hybrid's backbone has no convolution on the 3 RGB channels: no filters to show.")


def plot_patch_embedding_components(
    components: torch.Tensor,
    explained_variance: torch.Tensor,
    path: str | os.PathLike,
    columns: int = 7,
    what: str = "RGB embedding filters",
) -> Path:
    """Fig. 7 (left): principal components of the patch-embedding filters as RGB patches.

    Args:
        components: `(k, 3, P_h, P_w)` in [0, 1] (`analysis.patch_embedding_principal_components`).
        explained_variance: `(k,)` fraction of variance of each component (shown above it).
        what: the filters' name, in the title.
    """
    if components.dim() != 4 or components.shape[1] != 3:
        raise ValueError(f"components must be (k, 3, P_h, P_w) RGB filters, got shape {tuple(components.shape)}.")
    plt = _pyplot()
    count = components.shape[0]
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.1 + 0.5), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(components[index].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(f"{100 * explained_variance[index].item():.1f}%", fontsize=7)
    fig.suptitle(f"{what} (first {count} principal components)", fontsize=9)
    return _save(fig, path)


def plot_position_embedding_similarity(similarity: torch.Tensor, path: str | os.PathLike) -> Path:
    """Fig. 7 (centre): one tile per patch, showing the cosine similarity of its position embedding with all others.

    Args:
        similarity: `(grid_h, grid_w, grid_h, grid_w)` (`analysis.position_embedding_similarity`).
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (grid_h, grid_w, grid_h, grid_w), got {tuple(similarity.shape)}.")
    plt = _pyplot()
    grid_h, grid_w = similarity.shape[:2]
    fig, axes = plt.subplots(
        grid_h,
        grid_w,
        figsize=(6, 6 * grid_h / grid_w + 0.3),
        squeeze=False,
        gridspec_kw={"wspace": 0.05, "hspace": 0.05},
    )
    for i in range(grid_h):
        for j in range(grid_w):
            ax = axes[i, j]
            image = ax.imshow(similarity[i, j].numpy(), vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), fontsize=6, rotation=0, labelpad=6)
            if i == grid_h - 1:
                ax.set_xlabel(str(j + 1), fontsize=6)
    fig.supxlabel("Input patch column", fontsize=8)
    fig.supylabel("Input patch row", fontsize=8)
    fig.suptitle("Position embedding similarity", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="Cosine similarity")
    return _save(fig, path)


def plot_mean_attention_distance(
    distances: torch.Tensor, path: str | os.PathLike, image_size: int | None = None
) -> Path:
    """Fig. 7 (right): mean attention distance of every head against depth.

    Args:
        distances: `(L, H)` in pixels (`analysis.mean_attention_distance`).
        image_size: draws the image side as a reference line when given.
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be (layers, heads), got shape {tuple(distances.shape)}.")
    plt = _pyplot()
    num_layers, num_heads = distances.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    depth = torch.arange(1, num_layers + 1)
    for head in range(num_heads):
        offset = 0.3 * (head / max(num_heads - 1, 1) - 0.5)  # heads side by side, not on top of each other
        ax.scatter(depth + offset, distances[:, head].numpy(), s=18, label=f"head {head + 1}")
    if image_size:
        ax.axhline(image_size, color="gray", linewidth=0.8, linestyle=":")
        ax.text(depth[0].item() - 0.4, image_size, "image side", fontsize=6, color="gray", va="bottom")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(depth.tolist())
    ax.set_ylim(0, None)
    if num_heads <= 8:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_rollout(image, rollout_map: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """The image and the [CLS] attention rollout over it, side by side.

    Args:
        image: a Pillow image (shown as given).
        rollout_map: `(grid_h, grid_w)` (`analysis.attention_rollout_map`), upsampled to the image and stretched
            to its own min..max for display (the residual term makes rollouts flat, so max-normalised maps of a
            small model are nearly uniform).
    """
    if rollout_map.dim() != 2:
        raise ValueError(f"rollout_map must be (grid_h, grid_w), got shape {tuple(rollout_map.shape)}.")
    plt = _pyplot()
    width, height = image.size
    heat = torch.nn.functional.interpolate(rollout_map[None, None].float(), size=(height, width), mode="bilinear")
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(heat[0, 0].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax, label in zip(axes, ("image", "attention rollout ([CLS])"), strict=True):
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def position_similarity_summary(similarity: torch.Tensor) -> dict[str, float]:
    """How local the position embeddings are: the share of patches whose most similar other patch is one of their
    8 neighbours, and the mean similarity to neighbours, to patches in the same row or column, and to the rest."""
    grid_h, grid_w = similarity.shape[:2]
    flat = similarity.reshape(grid_h * grid_w, grid_h * grid_w).clone()
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    chebyshev = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs())
    same_line = (rows[:, None] == rows[None]) | (cols[:, None] == cols[None])
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool)
    neighbour = chebyshev == 1
    flat.fill_diagonal_(-float("inf"))
    nearest = flat.argmax(dim=1)
    flat.fill_diagonal_(1.0)
    return {
        "most_similar_is_neighbour": neighbour[torch.arange(len(rows)), nearest].float().mean().item(),
        "mean_similarity_neighbours": flat[neighbour].mean().item(),
        "mean_similarity_same_row_or_column": flat[same_line & off_diagonal & ~neighbour].mean().item(),
        "mean_similarity_other": flat[~same_line & ~neighbour].mean().item(),
    }


def write_analysis(
    model,
    image_processor,
    images: Sequence[tuple[str, object]],
    out_dir: str | os.PathLike,
    *,
    num_overlays: int | None = None,
    num_components: int = 28,
    progress_bar: bool = True,
) -> dict:
    """Run `model` (a `VisionTransformerModel` or a classifier around one) on `images` and write every picture.

    Writes `patch_embedding_pca.png`, `position_embedding_similarity.png`, `mean_attention_distance.png` and
    `rollout_<name>.png` for the first `num_overlays` images (all by default). Attention distances are averaged over
    all images, as in the paper (Appendix D.7).

    Args:
        images: `(name, Pillow image)` pairs.
        image_processor: resizes and normalises the images for the model (the checkpoint's own).

    Returns:
        The numbers behind the pictures: `mean_attention_distance` (L x H list, pixels), the position-similarity
        summary, the explained variance of the components, and the files written.
    """
    from tqdm.auto import tqdm

    from . import measures as analysis

    if not images:
        raise ValueError("No images to analyse: pass image files, or use the default photos.")
    out_dir = Path(out_dir)
    encoder = getattr(model, "vit", model)
    config = encoder.config
    grid = config.grid_size
    num_prefix = config.num_prefix_tokens
    files = []

    weight, what = first_rgb_filters(encoder)
    num_components = min(num_components, min(weight.shape[0], weight[0].numel()))
    components, explained = analysis.patch_embedding_principal_components(weight, num_components)
    files.append(plot_patch_embedding_components(components, explained, out_dir / "patch_embedding_pca.png", what=what))

    similarity = analysis.position_embedding_similarity(
        encoder.embeddings.position_embeddings.detach(), grid, num_prefix
    )
    files.append(plot_position_embedding_similarity(similarity, out_dir / "position_embedding_similarity.png"))

    model.eval()
    per_image, overlays = [], images[: num_overlays if num_overlays is not None else len(images)]
    for index, (name, image) in enumerate(tqdm(images, desc="images", unit="image", disable=not progress_bar)):
        pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            attentions = encoder(pixel_values, output_attentions=True).attentions
        per_image.append(analysis.mean_attention_distance(attentions, grid, config.patch_size, num_prefix))
        if index < len(overlays):
            rollout = analysis.attention_rollout(attentions)
            heat = analysis.attention_rollout_map(rollout, grid, num_prefix)[0]
            files.append(plot_attention_rollout(image, heat, out_dir / f"rollout_{name}.png", title=name))
    distances = torch.stack(per_image).mean(dim=0)  # (L, H)
    files.append(
        plot_mean_attention_distance(
            distances, out_dir / "mean_attention_distance.png", image_size=config.image_size_hw[0]
        )
    )
    return {
        "mean_attention_distance": [[round(v, 2) for v in row] for row in distances.tolist()],
        "position_similarity": {k: round(v, 4) for k, v in position_similarity_summary(similarity).items()},
        "explained_variance": [round(v, 4) for v in explained.tolist()],
        "num_images": len(images),
        "files": [str(f) for f in files],
    }
