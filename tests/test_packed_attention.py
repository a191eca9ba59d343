"""`"sdpa_varlen"` (vlm_vision.vlm.packed_attention): sdpa per packed sequence, and transformers' sdpa elsewhere.

Real tiny transformers LMs (Llama with grouped-query attention, Qwen2 with a sliding window), compared with each
sequence run alone on transformers' own sdpa.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import create_causal_mask

from vlm_vision.vlm import packed_attention
from vlm_vision.vlm.packed_attention import SDPA_VARLEN, packed_sequences, sdpa_varlen_attention_forward

SMALL = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def packed_row(lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random sequences of `lengths` and their packed row: `(sequences, input_ids (1, T), position_ids (1, T))`."""
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 100, (n,), generator=generator) for n in lengths]
    return sequences, torch.cat(sequences)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def assert_each_sequence_alone(lm, sequences, packed_logits) -> None:
    """The packed row's logits are those of each sequence run alone on transformers' sdpa."""
    lm.set_attn_implementation("sdpa")
    start = 0
    for sequence in sequences:
        with torch.no_grad():
            alone = lm(sequence[None], use_cache=False).logits[0]
        torch.testing.assert_close(packed_logits[start : start + len(sequence)], alone, atol=1e-5, rtol=0)
        start += len(sequence)


def test_sdpa_varlen_is_transformers_sdpa_outside_packed_rows():
    """Bit for bit: a left-padded batch with its mask, greedy generation with a cache, and packed rows outside
    `packed_sequences()` (masking_utils' block-diagonal mask, given to sdpa)."""
    lm = llama()
    input_ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    _, row, positions = packed_row([7, 5, 9])
    results = {}
    for implementation in ("sdpa", SDPA_VARLEN):
        lm.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = (
                lm(input_ids, attention_mask=attention_mask).logits,
                lm.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False),
                lm(row, position_ids=positions, use_cache=False).logits,
            )
    for ours, theirs in zip(results[SDPA_VARLEN], results["sdpa"], strict=True):
        assert torch.equal(ours, theirs)


def test_packed_rows_attend_within_each_sequence_without_a_mask():
    lm = llama()
    sequences, row, positions = packed_row([7, 5, 9, 1])
    lm.set_attn_implementation(SDPA_VARLEN)
    embeds = lm.get_input_embeddings()(row)
    with packed_sequences():
        mask = create_causal_mask(lm.config, embeds, None, None, position_ids=positions)
        with torch.no_grad():
            packed = lm(row, position_ids=positions, use_cache=False).logits[0]
    assert mask is None  # no (T, T) mask: the attention reads the sequences from the position ids
    outside = create_causal_mask(lm.config, embeds, None, None, position_ids=positions)
    assert outside.shape == (1, 1, 22, 22) and not outside[0, 0, 7, 6]  # sdpa's block-diagonal mask, outside
    assert_each_sequence_alone(lm, sequences, packed)


def test_a_sliding_window_holds_within_each_packed_sequence():
    """Qwen2 with a 4-token window on every layer: sequences longer than it keep it, packed."""
    torch.manual_seed(0)
    config = Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=0, layer_types=["sliding_attention"] * 2,
    )  # fmt: skip
    lm = Qwen2ForCausalLM(config).eval()
    sequences, row, positions = packed_row([11, 3, 9])
    lm.set_attn_implementation(SDPA_VARLEN)
    with packed_sequences(), torch.no_grad():
        packed = lm(row, position_ids=positions, use_cache=False).logits[0]
    assert_each_sequence_alone(lm, sequences, packed)
    lm.config.sliding_window = 64  # the window does matter on these lengths
    with torch.no_grad():
        unwindowed = lm(sequences[0][None], use_cache=False).logits[0]
    assert (unwindowed - packed[:11]).abs().max() > 1e-3


def test_an_attention_call_without_position_ids_is_refused_in_packed_rows():
    query = key = value = torch.randn(1, 2, 6, 8)
    with packed_sequences(), pytest.raises(ValueError, match=r"does not pass \(batch, length\) position_ids.*'sdpa'"):
        sdpa_varlen_attention_forward(torch.nn.Module(), query, key, value, None, scaling=0.35)
    out, _ = sdpa_varlen_attention_forward(torch.nn.Module(), query, key, value, None, scaling=0.35)
    assert out.shape == (1, 6, 2, 8)  # outside packed rows: plain causal sdpa


def test_the_sequences_are_found_once_per_forward_when_given(monkeypatch):
    """`packed_sequences(position_ids)` finds the spans once for every layer (one device sync on a GPU). (A layer
    recomputed in backward, outside the context, finds them again: test_packing's checkpointed case.)"""
    lm = llama()
    sequences, row, positions = packed_row([7, 5, 9])
    lm.set_attn_implementation(SDPA_VARLEN)
    calls = []
    original = packed_attention.sequence_spans
    monkeypatch.setattr(packed_attention, "sequence_spans", lambda ids: calls.append(ids) or original(ids))
    with packed_sequences(positions), torch.no_grad():
        packed = lm(row, position_ids=positions, use_cache=False).logits[0]
    assert len(calls) == 1  # not once per layer (2)
    assert_each_sequence_alone(lm, sequences, packed)
