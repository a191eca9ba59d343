"""`"sdpa_varlen"`: transformers' sdpa attention, run on each packed sequence alone (registered with transformers).

transformers keeps packed sequences apart under sdpa with a dense block-diagonal mask built from the position ids
(`masking_utils.find_packed_sequence_indices`): a row costs its length squared in attention (and in mask memory),
however many sequences it holds, and sdpa with a mask can't take its causal fast path. Flash-attention's varlen
kernels instead run each sequence alone from `cu_seqlens`; this is that on sdpa, for CPUs and GPUs without
flash-attention: inside the VLM's forward on packed rows (`packed_sequences()`), the mask interface builds no mask
and the attention function calls transformers' `sdpa_attention_forward` causally on each sequence's span, so the
cost is the sum of the sequences' squared lengths and one flattened row without padding costs no more than rows.

Inside `packed_sequences()` attention is causal within each sequence (a sliding window kept): a model that layers
its own mask on the causal one (masking_utils' `or_mask_function`, as Gemma 3's bidirectional image tokens) gets
that only outside it. Everywhere else (padded batches, generation with a cache, any attention mask) it is
transformers' sdpa unchanged, mask and all: a model can keep `attn_implementation="sdpa_varlen"` for evaluation
and generation. The implementation name is not saved in config files (transformers drops it), so saved folders load
with sdpa.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_VARLEN = "sdpa_varlen"

# inside packed_sequences(): (the position ids given, their spans), found once for every layer (one device sync)
_packed: ContextVar[tuple[torch.Tensor | None, list] | None] = ContextVar("vlm_vision_packed_sequences", default=None)


@contextmanager
def packed_sequences(position_ids: torch.Tensor | None = None) -> Iterator[None]:
    """Within: a language model on `"sdpa_varlen"` called without an attention mask and without a cache builds no
    mask and runs attention per sequence, reading the sequences from the position ids (the VLM's packed forward).
    With `position_ids`, the language model's, their sequences are found once instead of in every layer."""
    token = _packed.set((position_ids, None if position_ids is None else sequence_spans(position_ids)))
    try:
        yield
    finally:
        _packed.reset(token)


def sequence_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of `position_ids (B, T)`, the `(start, end)` of each sequence: a new one wherever the position does
    not step by +1 (transformers' `find_packed_sequence_indices` convention)."""
    rows, length = position_ids.shape
    starts = torch.ones(rows, length, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    spans = []
    for row in starts.cpu().tolist():
        first = [t for t, start in enumerate(row) if start]
        spans.append(list(zip(first, [*first[1:], length], strict=True)))
    return spans


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal within the last `window` positions (transformers' sliding-window convention), `(1, 1, L, L)` bool."""
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`sdpa_attention_forward` per sequence of packed rows (no mask given, as many keys as queries, position ids
    with restarts); `sdpa_attention_forward` itself otherwise. Returns `(B, T, H, D)` and no weights."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != query.shape[2]:
        if _packed.get() is not None:  # no mask was built: without the sequences, attention would cross them
            raise ValueError(
                f"{type(module).__name__} does not pass (batch, length) position_ids to its attention function, so "
                f"{SDPA_VARLEN!r} can't find the packed sequences. Use attn_implementation='sdpa' for this language "
                "model (a block-diagonal mask), or turn packing off."
            )
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    known, spans = _packed.get() or (None, None)
    if position_ids is not known or len(spans) != query.shape[0]:  # recomputed in backward, or other ids
        spans = sequence_spans(position_ids.expand(query.shape[0], -1))
    if all(len(row) == 1 for row in spans):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    window = kwargs.get("sliding_window") or None
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = []
        for start, end in row_spans:
            mask = None
            if window is not None and end - start > window:
                mask = _window_mask(end - start, window, query.device)
            piece, _ = sdpa_attention_forward(
                module,
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                mask,
                **kwargs,
            )
            pieces.append(piece)
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def sdpa_varlen_mask(*args, **kwargs):
    """transformers' `sdpa_mask`, except for packed rows in `packed_sequences()` (no padding mask, no cache): no
    mask, the attention function reads the sequences from the position ids."""
    unpadded = kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
    if _packed.get() is not None and unpadded and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention_forward)
AttentionMaskInterface.register(SDPA_VARLEN, sdpa_varlen_mask)

__all__ = ["SDPA_VARLEN", "packed_sequences", "sdpa_varlen_attention_forward", "sdpa_varlen_mask", "sequence_spans"]
