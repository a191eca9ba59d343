"""Sequence packing: several conversations (image spans included) per row give what each one gives alone.

A real tiny Llama (LlamaConfig) with the trained sentencepiece tokenizer of the fixtures, our tower and adapter; the
rows come from the data set and collator the training uses.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.launch import launch_two_processes
from tests.test_train_vlm import ALIGN, TINY, recipe, weights
from tests.vlm_helpers import build_vlm, shapes_image, vqa
from vlm_vision.data.conversations import VLMSample
from vlm_vision.data.dataset import VLMCollator, VLMDataset
from vlm_vision.data.packing import pack_encoded, pack_sequences
from vlm_vision.training.vlm_recipe import run_vlm_recipe
from vlm_vision.vlm.modeling_vlm import flatten_packed_rows
from vlm_vision.vlm.packed_attention import SDPA_VARLEN
from vlm_vision.vlm.processing_vlm import IGNORE_INDEX

# an attention function transformers' masking_utils knows nothing of: it gets no mask, so it can't keep packed
# sequences apart (test_a_custom_attention_really_leaks... shows it)
AttentionInterface.register("unmasked_sdpa", sdpa_attention_forward)


@pytest.fixture
def vlm(tokenizer_dir):
    model, processor = build_vlm(LlamaTokenizer.from_pretrained(tokenizer_dir))
    return model.eval(), processor


def samples() -> list[VLMSample]:
    """One image, two images, text only, one image: 64 tokens per image in the tiny VLM."""
    images = [shapes_image(seed) for seed in range(4)]
    return [
        VLMSample(images[:1], vqa("what is the blue shape?", "a blue circle"), "one"),
        VLMSample(
            images[1:3], vqa("describe the image.", "the shape is a yellow triangle on a white background.", 2), "two"
        ),
        VLMSample([], [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "no"}], "text"),
        VLMSample(images[3:], vqa("is there a red triangle in the image?", "no"), "three"),
    ]


def alone(model, collator, item) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits (T, V), summed token loss and supervised-token count of one conversation run by itself."""
    batch = {k: v for k, v in collator([item]).items() if k in ("input_ids", "labels", "pixel_values")}
    outputs = model(**batch)
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return outputs.logits[0], outputs.loss * count, count


def spans(batch: dict, lengths: list[int]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each packed conversation, found from the position ids and matched by length."""
    found = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [(row, a, b) for a, b in itertools.pairwise(starts)]
    by_length = {}
    for row, a, b in found:
        by_length.setdefault(b - a, []).append((row, a, b))
    return [by_length[n].pop(0) for n in lengths]


def test_first_fit_packing_fills_rows_longest_first():
    assert pack_sequences([30, 90, 40, 70], 128) == [[1, 0], [3, 2]]
    assert pack_sequences([5, 5, 5], 5) == [[0], [1], [2]]
    packed = pack_encoded(
        [{"input_ids": [7, 8, 9], "labels": [7, 8, 9]}, {"input_ids": [4, 5], "labels": [-100, 5]}], 8, 0, [[0], []]
    )
    assert packed["input_ids"].tolist() == [[7, 8, 9, 4, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 8, 9, -100, 5]]  # each first token is never predicted
    assert packed["image_index"].tolist() == [0]
    with pytest.raises(ValueError, match="Sequence 1 is 9 tokens long, over the packed row length 8: build the data"):
        pack_sequences([3, 9], 8)
    # flattened: one row, in the given order, no padding, each sequence still at most the row length
    encoded = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 6, 5)]
    flat = pack_encoded(encoded, 6, 0, flatten=True)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="Sequence 1 is 6 tokens long, over the packed row length 5"):
        pack_encoded(encoded, 5, 0, flatten=True)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_transformers_masks_packed_rows_only_without_attention_mask_and_cache(implementation):
    """The fact the VLM relies on, checked on transformers 5.x itself: masking_utils builds a block-diagonal mask
    from position_ids when attention_mask is None and use_cache=False; with the config's use_cache=True (a cache
    is made) the second sequence attends to the first."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    lm = LlamaForCausalLM(config).eval()
    lm.set_attn_implementation(implementation)
    first, second = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 5))
    row, positions = torch.cat([first, second], 1), torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        expected = lm(second).logits
        packed = lm(row, position_ids=positions, use_cache=False).logits[:, 7:]
        leaking = lm(row, position_ids=positions).logits[:, 7:]
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    assert (leaking - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("implementation", "flatten", "checkpointing"),
    [("sdpa", False, False), (SDPA_VARLEN, False, False), (SDPA_VARLEN, True, False), (SDPA_VARLEN, True, True)],
    ids=["sdpa-rows", "varlen-rows", "varlen-one-row", "varlen-one-row-checkpointed"],
)
def test_a_packed_batch_gives_each_conversations_logits_loss_and_gradients(vlm, implementation, flatten, checkpointing):
    """Rows through sdpa's block-diagonal mask, or rows / one row without padding through sdpa per conversation
    (`sdpa_varlen`; checkpointed: its layers recomputed in backward, outside the VLM's packed forward)."""
    model, processor = vlm
    model.language_model.set_attn_implementation(implementation)
    if checkpointing:
        model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
        model.language_model.train()  # checkpointing runs in training only (the tiny Llama has no dropout)
    dataset = VLMDataset(samples(), processor, max_length=200)
    items = [dataset[i] for i in range(len(dataset))]
    lengths = [len(item["encoded"]["input_ids"]) for item in items]
    batch = VLMCollator(processor, pack_length=200, flatten=flatten)([dict(item) for item in items])
    rows = 1 if flatten else 2  # 4 conversations in 2 rows of at most 200 tokens, or all in one
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == rows
    assert not flatten or batch["input_ids"].shape[1] == sum(lengths)  # no padding at all
    assert batch["pixel_values"].shape[0] == 4  # the images in item order; image_index follows the rows
    assert sorted(batch["image_index"].tolist()) == [0, 1, 2, 3]
    assert (batch["image_index"].tolist() == [0, 1, 2, 3]) == flatten  # rows reorder the conversations

    inputs = {k: v for k, v in batch.items() if k not in ("image_labels", "skipped")}
    packed = model(**inputs)
    packed.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    plain = VLMCollator(processor)
    total, count = 0.0, 0
    for (row, start, end), item in zip(spans(batch, lengths), items, strict=True):
        logits, loss_sum, tokens = alone(model, plain, item)
        torch.testing.assert_close(packed.logits[row, start:end], logits, atol=1e-5, rtol=0)
        total, count = total + loss_sum, count + tokens
    loss = total / count  # the sum over every supervised token / their count, as the packed loss
    torch.testing.assert_close(packed.loss, loss, atol=1e-5, rtol=0)
    loss.backward()
    assert packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("vision_tower.") for n in packed_grads)  # the tower's gradient comes through the spans
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(packed_grads[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_a_packed_row_does_not_leak_attention(vlm, implementation):
    """Sample A (two images, longer: packed first) and B in one row; changing A's question and image does not
    change B's logits. (B before A would show nothing: causal attention never looks ahead anyway.)"""
    model, processor = vlm
    model.language_model.set_attn_implementation(implementation)
    collator = VLMCollator(processor, pack_length=400)
    sample_b, sample_a = samples()[:2]
    changed_a = VLMSample([shapes_image(7), sample_a.images[1]], vqa("what color is the circle?", "yes", 2), "two")
    keys = ("input_ids", "position_ids", "pixel_values", "image_index")
    outputs = []
    for a in (sample_a, changed_a):
        dataset = VLMDataset([sample_b, a], processor, max_length=400)
        batch = collator([dataset[0], dataset[1]])
        assert batch["input_ids"].shape[0] == 1 and batch["image_index"].tolist() == [1, 2, 0]  # A, then B
        with torch.no_grad():  # flex attention has no backward on CPU
            outputs.append(model(**{k: batch[k] for k in keys}).logits[0])
    length_b = len(dataset[0]["encoded"]["input_ids"])
    torch.testing.assert_close(outputs[1][-length_b:], outputs[0][-length_b:], atol=1e-5, rtol=0)
    common = min(len(outputs[0]), len(outputs[1])) - length_b
    assert (outputs[1][:common] - outputs[0][:common]).abs().max() > 1e-3  # A's own logits did change


def test_packing_refuses_what_would_attend_across_conversations(vlm):
    model, processor = vlm
    items = [VLMDataset(samples(), processor, max_length=400)[i] for i in (0, 2)]
    batch = VLMCollator(processor, pack_length=400)(items)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "pixel_values", "image_index")}
    with pytest.raises(ValueError, match=r"an attention_mask was given.*Pass attention_mask=None"):
        model(**inputs, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match=r"can't use a cache.*use_cache=False"):
        model(**inputs, use_cache=True)
    with pytest.raises(ValueError, match=r"count 0, 1, 2, \.\.\. within each sequence"):
        model(**{**inputs, "position_ids": inputs["position_ids"] + (inputs["position_ids"] == 0).long()})

    # an attention function masking_utils doesn't know gets no mask at all: it really leaks, so it is refused
    lm = model.language_model
    lm.set_attn_implementation("unmasked_sdpa")
    with torch.no_grad():
        left = lm(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        lm.set_attn_implementation("sdpa")
        right = lm(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert (left - right).abs().max() > 1e-3
    lm.set_attn_implementation("unmasked_sdpa")
    with pytest.raises(ValueError, match=r"'unmasked_sdpa' can't keep packed sequences apart.*\['sdpa', 'eager'"):
        model(**inputs)

    # a sample longer than the row: the data set skips and reports it (max_length is the row length), and a
    # collator given one anyway names the fix
    long_one = VLMSample([shapes_image(0)] * 3, vqa("describe the image.", "a blue circle", 3), "long")
    dataset = VLMDataset([long_one, *samples()[:1]], processor, max_length=100)
    (skipped,) = dataset[0]["skipped"]
    assert skipped.id == "long" and "224 tokens long, over max_length=100" in skipped.message
    too_long = VLMDataset([long_one], processor, max_length=None)[0]
    with pytest.raises(ValueError, match="over the packed row length 100: build the data set with max_length"):
        VLMCollator(processor, pack_length=100)([too_long])
    with pytest.raises(ValueError, match=r"flatten=True packs into one row: give pack_length too"):
        VLMCollator(processor, flatten=True)


def test_a_recipe_stage_trains_the_same_packed_as_padded(tmp_path, caplog):
    """`data.packing`: the loss of each step is the padded batch's (same tokens, same normalisation), so two steps
    give the same weights."""
    full = {**ALIGN, "name": "full", "kind": "full", "max_steps": 2}
    run_vlm_recipe(recipe(full), str(tmp_path / "padded"), progress_bar=False, evaluate=False)
    packed = recipe({**full, "data": {"packing": True}})
    eager = recipe({**full, "data": {"packing": True}})
    eager.language_model["attn_implementation"] = "eager"
    with caplog.at_level(logging.INFO, logger="vlm_vision.training.vlm_recipe"):
        run_vlm_recipe(packed, str(tmp_path / "packed"), progress_bar=False, evaluate=False)
        run_vlm_recipe(eager, str(tmp_path / "eager"), progress_bar=False, evaluate=False)
    # sdpa (the recipe's) moves to sdpa per conversation, one row per batch; eager takes rows and a mask
    assert (
        "stage full: conversations packed into one row per batch, sdpa_varlen attention per conversation (each at "
        "most 256 tokens)" in caplog.text
    )
    assert "stage full: conversations packed into rows of up to 256 tokens (eager)" in caplog.text
    a = weights(tmp_path / "padded" / "full" / "model")
    for layout in ("packed", "eager"):
        b = weights(tmp_path / layout / "full" / "model")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=f"{layout}: {key}")
    saved = json.loads((tmp_path / "packed" / "full" / "model" / "config.json").read_text())
    assert SDPA_VARLEN not in json.dumps(saved)  # the stage's choice is not saved: the folder loads on sdpa

    with pytest.raises(ValueError, match=r"data.packing='yes'; use true"):
        recipe({**full, "data": {"packing": "yes"}})
    refused = recipe({**full, "data": {"packing": True}})
    refused.language_model["attn_implementation"] = "unmasked_sdpa"
    with pytest.raises(ValueError, match="'unmasked_sdpa' can't keep packed sequences apart"):
        run_vlm_recipe(refused, str(tmp_path / "refused"), progress_bar=False, evaluate=False)


def test_two_fsdp2_processes_train_packed_rows_as_one_process_padded(tmp_path):
    """Packing under the loop's FSDP2 sharding on 2 CPU processes (each packs its own micro-batches): the weights
    of one process on padded batches."""
    full = {**ALIGN, "name": "full", "kind": "full", "max_steps": 2}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**TINY, "data": {**TINY["data"], "packing": True}, "stages": [full]}))
    done = launch_two_processes(
        "train_vlm.py", "--recipe", str(path), "--output-dir", str(tmp_path / "two"), "--no-progress-bar", "--no-eval",
        cwd=tmp_path, config="fsdp_cpu_2proc.yaml",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2: process 1 of 2 holds" in done.stderr and "conversations packed into one row" in done.stderr
    run_vlm_recipe(recipe(full), str(tmp_path / "one"), progress_bar=False, evaluate=False)
    one, two = weights(tmp_path / "one" / "full" / "model"), weights(tmp_path / "two" / "full" / "model")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)


def test_separated_questions_pack_with_their_image_encoded_once(vlm):
    """Each question about an image becomes its own conversation; packed, every one still reads its item's image
    (image_index) and the loss is the padded batch's."""
    model, processor = vlm
    turns = [
        ("what is the blue shape?", "a blue circle"),
        ("what color is the circle?", "yes"),
        ("describe the image.", "the shape is a yellow triangle on a white background."),
    ]
    conversation = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    conversation[0]["content"] = "<image>\n" + conversation[0]["content"]
    samples = [VLMSample([shapes_image(seed)], conversation, f"image{seed}") for seed in (0, 1)]
    dataset = VLMDataset(samples, processor, max_length=300, separate_questions=True)
    items = [dataset[0], dataset[1]]
    padded = VLMCollator(processor)(items)
    packed = VLMCollator(processor, pack_length=300)(items)
    assert padded["input_ids"].shape[0] == 6 and packed["input_ids"].shape[0] == 2  # three per row
    assert packed["pixel_values"].shape[0] == 2 and sorted(packed["image_index"].tolist()) == [0, 0, 0, 1, 1, 1]
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_index")
    with torch.no_grad():
        losses = [model(**{k: batch[k] for k in keys if k in batch}).loss for batch in (padded, packed)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)


def test_rows_flattened_for_flash_attention_give_the_same_logits_and_loss(vlm):
    """flash-attention's varlen path reads packed sequences from one row only, so the VLM flattens the rows for it;
    flash-attention doesn't run here, but sdpa over the flattened row must give what the rows give (the same
    block-diagonal attention, and no loss term from one row's last token to the next row's first)."""
    model, processor = vlm
    dataset = VLMDataset(samples(), processor, max_length=200)
    batch = VLMCollator(processor, pack_length=200)([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], None, image_index=batch["image_index"])
        labels = batch["labels"].masked_fill(batch["input_ids"] == processor.image_token_id, IGNORE_INDEX)
        rows = model.language_model(
            inputs_embeds=embeds, position_ids=batch["position_ids"], labels=labels, use_cache=False
        )
        flat = model.language_model(**flatten_packed_rows(embeds, batch["position_ids"], labels), use_cache=False)
        # the model's own path: the same as rows
        through_model = model(
            **{k: batch[k] for k in ("input_ids", "labels", "position_ids", "pixel_values", "image_index")}
        )
    assert flat.logits.shape[:2] == (1, batch["input_ids"].numel())
    torch.testing.assert_close(flat.logits.reshape(rows.logits.shape), rows.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.loss, rows.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(through_model.loss, rows.loss, atol=1e-6, rtol=0)
