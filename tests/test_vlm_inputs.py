"""The VLM side of bad input: strict weight loading, wrong pixel values and token ids, chat messages in transformers'
content-list form, processors without a tokenizer, misspelt roles and null answers, LLaVA's config names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tests.vlm_helpers import build_vlm, shapes_image
from vlm_vision import VisionLanguageForConditionalGeneration
from vlm_vision.modeling_vlm_vit import CheckpointFileError, CheckpointMismatchError


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def vlm(tokenizer):
    return build_vlm(tokenizer)


@pytest.fixture
def saved_vlm(vlm, tmp_path):
    model, _ = vlm
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    return model, folder


# ---- 1. strict loading -------------------------------------------------------------------------------------------


def test_a_checkpoint_missing_weights_is_refused_listing_them(saved_vlm):
    model, folder = saved_vlm
    weights = load_file(folder / "model.safetensors")
    dropped = ["adapter.linear_2.weight", "vision_tower.layers.0.attention.q_proj.weight"]
    assert all(key in weights for key in dropped)
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors")

    with pytest.raises(CheckpointMismatchError, match="allow_missing_keys=True") as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ValueError)
    assert all(key in str(caught.value) for key in dropped) and str(folder) in str(caught.value)

    loaded = VisionLanguageForConditionalGeneration.from_pretrained(folder, allow_missing_keys=True)
    kept = "adapter.linear_1.weight"
    assert torch.equal(loaded.state_dict()[kept], model.state_dict()[kept])
    with pytest.raises(TypeError, match="allow_missing_keys must be True or False"):
        VisionLanguageForConditionalGeneration.from_pretrained(folder, allow_missing_keys="yes")


def test_weights_of_another_shape_are_all_listed(saved_vlm):
    _, folder = saved_vlm
    weights = load_file(folder / "model.safetensors")
    resized = ["adapter.linear_1.weight", "vision_tower.layers.1.mlp.fc1.weight"]
    for key in resized:
        weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, folder / "model.safetensors")

    with pytest.raises(CheckpointMismatchError) as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert all(key in message for key in resized) and "ignore_mismatched_sizes=True" in message


@pytest.mark.parametrize("size", ["truncated", "empty"])
def test_a_damaged_weight_file_is_named(saved_vlm, size):
    _, folder = saved_vlm
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if size == "truncated" else b"")

    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    assert str(path) in str(caught.value) and isinstance(caught.value, OSError)


# ---- 2. pixel values and token ids that aren't the processor's ---------------------------------------------------


@pytest.fixture
def batch(vlm):
    _, processor = vlm
    return processor(images=[shapes_image(0)], text="<image>\nwhat is the blue shape?")


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: p.numpy(), TypeError, "got numpy.ndarray"),
        (lambda p: [p[0]], TypeError, "got builtins.list"),
        (lambda p: (p * 60 + 120).clamp(0, 255).to(torch.uint8), TypeError, "dtype torch.uint8"),
        (lambda p: p.long(), TypeError, "dtype torch.int64"),
        (lambda p: p[0], ValueError, r"pixel_values\[None\]"),
    ],
    ids=["numpy", "list", "uint8", "int64", "3-d"],
)
def test_pixel_values_the_processor_would_not_make_are_refused(vlm, batch, make, error, words):
    model, _ = vlm
    with pytest.raises(error, match=words) as caught:
        model(input_ids=batch["input_ids"], pixel_values=make(batch["pixel_values"]))
    assert error is ValueError or "VisionLanguageProcessor" in str(caught.value)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda ids: ids.numpy(), TypeError, "got numpy.ndarray"),
        (lambda ids: ids.float(), TypeError, "torch.float32"),
        (lambda ids: ids[0], ValueError, r"input_ids\[None\]"),
    ],
    ids=["numpy", "float", "1-d"],
)
def test_input_ids_that_are_not_integer_batches_are_refused(vlm, batch, make, error, words):
    model, _ = vlm
    with pytest.raises(error, match=words):
        model(input_ids=make(batch["input_ids"]), pixel_values=batch["pixel_values"])


def test_the_processors_batch_still_runs(vlm, batch):
    model, processor = vlm
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
