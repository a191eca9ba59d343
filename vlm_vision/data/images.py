"""Images for training: decode any file to RGB, labelled image sets, and the classification data set.

Every image goes through :func:`load_image` (Pillow): grayscale, RGBA, palette, CMYK, 16-bit and float files all come
out as 8-bit RGB (transparent pixels composited on white, 16-bit and float values scaled, not clipped, EXIF rotation
applied), and a missing or undecodable file raises :class:`ImageLoadError` with the file named. Pixel values are
prepared as the checkpoints' image processor does (transformers' ViT processor: bilinear resize, scale to [0, 1],
normalise with mean = std = 0.5), so a model trained here sees at training time what
`AutoImageProcessor.from_pretrained(folder)` gives it later.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ON_ERROR_CHOICES = ("raise", "skip")
IMAGE_MEAN = IMAGE_STD = 0.5  # the reference ViT preprocessing, as vlm_vision.export.encoder_folder.image_processor_for


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded; `path` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"Cannot read image {self.path}: {reason}. Replace or remove the file, or pass on_error='skip' "
            "(--on-bad-image skip) to leave unreadable images out with a warning."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: 16-bit, 32-bit and float images scaled to 8 bits (not clipped), transparent areas
    (RGBA, LA, palette with a transparent colour) composited on white, so they do not turn into arbitrary colours.
    Always a new image (the caller may close the original)."""
    if image.mode.startswith(("I", "F")):
        image = _to_8_bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB Pillow image, fully decoded.

    - Modes other than RGB are converted; images with transparency (RGBA, LA, palette with a transparent colour) are
      composited on a white background first, so transparent areas do not turn into arbitrary colours.
    - High bit depths are scaled to 8 bits, not clipped: 16-bit grayscale ("I;16", e.g. 16-bit PNGs) by 255/65535;
      32-bit integer ("I") and float ("F") images by the range their values fit (0-255, 0-65535 for "I"; 0-1,
      0-255 for "F"), and otherwise stretched from their minimum to their maximum.
    - The EXIF orientation is applied (as transformers' own `load_image` does), so phone photos are upright.

    Raises:
        ImageLoadError: the file does not exist or is not a decodable image (truncated, corrupt, not an image).
        TypeError: `path` is not a path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_image takes a file path (str or pathlib.Path), got {type(path).__name__}.")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "it is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


class ProcessedImages:
    """Images (file paths or in-memory PIL images) -> a VLM processor's inputs, each decoded and processed once.

    One image's inputs: in `image_mode` "fixed" its `pixel_values` `(C, H, W)`; in "native" and "tiles" (its model
    inputs, `processor.preprocess_images`'s dict, and its token ids in the text). Training
    (:class:`~vlm_vision.data.dataset.VLMDataset`) and answering (:mod:`vlm_vision.evaluation.generation`) read
    their images through it.

    Args:
        processor: the VLM's processor.
        cache: keep what was processed, by file path (off: every call decodes again).
        max_size: keep at most this many, the least recently used dropped first (None: no bound).
        keep_in_memory_images: also keep in-memory images, by object identity: only while the caller holds them all
            (one pass of answering), never for a data set whose index may make new image objects.

    Raises:
        ImageLoadError: a file that is missing or can't be decoded.
    """

    def __init__(
        self, processor, *, cache: bool = True, max_size: int | None = None, keep_in_memory_images: bool = False
    ):
        self.processor = processor
        self.max_size = max_size
        self.keep_in_memory_images = keep_in_memory_images
        self._cache: OrderedDict | None = OrderedDict() if cache else None

    @property
    def fixed(self) -> bool:
        """Whether an image's inputs are its pixels alone (`image_mode` "fixed")."""
        return getattr(self.processor, "image_mode", "fixed") == "fixed"

    def __call__(self, image):
        is_file = isinstance(image, (str, os.PathLike))
        key = os.fspath(image) if is_file else (id(image) if self.keep_in_memory_images else None)
        if self._cache is not None and key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        picture = load_image(image) if is_file else image
        if self.fixed:
            processed = self.processor.process_images([picture])[0]
        else:
            inputs, layouts = self.processor.preprocess_images([picture])
            processed = (inputs, layouts[0])
        if self._cache is not None and key is not None:
            self._cache[key] = processed
            if self.max_size is not None and len(self._cache) > self.max_size:
                self._cache.popitem(last=False)
        return processed


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit "L", scaled as `load_image` documents
    (Pillow's own conversion clips every value above 255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        ranges = (1.0, 255.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((r for r in ranges if low >= 0 and high <= r), None)
        if top is None:  # another range: stretch what is there
            values, top = values - low, max(high - low, 1e-12)
    scaled = np.clip(np.nan_to_num(values / top * 255.0), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r}; choose 'raise' (stop at the first bad image) or 'skip'.")


@dataclass(frozen=True)
class LabelledImages:
    """Image files with one integer label each, and the class names the labels index.

    Attributes:
        paths: image files.
        labels: `labels[i]` is the class of `paths[i]`, in `range(len(class_names))`.
        class_names: the name of each class, in label order.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self):
        for name in ("paths", "labels", "class_names"):
            if isinstance(getattr(self, name), (str, bytes, os.PathLike)):
                raise TypeError(
                    f"{name} must be a sequence (one entry per item), got the single value {getattr(self, name)!r}."
                )
        bad = [x for x in self.labels if isinstance(x, bool) or not isinstance(x, (int, np.integer))]
        if bad:
            raise ValueError(f"labels must be integer class indices, got {bad[:5]}: map class names to indices first.")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "labels", tuple(int(x) for x in self.labels))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if len(set(self.class_names)) != len(self.class_names):
            duplicates = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise ValueError(f"class_names repeats {duplicates}: each class needs its own name.")
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels: give one label per image.")
        if not self.class_names:
            raise ValueError("class_names is empty: a classification data set needs at least one class.")
        bad = [x for x in self.labels if not 0 <= x < len(self.class_names)]
        if bad:
            raise ValueError(
                f"labels {sorted(set(bad))[:5]} are outside range(len(class_names)) = range({len(self.class_names)})."
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    def subset(self, num_images: int, seed: int = 0) -> LabelledImages:
        """A seeded random subset of `num_images` images (in their original order)."""
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 0 < num_images <= len(self):
            raise ValueError(f"num_images={num_images} must be in 1..{len(self)} (the number of images).")
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
        return self._take(chosen.tolist())

    def split(self, fraction: float, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
        """A seeded random split into (rest, held out), the held-out part `fraction` of the images (at least 1)."""
        if not 0.0 < fraction < 1.0 or len(self) < 2:
            raise ValueError(f"cannot hold out fraction={fraction} of {len(self)} images: need 0 < fraction < 1.")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        held = max(1, round(fraction * len(self)))
        return self._take(sorted(order[held:])), self._take(sorted(order[:held]))

    def readable(self) -> LabelledImages:
        """The images that :func:`load_image` can decode; the others are left out with a warning naming them."""
        keep, bad = [], []
        for index, path in enumerate(self.paths):
            try:
                load_image(path)
                keep.append(index)
            except ImageLoadError as error:
                bad.append(error.path)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            logger.warning("Skipped %d of %d images that cannot be read: %s", len(bad), len(self), shown)
        return self._take(keep)

    def _take(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages(
            tuple(self.paths[i] for i in indices), tuple(self.labels[i] for i in indices), self.class_names
        )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"image_size must be a positive int or (height, width), got {size!r}.")
    return pair


def _flip_bit(seed: int, epoch: int, index: int) -> bool:
    """A fair coin from (seed, epoch, index) alone (splitmix64): the same flips whatever the number of processes,
    the batch order or a resume."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return bool((x ^ (x >> 31)) & 1)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """`LabelledImages` as model inputs: `{"pixel_values": (3, H, W) float32, "labels": int64}` per item.

    Args:
        images: the files and labels.
        image_size: `S` or `(H, W)`: every image is resized to it (bilinear, as the checkpoints' image processor).
        horizontal_flip: flip each image with probability 1/2; the coin depends only on (`seed`, epoch, index), so
            augmentation is identical under any number of processes and after a resume. Call `set_epoch` per epoch.
        seed: the augmentation seed.
        on_error: `"raise"`: an unreadable image raises :class:`ImageLoadError` (naming it) when it is read;
            `"skip"`: every image is decoded once up front and unreadable ones are left out with a warning, so that
            the data set's length is fixed before training starts (never a crash mid-epoch).
        cache: keep the resized images in memory (uint8) after their first read; good for small images.
    """

    def __init__(
        self,
        images: LabelledImages,
        image_size: int | Sequence[int],
        *,
        horizontal_flip: bool = False,
        seed: int = 0,
        on_error: str = "raise",
        cache: bool = True,
    ):
        _check_on_error(on_error)
        if not isinstance(images, LabelledImages):
            raise TypeError(f"images must be LabelledImages, got {type(images).__name__}.")
        self.images = images.readable() if on_error == "skip" else images
        if len(self.images) == 0:
            raise ValueError("The data set has no (readable) images.")
        self.image_size = _pair(image_size)
        self.horizontal_flip = horizontal_flip
        self.seed = seed
        self.on_error = on_error
        self.epoch = 0
        self._cache: dict[tuple[int, int], dict[int, torch.Tensor]] | None = {} if cache else None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.images.class_names

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def with_options(
        self, *, image_size: int | Sequence[int] | None = None, horizontal_flip: bool | None = None
    ) -> ImageClassificationDataset:
        """The same images at another size or augmentation (the resized-image cache is shared)."""
        other = object.__new__(ImageClassificationDataset)
        other.__dict__.update(self.__dict__)
        if image_size is not None:
            other.image_size = _pair(image_size)
        if horizontal_flip is not None:
            other.horizontal_flip = horizontal_flip
        return other

    def subset(self, num_images: int, seed: int = 0) -> ImageClassificationDataset:
        """The same options on a seeded random subset of the images (see `LabelledImages.subset`)."""
        other = self.with_options()
        other.images = self.images.subset(num_images, seed)
        other._cache = None if self._cache is None else {}  # cached by index, which the subset renumbers
        return other

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _pixels(self, index: int) -> torch.Tensor:
        """(3, H, W) uint8 at `image_size`."""
        cache = None if self._cache is None else self._cache.setdefault(self.image_size, {})
        if cache is not None and index in cache:
            return cache[index]
        height, width = self.image_size
        image = load_image(self.images.paths[index])
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
        pixels = pixels.permute(2, 0, 1).contiguous()  # (3, H, W)
        if cache is not None:
            cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images.")
        index %= len(self)  # the flip coin and the cache see one index per image
        pixels = self._pixels(index)
        if self.horizontal_flip and _flip_bit(self.seed, self.epoch, index):
            pixels = pixels.flip(-1)
        pixel_values = (pixels.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD
        return {"pixel_values": pixel_values, "labels": torch.tensor(self.images.labels[index])}
