"""The encoder's image processor: transformers' ViT preprocessing, plus a native-resolution mode.

Classic mode (`max_num_patches=None`, the default): exactly `ViTImageProcessorPil` (resize to `size`, rescale,
normalise), giving `pixel_values` `(B, C, H, W)`.

Native-resolution mode (`max_num_patches=N`): each image is resized, keeping its aspect ratio, to the largest size
whose patch grid has at most N patches, both sides multiples of `patch_size` (transformers'
`Siglip2ImageProcessor` and its `get_image_size_for_max_num_patches`, which this module calls), then rescaled,
normalised, cut into patches and zero-padded to N. It returns what `VisionTransformerModel` and transformers'
`Siglip2VisionModel` take:

    pixel_values          (B, N, C * P * P)  each patch flattened (P, P, C), patches row-major on the image's grid
    pixel_attention_mask  (B, N)             1 for a patch, 0 for padding
    spatial_shapes        (B, 2)             each image's (rows, columns) in patches

Packed (`pack_images=True`, with `max_num_patches`; NaViT's "patch n' pack"): the same resized images, but their
patches are put one after another into rows of at most `max_packed_length` patches (default: `max_num_patches`),
each image into the first row with room for it (greedy first-fit, in the given order), so that little is padding;
the rows are as long as the fullest one (L <= max_packed_length: a batch that fits one row has no padding at all):

    pixel_values     (R, L, C * P * P)  R rows of L patch slots: images one after another, then zero padding
    patch_image_ids  (R, L)             the image of each slot (its index in spatial_shapes), -1 for padding
    spatial_shapes   (I, 2)             each image's (rows, columns) in patches, in the order of the images given

`VisionTransformerModel` keeps the images apart (see its `forward`); transformers' Siglip2VisionModel cannot take
this form. No `pixel_attention_mask` is returned: the ids mark the padding.

One deliberate difference from Siglip2's processor: an image whose aspect ratio cannot be kept within N patches
(N below one row of patches, e.g. N=3 for a 1:4 image) raises instead of being squashed to fewer columns.
"""

from __future__ import annotations

import math

import numpy as np
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    convert_image_to_patches,
    get_image_size_for_max_num_patches,
    pad_along_first_dim,
)
from transformers.models.vit import ViTImageProcessorPil
from transformers.processing_utils import ImagesKwargs


class VisionTransformerImageProcessorKwargs(ImagesKwargs, total=False):
    """patch_size: the model's patch size (native mode). max_num_patches: the patch budget per image; None for the
    classic (B, C, H, W) mode. pack_images: native mode only, several images' patches per row (`patch_image_ids`).
    max_packed_length: the patch slots of a packed row (default `max_num_patches`)."""

    patch_size: int
    max_num_patches: int | None
    pack_images: bool
    max_packed_length: int | None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_native_options(patch_size, max_num_patches, pack_images=False, max_packed_length=None) -> None:
    """Refuse a patch size, patch budget or packing option the native mode cannot use, naming the fix."""
    if not isinstance(pack_images, bool):
        raise ValueError(f"pack_images must be True or False, got {pack_images!r}.")
    if max_num_patches is None:
        if pack_images or max_packed_length is not None:
            raise ValueError(
                "pack_images/max_packed_length pack patchified images into rows, which only the native-resolution "
                "mode makes: set max_num_patches=... (the patch budget per image) too, or drop pack_images for the "
                "classic (batch, channels, height, width) mode."
            )
        return
    if not _positive_int(patch_size):
        raise ValueError(
            f"patch_size must be a positive int (the model's config.patch_size, square patches), got {patch_size!r}."
        )
    if not _positive_int(max_num_patches):
        raise ValueError(
            f"max_num_patches must be an int >= 1 (the patches each image may have), got {max_num_patches!r}; "
            "None selects the classic (batch, channels, height, width) mode."
        )
    if max_packed_length is not None:
        if not pack_images:
            raise ValueError(f"max_packed_length={max_packed_length!r} sizes packed rows: set pack_images=True too.")
        if not _positive_int(max_packed_length) or max_packed_length < max_num_patches:
            raise ValueError(
                f"max_packed_length must be an int >= max_num_patches={max_num_patches} (a row must hold the largest "
                f"image), got {max_packed_length!r}; None gives rows of max_num_patches."
            )


def pack_first_fit(lengths: list[int], row_length: int) -> list[list[int]]:
    """Greedy first-fit: each item (in order) goes into the first row with room for it, else a new row. Returns the
    items of each row, in order. Every length must be at most `row_length`."""
    rows, free = [], []
    for item, length in enumerate(lengths):
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([])
            free.append(row_length)
            row = len(rows) - 1
        rows[row].append(item)
        free[row] -= length
    return rows


def min_patches_keeping_aspect(height: int, width: int) -> int:
    """The fewest patches that keep an image's aspect ratio: one patch along the short side, a row along the long."""
    short, long = sorted((height, width))
    return math.ceil(long / short)


class VisionTransformerImageProcessor(ViTImageProcessorPil):
    """`ViTImageProcessorPil` with the native-resolution mode (`max_num_patches`); see the module docstring."""

    valid_kwargs = VisionTransformerImageProcessorKwargs
    patch_size = 16
    max_num_patches = None
    pack_images = False
    max_packed_length = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_native_options(self.patch_size, self.max_num_patches, self.pack_images, self.max_packed_length)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors,
        patch_size: int | None = None,
        max_num_patches: int | None = None,
        pack_images: bool = False,
        max_packed_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        check_native_options(patch_size, max_num_patches, pack_images, max_packed_length)
        if max_num_patches is None:
            return super()._preprocess(
                images,
                do_resize=do_resize,
                size=size,
                resample=resample,
                do_center_crop=do_center_crop,
                crop_size=crop_size,
                do_rescale=do_rescale,
                rescale_factor=rescale_factor,
                do_normalize=do_normalize,
                image_mean=image_mean,
                image_std=image_std,
                do_pad=do_pad,
                pad_size=pad_size,
                return_tensors=return_tensors,
                **kwargs,
            )
        if do_center_crop or do_pad:
            raise ValueError(
                "The native-resolution mode (max_num_patches) keeps the whole image at its aspect ratio, so it does "
                "not centre-crop or pad to a size: set do_center_crop=False and do_pad=False, or max_num_patches=None "
                "for the classic mode."
            )
        pixel_values, masks, spatial_shapes = [], [], []
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            if do_resize:
                needed = min_patches_keeping_aspect(height, width)
                if max_num_patches < needed:
                    raise ValueError(
                        f"max_num_patches={max_num_patches} is below one patch row of image {index} ({height}x{width} "
                        f"pixels): keeping its aspect ratio needs at least {needed} patches (1 x {needed}). Raise "
                        f"max_num_patches to {needed} or more, or crop the image nearer to square."
                    )
                height, width = get_image_size_for_max_num_patches(height, width, patch_size, max_num_patches)
                image = self.resize(image=image, size=SizeDict(height=height, width=width), resample=resample)
            elif (
                height % patch_size
                or width % patch_size
                or (height // patch_size) * (width // patch_size) > (max_num_patches)
            ):
                raise ValueError(
                    f"Image {index} is {height}x{width} pixels and do_resize=False: without resizing it must be a "
                    f"multiple of patch_size={patch_size} with at most max_num_patches={max_num_patches} patches. "
                    "Set do_resize=True."
                )
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            patches = convert_image_to_patches(image, patch_size)  # (h * w, P * P * C)
            spatial_shapes.append((height // patch_size, width // patch_size))
            if pack_images:
                pixel_values.append(patches)
                continue
            patches, mask = pad_along_first_dim(patches, max_num_patches)
            pixel_values.append(patches)
            masks.append(mask)
        if pack_images:
            return BatchFeature(
                data=pack_patches(pixel_values, spatial_shapes, max_packed_length or max_num_patches),
                tensor_type=return_tensors,
            )
        data = {"pixel_values": pixel_values, "pixel_attention_mask": masks, "spatial_shapes": spatial_shapes}
        return BatchFeature(data=data, tensor_type=return_tensors)


def pack_patches(patches: list[np.ndarray], spatial_shapes: list[tuple[int, int]], row_length: int) -> dict:
    """Each image's patches `(h_i * w_i, C * P * P)` into rows of at most `row_length` slots (`pack_first_fit`), all
    as long as the fullest row: the packed form's `pixel_values`, `patch_image_ids` and `spatial_shapes` (see the
    module docstring)."""
    rows = pack_first_fit([len(p) for p in patches], row_length)
    row_length = max(sum(len(patches[i]) for i in images) for images in rows)  # no row is all padding at its end
    width = patches[0].shape[-1]
    pixel_values = [np.zeros((row_length, width), dtype=patches[0].dtype) for _ in rows]
    patch_image_ids = [np.full(row_length, -1, dtype=np.int64) for _ in rows]
    for row, images in enumerate(rows):
        start = 0
        for image in images:
            count = len(patches[image])
            pixel_values[row][start : start + count] = patches[image]
            patch_image_ids[row][start : start + count] = image
            start += count
    return {"pixel_values": pixel_values, "patch_image_ids": patch_image_ids, "spatial_shapes": spatial_shapes}


__all__ = [
    "VisionTransformerImageProcessor",
    "check_native_options",
    "min_patches_keeping_aspect",
    "pack_first_fit",
    "pack_patches",
]
