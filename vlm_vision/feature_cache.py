"""A cache of a frozen vision tower's features, for training stages where the tower does not change (`align`).

The tower's output for an image is then the same every epoch, so it is computed once (`build_feature_cache`) and the
training step feeds it to `VisionLanguageForConditionalGeneration(vision_features=...)`, which skips the tower:

    cache = build_feature_cache(model, ((batch["image_ids"], batch["pixel_values"]) for batch in loader))
    loss = model(input_ids=..., labels=..., vision_features=cache.lookup(batch["image_ids"], device=...)).loss

Features are kept on the CPU, `(T, D_v * len(feature_layers))` per image: 4 bytes x T x D per image in fp32 (a
ViT-B/16 at 224 px: 197 x 768 x 4 = 0.6 MB), so pass `dtype=torch.bfloat16` for large datasets. Only valid while
the same pixels come back for a key: random augmentation (crops, flips) defeats a cache.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence

import torch

from .modeling_vlm import VisionLanguageForConditionalGeneration

logger = logging.getLogger(__name__)


def require_frozen_tower(model: VisionLanguageForConditionalGeneration) -> None:
    """Refuse a tower with trainable parameters: its cached features would go stale as it trains."""
    trainable = [name for name, p in model.vision_tower.named_parameters() if p.requires_grad]
    if trainable:
        shown = ", ".join(trainable[:3]) + (f" and {len(trainable) - 3} more" if len(trainable) > 3 else "")
        raise ValueError(
            f"The vision tower has {len(trainable)} trainable tensors ({shown}): cached features would not follow "
            "its updates. Cache only for a frozen tower (model.vision_tower.requires_grad_(False), the align "
            "stage), or train without the cache."
        )


class FeatureCache:
    """Image key -> the tower's features `(T, D)` on the CPU, for `model(vision_features=cache.lookup(keys))`."""

    def __init__(self, features: dict[Hashable, torch.Tensor] | None = None):
        self.features = dict(features or {})

    def __len__(self) -> int:
        return len(self.features)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.features

    def lookup(
        self, keys: Sequence[Hashable], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The features of `keys`, stacked in order: `(len(keys), T, D)`, on `device`."""
        missing = [key for key in keys if key not in self.features]
        if missing:
            raise KeyError(
                f"{len(missing)} image keys are not in the feature cache (first: {missing[0]!r}): "
                "build the cache over every image the training data uses."
            )
        stacked = torch.stack([self.features[key] for key in keys])
        return stacked.to(device=device, dtype=dtype, non_blocking=True)


@torch.no_grad()
def build_feature_cache(
    model: VisionLanguageForConditionalGeneration,
    batches: Iterable[tuple[Sequence[Hashable], torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
) -> FeatureCache:
    """Run the frozen tower once over `(keys, pixel_values (I, C, H, W))` batches and keep each image's features.

    The tower runs in eval mode (no dropout: a cached feature must be what any epoch would see) and is put back in
    the mode it was in. A key seen twice keeps its first features.
    """
    require_frozen_tower(model)
    tower = model.vision_tower
    was_training = tower.training
    tower.eval()
    tower_dtype = next(tower.parameters()).dtype
    cache = FeatureCache()
    try:
        for keys, pixel_values in batches:
            if len(keys) != pixel_values.shape[0]:
                raise ValueError(f"{len(keys)} keys for {pixel_values.shape[0]} images: give one key per image.")
            features = model.vision_features(pixel_values.to(device=model.device, dtype=tower_dtype))
            for key, feature in zip(keys, features.to("cpu", dtype or features.dtype), strict=True):
                cache.features.setdefault(key, feature.clone())  # clone: don't keep the whole batch alive per image
    finally:
        tower.train(was_training)
    logger.info("cached the vision features of %d images", len(cache))
    return cache


__all__ = ["FeatureCache", "build_feature_cache", "require_frozen_tower"]
