"""Padding-free packing: several encoded conversations (image placeholders included) in one row of the batch.

    conversations of 30, 90, 40 and 70 tokens, row length 128
    -> row 0: [90 | 30]   position_ids 0..89, 0..29
       row 1: [70 | 40]   position_ids 0..69, 0..39        (rows padded to the longest; the tail is its own block)

Each conversation keeps its own labels; the first label of each one is -100 (in a padded batch the first token is
never predicted either: the LM shifts labels by one, and packed, it would be predicted from the conversation before).
position_ids restart at 0 per conversation and there is no `attention_mask`: that is transformers' flattening
convention (`DataCollatorWithFlattening`). From it, sdpa, eager and flex attention build a block-diagonal causal
mask (`masking_utils.find_packed_sequence_indices`, only when `attention_mask` is None and no cache is used: the
VLM's forward turns the cache off), flash-attention runs varlen on `cu_seqlens` (one flattened row: the VLM's
forward flattens) and `"sdpa_varlen"` (:mod:`vlm_vision.vlm.packed_attention`) runs sdpa on each sequence alone.
:class:`~vlm_vision.vlm.modeling_vlm.VisionLanguageForConditionalGeneration` checks the LM's attention
implementation can honour it and refuses one that can't.

Attention per sequence costs the same whatever the layout, so for those implementations `flatten=True` puts a
batch's conversations in one row with no padding at all (transformers' `DataCollatorWithFlattening` layout); a
mask costs the row length squared, so for sdpa, eager and flex attention rows of at most `row_length` tokens.

Images keep their order in the batch (so per-image labels stay aligned); `image_index` says which image each
`<image>` span of the packed rows shows, as packing reorders the conversations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..vlm.processing_vlm import IGNORE_INDEX


def check_lengths(lengths: Sequence[int], row_length: int) -> None:
    """Refuse a sequence longer than a packed row, naming the fix."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        index, length = too_long[0]
        raise ValueError(
            f"Sequence {index} is {length} tokens long, over the packed row length {row_length}: build the data set "
            "with max_length equal to the row length (longer samples are then skipped and reported), or raise it."
        )


def pack_sequences(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of sequence indices, each row's lengths summing to at most `row_length` (first fit, longest first: close
    to the fewest rows). Deterministic: ties keep their order."""
    check_lengths(lengths, row_length)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(row_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_encoded(
    encoded: Sequence[dict[str, list[int]]],
    row_length: int,
    pad_token_id: int,
    images_per_sequence: Sequence[Sequence[int]] | None = None,
    flatten: bool = False,
) -> dict[str, torch.Tensor]:
    """Encoded conversations (`{"input_ids", "labels"}` lists) -> packed `input_ids`, `labels`, `position_ids` (R, L),
    L the longest row (at most `row_length`); with `flatten`, one row (1, L) of them all in their order, no padding
    (each still at most `row_length` long).

    `images_per_sequence[i]`: the images (indices into the batch's images) conversation i shows, in placeholder
    order; with it, `image_index` (one entry per `<image>` span of the packed rows, in row-major order) is returned.
    """
    lengths = [len(e["input_ids"]) for e in encoded]
    if flatten:
        check_lengths(lengths, row_length)
        rows = [list(range(len(encoded)))]
    else:
        rows = pack_sequences(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    spans: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, targets = encoded[i]["input_ids"], list(encoded[i]["labels"])
            targets[0] = IGNORE_INDEX  # never predicted, padded or packed (see the module docstring)
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(targets)
            position_ids[r, start:end] = torch.arange(len(ids))
            if images_per_sequence is not None:
                spans.extend(images_per_sequence[i])
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the padding tail: a block of its own
    packed = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if images_per_sequence is not None:
        packed["image_index"] = torch.tensor(spans, dtype=torch.long)
    return packed


__all__ = ["check_lengths", "pack_encoded", "pack_sequences"]
