"""A cache of a frozen vision tower's features, for training stages where the tower does not change (`pretrain`,
`finetune`, `full` with `freeze_vision`).

The tower's output for an image is then the same every epoch, so it is computed once (`build_feature_cache`) and the
training step feeds it to `VisionLanguageForConditionalGeneration(vision_features=...)`, which skips the tower:

    cache = build_feature_cache(model, ((batch["image_ids"], batch["pixel_values"]) for batch in loader))
    loss = model(input_ids=..., labels=..., vision_features=cache.lookup(batch["image_ids"], device=...)).loss

Features are kept on the CPU, `(T, D_v * len(feature_layers))` per image: 4 bytes x T x D per image in fp32 (a
ViT-B/16 at 224 px: 197 x 768 x 4 = 0.6 MB), so pass `dtype=torch.bfloat16` for large datasets. Only valid while
the same pixels come back for a key: random augmentation (crops, flips) defeats a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------------
# On disk, for the recipe's frozen-tower stages


class FeatureStore:
    """A frozen tower's features of a set of image files, on disk and memory-mapped: `(rows, T, D)` in
    `features.npy`, one row per image (and one more per image for its horizontal flip, with `flips`), with the
    row of each file in `index.json` and the files that could not be read (and why) in `unreadable.json`.

    The folder is named by a key over everything the features depend on (the tower's weights, the feature layers,
    the image processor's settings and the aspect-ratio policy, the dtype, the flips), so a store built for another
    tower or preprocessing is never read: it is simply another folder. Open it in each process (DataLoader workers
    included) with :meth:`open`; reading a row costs a page-in, nothing is held in memory.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.flips = meta["flips"]
        self.index: dict[str, int] = json.loads((self.folder / "index.json").read_text())
        self.unreadable: dict[str, str] = json.loads((self.folder / "unreadable.json").read_text())
        self._array = None

    def __getstate__(self):  # DataLoader workers map the file themselves
        return {**self.__dict__, "_array": None}

    def features(self, path: str, flipped: bool = False) -> torch.Tensor:
        """The features `(T, D)` of image file `path` (flipped horizontally first with `flipped`)."""
        if self._array is None:
            self._array = np.load(self.folder / "features.npy", mmap_mode="r")
        row = self.index[path] * (2 if self.flips else 1) + (1 if flipped and self.flips else 0)
        if flipped and not self.flips:
            raise ValueError(f"{self.folder} holds no flipped features: build it with flips=True for flipped images.")
        return torch.from_numpy(np.array(self._array[row]))

    @staticmethod
    def key(model: VisionLanguageForConditionalGeneration, processor, flips: bool, dtype: torch.dtype) -> str:
        """A digest of what the features depend on."""
        digest = hashlib.sha256()
        for name, tensor in sorted(model.vision_tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        settings = {
            "feature_layers": model.config.feature_layers,
            "image_processor": processor.image_processor.to_dict(),
            "image_aspect_ratio": processor.image_aspect_ratio,
            "flips": flips,
            "dtype": str(dtype),
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:20]

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: VisionLanguageForConditionalGeneration,
        processor,
        paths: Sequence[str],
        root: str | os.PathLike,
        *,
        flips: bool = False,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> FeatureStore:
        """The store of `paths` under `root/<key>/`: read when it exists, else built (images decoded and processed
        in `num_workers` DataLoader workers, the tower run in batches) and written atomically."""
        require_frozen_tower(model)
        folder = Path(root) / cls.key(model, processor, flips, dtype)
        if (folder / "meta.json").is_file():
            store = cls(folder)
            if set(paths) <= set(store.index) | set(store.unreadable):
                logger.info("vision features: reusing %s (%d images)", folder, len(store.index))
                return store
        paths = sorted(set(paths))
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, processor), batch_size=batch_size, num_workers=num_workers, collate_fn=list
        )
        staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tower = model.vision_tower
        was_training, tower_dtype = tower.training, next(tower.parameters()).dtype
        tower.eval()
        views = 2 if flips else 1
        index, unreadable, array, start = {}, {}, None, 0
        try:
            for items in loader:  # rows follow the sorted paths; an unreadable file's rows stay zero, unused
                readable = [
                    (row, path, pixels) for row, (path, pixels, _) in enumerate(items, start) if pixels is not None
                ]
                unreadable.update({path: reason for path, _, reason in items if reason is not None})
                start += len(items)
                if not readable:
                    continue
                pixels = torch.stack([pixels for _, _, pixels in readable]).to(model.device, tower_dtype)
                if flips:  # (I, C, H, W) -> (2I, C, H, W): each image, then its flip
                    pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
                features = model.vision_features(pixels).to("cpu", dtype)  # (views * I, T, D)
                if array is None:  # written to disk as it comes, never held whole in memory
                    shape = (views * len(paths), *features.shape[1:])
                    array = np.lib.format.open_memmap(staging / "features.npy", "w+", _numpy_dtype(dtype), shape)
                for k, (row, path, _) in enumerate(readable):
                    array[views * row : views * (row + 1)] = features[views * k : views * (k + 1)].numpy()
                    index[path] = row
        finally:
            tower.train(was_training)
        if array is None:
            raise ValueError(f"None of the {len(paths)} images could be read: {list(unreadable.items())[:3]}")
        array.flush()
        del array
        (staging / "index.json").write_text(json.dumps(index))
        (staging / "unreadable.json").write_text(json.dumps(unreadable))
        (staging / "meta.json").write_text(json.dumps({"flips": flips, "rows": views * len(paths)}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        size = (staging.parent / folder.name / "features.npy").stat().st_size
        logger.info(
            "vision features: %d images%s cached in %s (%.0f MB)",
            len(index),
            " and their flips" if flips else "",
            folder,
            size / 2**20,
        )
        return cls(folder)


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        raise ValueError("numpy has no bfloat16: cache features as float16 or float32.")
    return torch.empty(0, dtype=dtype).numpy().dtype


class _ImageFiles(torch.utils.data.Dataset):
    """Image files as (path, pixel values or None, why not) for building a store."""

    def __init__(self, paths: Sequence[str], processor):
        self.paths, self.processor = list(paths), processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.images import ImageLoadError, load_image

        try:
            return self.paths[i], self.processor.process_images([load_image(self.paths[i])])[0], None
        except ImageLoadError as error:
            return self.paths[i], None, error.reason


__all__ = ["FeatureCache", "FeatureStore", "build_feature_cache", "require_frozen_tower"]
