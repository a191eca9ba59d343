"""The vision-language training set and its collator.

:class:`VLMDataset` turns the samples of an index (:mod:`.index`) into training items when they are asked for, in
the DataLoader's workers when there are some: the conversation is rendered and tokenised (labels on the assistant
turns only), the images are decoded (any Pillow mode to RGB) and processed by the tower's own image processor.
Nothing is done up front, so a data set of any size starts at once and holds no more than its index.

A sample that can't be used (a malformed entry, a missing or undecodable image, more `<image>` tags than images, a
conversation over `max_length` tokens) is never fatal: with `on_error="skip"` the next usable sample takes its place
(the same one every time, so N processes and a resumed run see the same data) and the bad one travels in the
batch (`batch["skipped"]`), so the training loop can count and name it at the end of the stage; `"raise"` raises
:class:`~.conversations.BadSampleError` naming it. A chat template that can't be split into prompt and answers is
not a data problem: it raises whatever `on_error` says.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..encoder.image_processing_vit import pack_patches
from ..vlm.processing_vlm import IMAGE_TOKEN, ConversationTooLongError, VisionLanguageProcessor
from .conversations import (
    MALFORMED,
    MISSING_IMAGE,
    TAG_MISMATCH,
    TOO_LONG,
    UNREADABLE_IMAGE,
    BadSampleError,
    SampleProblem,
    SkippedSample,
    VLMSample,
    _check_on_error,
)
from .images import ImageLoadError, ProcessedImages, _flip_bit
from .index import SampleList
from .packing import pack_encoded

logger = logging.getLogger(__name__)


def split_questions(messages: list[dict]) -> list[list[dict]]:
    """A one-image conversation of k question/answer turns -> k one-turn conversations, each showing the image.

    Later turns of a conversation can read earlier answers ("what is the blue shape?" gives away the colour), a
    text shortcut that evaluation on first turns never offers; separate conversations each have to look at the image.
    """
    turns, question = [], None
    for message in messages:
        if message["role"] == "user":
            question = message["content"].replace(IMAGE_TOKEN, "").strip()
        elif message["role"] == "assistant" and question is not None:
            turns.append([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}, message])
            question = None
    return turns


class VLMDataset(torch.utils.data.Dataset):
    """Training items of a VLM, built on access from an index of samples.

    Args:
        index: a :mod:`.index` index (`SampleList`, `JsonIndex`, `RowsIndex`) or a list of samples.
        processor: the VLM's processor (chat template, tokenizer, the tower's image processor, image-token count).
        max_length: the longest sequence in tokens, image tokens included (longer samples are skipped, never
            truncated: that could cut an image span or the answer). None: no limit.
        chat_template: Jinja text rendering the conversations (e.g. LLaVA's "plain" for alignment); None: the
            processor's.
        separate_questions: each one-image sample becomes one single-question conversation per turn (see
            :func:`split_questions`), all about its image: the collator passes the image once for all of them.
        image_label: sample -> class index of its image (-100: none), for an auxiliary classification loss.
        horizontal_flip: flip each item's images with probability 1/2, decided by (`seed`, epoch, index) alone, so
            the flips are the same under any number of processes, DataLoader workers or a resume (call `set_epoch`).
        cache: keep each distinct conversation's encoding and each image's pixel values in memory after their first
            use (per process): for small data sets read many times (easy-VQA); off for large ones.
        features: a :class:`~vlm_vision.vlm.feature_cache.FeatureStore` of a frozen tower: items then hold each image's
            tower features (`"features"`) instead of its pixels, and the tower does not run (flipped images read
            their flipped rows).
        on_error: "skip" (the next usable sample instead, reported in the batch) or "raise".

    Items: `{"encoded": {"input_ids", "labels"} (or a list of them, one per question), "images": [(C, H, W)],
    "image_labels": [int per image], "skipped": [SkippedSample]}`. In the processor's native and tiles modes each
    image is the dict of its model inputs (`processor.preprocess_images`) and the encoding holds its own layout.
    """

    def __init__(
        self,
        index,
        processor: VisionLanguageProcessor,
        *,
        max_length: int | None = None,
        chat_template: str | None = None,
        separate_questions: bool = False,
        image_label: Callable[[VLMSample], int] | None = None,
        horizontal_flip: bool = False,
        seed: int = 0,
        cache: bool = False,
        features=None,
        on_error: str = "skip",
    ):
        _check_on_error(on_error)
        mode = getattr(processor, "image_mode", "fixed")
        if mode != "fixed" and (horizontal_flip or features is not None):
            raise ValueError(
                f"image_mode={mode!r} works on the images themselves: horizontal_flip and cached tower features are "
                "for image_mode='fixed' only; turn them off (stage horizontal_flip / cache_features)."
            )
        self.index = SampleList(index) if isinstance(index, list) else index
        if len(self.index) == 0:
            raise ValueError(f"{getattr(self.index, 'source', 'The data')} has no samples.")
        self.processor = processor
        self.max_length = max_length
        self.chat_template = chat_template
        self.separate_questions = separate_questions
        self.image_label = image_label
        self.horizontal_flip = horizontal_flip
        self.seed = seed
        self.epoch = 0
        self.on_error = on_error
        self._encodings: dict[str, Any] | None = {} if cache else None
        self._images = ProcessedImages(processor, cache=cache)
        self.features = features
        self._unusable: set[int] = set()  # per process: known bad samples are not read again

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def source(self) -> str:
        return getattr(self.index, "source", "samples")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} samples")
        index %= len(self)
        skipped = []
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            if current in self._unusable:
                continue
            try:
                item = self._item(current)
            except SampleProblem as problem:
                skipped.append(self._unusable_sample(current, problem))
                continue
            item["skipped"] = skipped
            return item
        raise BadSampleError(f"None of the {len(self)} samples of {self.source} can be used: {skipped[:3]}")

    def _unusable_sample(self, index: int, problem: SampleProblem) -> SkippedSample:
        sample_id = getattr(problem, "sample_id", None) or str(index)
        message = f"{sample_id}: {problem.problem}"
        if self.on_error == "raise":
            raise BadSampleError(
                f"{self.source}, sample {message}. Fix or remove it, or pass on_error='skip' to train on the next "
                "usable sample instead (bad samples are counted and named at the end of the stage)."
            ) from problem
        self._unusable.add(index)
        logger.debug("skipping sample %s of %s: %s", sample_id, self.source, problem.problem)
        return SkippedSample(sample_id, problem.reason, message, problem.file)

    def _item(self, index: int) -> dict[str, Any]:
        try:
            sample = self.index.sample(index)
        except SampleProblem as problem:
            problem.sample_id = f"entry {index}"
            raise
        try:
            return self._build(sample, index)
        except SampleProblem as problem:
            problem.sample_id = sample.id
            raise

    def _build(self, sample: VLMSample, index: int) -> dict[str, Any]:
        if sample.num_image_tags != len(sample.images):
            raise SampleProblem(
                TAG_MISMATCH, f"{sample.num_image_tags} {IMAGE_TOKEN} tags but {len(sample.images)} images"
            )
        if self.separate_questions:
            if len(sample.images) != 1:
                raise ValueError(
                    f"separate_questions needs one image per sample; {sample.id} has {len(sample.images)}: turn it off "
                    "for multi-image or text-only data."
                )
            images = [self._pixel_values(image) for image in sample.images] if self._layouts_needed else None
            layouts = [layout for _, layout in images] if images else None
            encoded = [self._encode(turn, layouts) for turn in split_questions(sample.messages)]
            if not encoded:
                raise SampleProblem(MALFORMED, "no question/answer turn")
        else:
            images = [self._pixel_values(image) for image in sample.images] if self._layouts_needed else None
            encoded = self._encode(sample.messages, [layout for _, layout in images] if images else None)
        if self._layouts_needed:
            return {
                "encoded": encoded,
                "images": [inputs for inputs, _ in images],
                "image_labels": self._image_labels(sample),
            }
        flip = self.horizontal_flip and _flip_bit(self.seed, self.epoch, index)
        labels = self._image_labels(sample)
        if self.features is not None:
            features = [self._features(image, flip) for image in sample.images]
            return {"encoded": encoded, "images": features, "features": True, "image_labels": labels}
        images = [self._pixel_values(image) for image in sample.images]
        if flip:
            images = [image.flip(-1) for image in images]
        return {"encoded": encoded, "images": images, "image_labels": labels}

    @property
    def _layouts_needed(self) -> bool:
        """Native and tiles modes: an image's tokens depend on it, so the images are processed before the text."""
        return getattr(self.processor, "image_mode", "fixed") != "fixed"

    def _image_labels(self, sample: VLMSample) -> list[int]:
        label = self.image_label(sample) if self.image_label is not None else -100
        return [label] * len(sample.images)

    def _features(self, image, flipped: bool) -> torch.Tensor:
        path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        if path is None or path not in self.features.index:
            reason = self.features.unreadable.get(path) if path is not None else None
            if reason is None:
                raise ValueError(
                    f"{image!r} is not in the feature store {self.features.folder}: build it over every image file "
                    "of the data (in-memory images can't be cached)."
                )
            problem = UNREADABLE_IMAGE if os.path.exists(path) else MISSING_IMAGE
            raise SampleProblem(problem, f"image {path}: {reason}", path)
        return self.features.features(path, flipped)

    def _encode(self, messages: list[dict], layouts: list[list[int]] | None = None) -> dict[str, list[int]]:
        key = json.dumps([messages, layouts] if layouts else messages) if self._encodings is not None else None
        if key is not None and key in self._encodings:
            return self._encodings[key]
        try:
            encoded = self.processor.encode_conversation(
                messages, max_length=self.max_length, chat_template=self.chat_template, image_layouts=layouts
            )
        except ConversationTooLongError as error:
            raise SampleProblem(TOO_LONG, str(error)) from None
        if key is not None:
            self._encodings[key] = encoded
        return encoded

    def _pixel_values(self, image):
        try:
            return self._images(image)
        except ImageLoadError as error:
            reason = UNREADABLE_IMAGE if os.path.exists(error.path) else MISSING_IMAGE
            raise SampleProblem(reason, f"image {error.path}: {error.reason}", error.path) from None


class VLMCollator:
    """Items of :class:`VLMDataset` -> one padded batch.

    Returns:
        `input_ids`, `attention_mask`, `labels` `(B, T)` (-100 outside the assistant turns and on padding); with
        images, `pixel_values` `(I, C, H, W)` (in placeholder order; or `vision_features` `(I, T, D)` from a feature
        store) and `image_labels` `(I,)`; with separated
        questions, `image_index` `(B,)` (the image each sequence shows); and `skipped`, the samples left out for
        this batch (a list, for the loop's report).

    With `pack_length` (packing, :mod:`.packing`), the conversations are packed into rows of at most that many
    tokens instead: `input_ids`, `labels`, `position_ids` `(R, L)` and no `attention_mask`; the images stay in item
    order and `image_index` maps each `<image>` span of the rows to its image. With `flatten` too, one row `(1, L)`
    holds them all, no padding: for attention per sequence (flash-attention, `"sdpa_varlen"`), where a row's
    length costs nothing (a mask's cost grows with the square of it: sdpa, eager and flex attention take rows).
    """

    def __init__(self, processor: VisionLanguageProcessor, pack_length: int | None = None, flatten: bool = False):
        if pack_length is not None and (not isinstance(pack_length, int) or pack_length <= 0):
            raise ValueError(f"pack_length={pack_length!r} must be a positive int (tokens per packed row) or None.")
        if flatten and pack_length is None:
            raise ValueError("flatten=True packs into one row: give pack_length too (the longest conversation).")
        self.processor = processor
        self.pack_length = pack_length
        self.flatten = flatten

    def __call__(self, items: list[dict]) -> dict:
        # an item holds one conversation, or a list of separate questions about its one image
        per_item = [item["encoded"] if isinstance(item["encoded"], list) else [item["encoded"]] for item in items]
        if self.pack_length is not None:
            batch = self._packed(items, per_item)
        else:
            batch = dict(self.processor.pad_encoded([encoded for group in per_item for encoded in group]))
            if any(isinstance(item["encoded"], list) for item in items):
                if any(len(item["images"]) != 1 for item in items):
                    raise ValueError("A batch with separated questions needs exactly one image per item.")
                batch["image_index"] = torch.tensor([number for number, group in enumerate(per_item) for _ in group])
        images = [image for item in items for image in item["images"]]
        if images and isinstance(images[0], dict) and "patch_image_ids" in images[0]:  # native, packed tower rows
            batch.update(self._packed_tower_rows(images))
        elif images and isinstance(images[0], dict):  # native / tiles: each image's model inputs, concatenated
            batch.update({key: torch.cat([image[key] for image in images]) for key in images[0]})
        elif images:  # pixels, or the frozen tower's features from a feature store
            batch["vision_features" if items[0].get("features") else "pixel_values"] = torch.stack(images)
        if images:
            batch["image_labels"] = torch.tensor([label for item in items for label in item["image_labels"]])
        batch["skipped"] = [skipped for item in items for skipped in item.get("skipped", ())]
        return batch

    def _packed_tower_rows(self, images: list[dict]) -> dict:
        """The batch's images (each its own packed row from the image processor's `pack_images`) packed again
        together, first-fit into rows of the processor's `max_packed_length` patch slots: `pixel_values (R, L, ...)`,
        `patch_image_ids (R, L)` (indices into the batch's images, in placeholder order), `spatial_shapes (I, 2)`."""
        image_processor = self.processor.image_processor
        row_length = image_processor.max_packed_length or image_processor.max_num_patches
        patches = [image["pixel_values"][image["patch_image_ids"] >= 0].numpy() for image in images]
        shapes = torch.cat([image["spatial_shapes"] for image in images])
        packed = pack_patches(patches, [tuple(s) for s in shapes.tolist()], row_length)
        return {
            "pixel_values": torch.from_numpy(np.stack(packed["pixel_values"])),
            "patch_image_ids": torch.from_numpy(np.stack(packed["patch_image_ids"])),
            "spatial_shapes": shapes,
        }

    def _packed(self, items: list[dict], per_item: list[list[dict]]) -> dict:
        """Packed rows, with each conversation's images: its item's own (in order), or, for separated questions,
        the item's one image for every question."""
        encoded, shown, first = [], [], 0
        for item, group in zip(items, per_item, strict=True):
            numbers = list(range(first, first + len(item["images"])))
            if isinstance(item["encoded"], list) and len(numbers) != 1:
                raise ValueError("A batch with separated questions needs exactly one image per item.")
            encoded.extend(group)
            shown.extend([numbers] * len(group))
            first += len(numbers)
        packed = pack_encoded(encoded, self.pack_length, self.processor.tokenizer.pad_token_id, shown, self.flatten)
        if not first:  # text only
            del packed["image_index"]
        return packed


__all__ = ["VLMCollator", "VLMDataset", "split_questions"]
