"""The VLM at any resolution: native patch grids (per-image token counts) and image splitting (tiles)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from tests.vlm_helpers import tiny_text_config, train_tokenizer, vqa
from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, VisionLanguageProcessor
from vlm_vision.encoder.image_processing_vit import VisionTransformerImageProcessor
from vlm_vision.export.encoder_folder import image_processor_for
from vlm_vision.vlm.processing_vlm import IGNORE_INDEX, split_image

SHUFFLE = {"adapter_type": "pixel_shuffle", "scale_factor": 2}


def strip(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture of the given size: random coloured blocks."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def native_processor(max_num_patches: int = 48) -> VisionTransformerImageProcessor:
    # the tiny tower: patch 4, 8x8 position table
    return VisionTransformerImageProcessor(
        patch_size=4, max_num_patches=max_num_patches, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def build(mode: str, adapter=None, seed: int = 0, **processor_kwargs):
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<tile_col>", "<tile_row>"]})
    vision = tiny_config()
    image_processor = native_processor() if mode == "native" else image_processor_for(vision)
    config = VisionLanguageConfig(
        vision_config=vision,
        text_config=tiny_text_config(len(tokenizer)),
        adapter_config=adapter or SHUFFLE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tile_separator_token_ids=tokenizer.convert_tokens_to_ids(["<tile_col>", "<tile_row>"]),
    )
    torch.manual_seed(seed)
    model = VisionLanguageForConditionalGeneration(config).eval()
    processor = VisionLanguageProcessor.from_model_config(
        config, image_processor, tokenizer, image_mode=mode, **processor_kwargs
    )
    return model, processor


def summed_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token loss over its supervised tokens, and their number."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, S - 1), 0 where ignored
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def test_two_aspect_ratios_in_one_batch_get_their_own_token_counts_and_the_loss_of_each_alone():
    model, processor = build("native")
    # 1:4 and 3:1 pictures: grids 14x3 (an odd side: pixel shuffle pads it) and 4x12 within 48 patches
    images = [strip(20, 90, seed=1), strip(96, 32, seed=2)]
    conversations = [vqa("what is the blue shape?", "a blue circle"), vqa("describe the image.", "no")]
    batch = processor.encode_conversations(conversations, [[images[0]], [images[1]]])
    grids = batch["spatial_shapes"].tolist()
    assert grids[0][0] > grids[0][1] and grids[1][0] < grids[1][1]  # aspect ratios kept
    counts = model.image_token_counts(batch["spatial_shapes"])
    expected = [-(-h // 2) * -(-w // 2) for h, w in grids]
    assert counts == expected and counts[0] != counts[1]
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert placeholders == counts
    assert batch["pixel_values"].shape == (2, 48, 3 * 4 * 4)
    assert batch["pixel_attention_mask"].sum(dim=1).tolist() == [h * w for h, w in grids]

    with torch.no_grad():
        sums, tokens = summed_losses(model, batch)
        loss = model(**batch).loss
        alone = [processor.encode_conversations([c], [[image]]) for c, image in zip(conversations, images, strict=True)]
        for row, sample in enumerate(alone):
            alone_sum, alone_tokens = summed_losses(model, sample)
            torch.testing.assert_close(sums[row], alone_sum[0], rtol=1e-5, atol=1e-5)
            assert tokens[row] == alone_tokens[0]
        torch.testing.assert_close(loss, sums.sum() / tokens.sum(), rtol=1e-5, atol=1e-5)
        alone_loss = [model(**sample).loss for sample in alone]
    assert not torch.allclose(alone_loss[0], alone_loss[1])  # the samples differ: the check above can fail


def test_native_image_features_reach_the_logits_at_their_placeholders():
    model, processor = build("native")
    a, b = (processor.encode_conversations([vqa("yes", "no")], [[strip(64, 16, seed=s)]]) for s in (1, 2))
    assert torch.equal(a["input_ids"], b["input_ids"])  # same grid, same text: only the pixels differ
    with torch.no_grad():
        logits_a, logits_b = model(**a).logits, model(**b).logits
    placeholders = (a["input_ids"] == model.config.image_token_id).nonzero()[:, 1]
    first = int(placeholders.min())
    torch.testing.assert_close(logits_a[:, :first], logits_b[:, :first])  # causal: nothing before the image changes
    assert (logits_a[:, first:] - logits_b[:, first:]).abs().max() > 1e-3


def test_native_training_step_reaches_the_adapter_and_lm():
    model, processor = build("native")
    model.train()
    batch = processor.encode_conversations([vqa("what color is the circle?", "yes")], [[strip(64, 20, seed=3)]])
    model(**batch).loss.backward()
    assert model.adapter.linear_1.weight.grad.abs().sum() > 0
    assert model.vision_tower.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_a_packed_tower_batch_gives_the_loss_and_gradients_of_the_padded_one():
    # the tower's images packed into rows (pack_images=True): the same loss, logits and tower gradients
    model, processor = build("native", adapter={"adapter_type": "mlp"})
    model.train()
    images = [strip(20, 90, seed=1), strip(96, 32, seed=2), strip(40, 40, seed=3)]
    conversations = [vqa("what is the blue shape?", "a blue circle"), vqa("describe the image.", "no"), vqa("a", "b")]
    batch = processor.encode_conversations(conversations, [[image] for image in images])
    packer = native_processor()
    packer.pack_images, packer.max_packed_length = True, 96
    packed_images = packer(images=images, return_tensors="pt")
    assert torch.equal(packed_images["spatial_shapes"], batch["spatial_shapes"])
    assert packed_images["pixel_values"].shape[0] < batch["pixel_values"].shape[0]  # fewer tower rows
    packed = {k: v for k, v in batch.items() if k != "pixel_attention_mask"}
    packed.update(pixel_values=packed_images["pixel_values"], patch_image_ids=packed_images["patch_image_ids"])
    # the VLM processor passes the packing image processor's output through as it is
    packing_processor = VisionLanguageProcessor.from_model_config(
        model.config, packer, processor.tokenizer, image_mode="native"
    )
    encoded = packing_processor.encode_conversations(conversations, [[image] for image in images])
    assert encoded.keys() == packed.keys() and all(torch.equal(encoded[k], packed[k]) for k in packed)
    results = []
    for inputs in (batch, packed):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        tower = model.vision_tower.embeddings.patch_embeddings.projection.weight.grad.clone()
        results.append((out.loss.detach(), out.logits.detach(), tower))
    (loss_a, logits_a, grad_a), (loss_b, logits_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=0)
    assert grad_a.abs().sum() > 0
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["native", "tiles"])
def test_generate_in_native_and_tile_modes(mode):
    kwargs = {"max_tiles": 3} if mode == "tiles" else {}
    model, processor = build(mode, **kwargs)
    processor.tokenizer.padding_side = "left"
    prompts = [processor.prompt(vqa("what is the blue shape?", "")[:1]), processor.prompt(vqa("yes", "")[:1])]
    images = [strip(24, 96, seed=4), strip(80, 40, seed=5)]
    inputs = processor(images=images, text=prompts, add_special_tokens=False)
    generation = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        with_cache = model.generate(**inputs, use_cache=True, **generation)
        without_cache = model.generate(**inputs, use_cache=False, **generation)
        first = model(**inputs).logits[:, -1].argmax(dim=-1)
    assert with_cache.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], first)


def test_split_image_follows_the_longest_edge_rule():
    tiles, rows, columns = split_image(strip(96, 32, seed=0), (32, 32), max_tiles=3)
    assert (rows, columns, len(tiles)) == (1, 3, 4) and tiles[0].size == (32, 32)
    tiles, rows, columns = split_image(strip(200, 100, seed=0), (32, 32), max_tiles=3)
    assert (rows, columns, len(tiles)) == (2, 3, 7)  # long side capped at 3 tiles, short side keeps 1:2
    tiles, rows, columns = split_image(strip(30, 20, seed=0), (32, 32), max_tiles=3)
    assert (rows, columns, len(tiles)) == (1, 1, 1)  # fits one tile: the thumbnail alone


def test_the_tile_size_is_what_the_image_processor_outputs():
    from transformers import CLIPImageProcessorPil

    from vlm_vision.vlm.processing_vlm import output_size

    assert output_size(image_processor_for(tiny_config())) == (32, 32)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36})
    assert output_size(clip) == (36, 36)  # the centre crop, not the resize
    assert output_size(CLIPImageProcessorPil(size={"shortest_edge": 40}, do_center_crop=False)) == (40, 40)


def test_tiles_layout_is_expanded_by_the_processor_and_checked_by_the_model():
    model, processor = build("tiles", max_tiles=3)
    col, row = processor.tile_separator_token_ids
    batch = processor.encode_conversations([vqa("describe the image.", "no")], [[strip(200, 100, seed=6)]])
    assert batch["image_tiles"].tolist() == [[2, 3]]
    assert batch["pixel_values"].shape == (7, 3, 32, 32)
    ids = batch["input_ids"][0]
    assert int((ids == col).sum()) == 2 * 2 and int((ids == row).sum()) == 2
    assert int((ids == model.config.image_token_id).sum()) == 7 * model.num_image_tokens
    assert (batch["labels"][0][(ids == col) | (ids == row)] == IGNORE_INDEX).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    broken = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == col, row))
    with pytest.raises(ValueError, match=r"don't match the layout of split image 0 \(2x3 tiles"):
        model(**broken)
    with pytest.raises(ValueError, match=r"asks for 7 tile images .* but pixel_values holds 6"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:6]))


def test_tiles_with_an_adapter_that_cannot_take_the_tile_grid_is_refused():
    refusing = {"adapter_type": "pixel_shuffle", "scale_factor": 3, "uneven_grid": "refuse"}
    with pytest.raises(ValueError, match=r"grid 8x8.*uneven_grid='pad'"):
        build("tiles", adapter=refusing, max_tiles=2)
    with pytest.raises(ValueError, match=r"image_mode='tiles' needs max_tiles"):
        build("tiles")


def test_native_inputs_for_a_transformers_tower_that_cannot_mask_are_refused():
    from transformers import CLIPVisionConfig

    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    clip = CLIPVisionConfig(
        image_size=32, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    config = VisionLanguageConfig(
        vision_config=clip,
        text_config=tiny_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = VisionLanguageForConditionalGeneration(config).eval()
    processor = VisionLanguageProcessor.from_model_config(config, native_processor(), tokenizer, image_mode="native")
    batch = processor.encode_conversations([vqa("yes", "no")], [[strip(64, 16, seed=7)]])
    with pytest.raises(ValueError, match=r"CLIPVisionModel\) can't take pixel_attention_mask.*convert it"):
        model(**batch)


def test_bad_native_inputs_are_refused():
    model, processor = build("native")
    batch = processor.encode_conversations([vqa("yes", "no")], [[strip(64, 16, seed=8)]])
    mask = batch["pixel_attention_mask"].clone()
    mask[0, 0] = 0
    with torch.no_grad(), pytest.raises(ValueError, match=r"pixel_attention_mask\[0\] marks"):
        model(**dict(batch, pixel_attention_mask=mask))
    ids = batch["input_ids"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0, 0])
    cut = {
        k: (
            torch.cat([v[:, :first], v[:, first + 1 :]], dim=1) if k in ("input_ids", "labels", "attention_mask") else v
        )
        for k, v in batch.items()
    }
    with pytest.raises(ValueError, match=r"a run of \d+ <image> placeholder tokens, but the images it should hold"):
        model(**cut)
    with pytest.raises(ValueError, match=r"pixel_values must be float patches"):
        model(**dict(batch, pixel_values=torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"needs an image processor with a patch budget"):
        VisionLanguageProcessor.from_model_config(
            model.config, image_processor_for(model.config.vision_config), processor.tokenizer, image_mode="native"
        )
    with pytest.raises(ValueError, match=r"encode_conversation needs image_layouts"):
        processor.encode_conversation(vqa("yes", "no"))


@pytest.mark.parametrize(
    ("mode", "options"), [("fixed", {}), ("native", {"max_num_patches": 12}), ("tiles", {"max_tiles": 2})]
)
def test_a_tiny_recipe_stage_trains_and_evaluates_in_each_image_mode(tmp_path, mode, options):
    from transformers import AutoProcessor

    from tests.test_train_vlm import ALIGN, TINY
    from vlm_vision.training.vlm_recipe import VLMRecipe, run_vlm_recipe

    fields = json.loads(json.dumps(TINY))
    fields["vision"].update({"image_mode": mode, **options})
    fields["data"].update({"train_subset": 16, "eval_subset": 8})
    results = run_vlm_recipe(VLMRecipe(**fields, stages=[dict(ALIGN, max_steps=2)]), str(tmp_path), progress_bar=False)
    assert results["evaluation"]["num_samples"] == 8
    (row,) = results["stages"]
    assert row["steps"] == 2 and row["skipped_samples"] == 0 and math.isfinite(row["last_loss"])
    processor = AutoProcessor.from_pretrained(tmp_path / "align" / "model")
    assert processor.image_mode == mode
    batch = processor.encode_conversations([vqa("what color is the circle?", "yes")], [[strip(64, 16, seed=9)]])
    expected = {"fixed": {"pixel_values"}, "native": {"pixel_values", "pixel_attention_mask", "spatial_shapes"}}
    assert expected.get(mode, {"pixel_values", "image_tiles"}) <= set(batch)


def test_recipe_image_mode_errors(tmp_path):
    from tests.test_train_vlm import ALIGN, TINY
    from vlm_vision.training.vlm_recipe import VLMRecipe

    def make(**vision):
        fields = json.loads(json.dumps(TINY))
        fields["vision"].update(vision)
        return VLMRecipe(**fields, stages=[ALIGN])

    with pytest.raises(ValueError, match=r"vision.image_mode='squash'; use one of \('fixed', 'native', 'tiles'\)"):
        make(image_mode="squash")
    with pytest.raises(ValueError, match=r"image_mode='native' needs vision.max_num_patches \(an int"):
        make(image_mode="native", max_num_patches="16")
    # left out, the budget is the tower processor's own: a fresh tower's processor has none, named when it is built
    from vlm_vision.training.vlm_parts import build_vlm

    with pytest.raises(ValueError, match=r"needs vision.max_num_patches .*the tower.s \w+ has no budget of its own"):
        build_vlm(make(image_mode="native"), None, tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"vision.pack_images .* image_mode is 'fixed', pack_images True: set"):
        make(pack_images=True)
    with pytest.raises(ValueError, match=r"image_mode is 'native', pack_images None: set image_mode 'native' and"):
        make(image_mode="native", max_num_patches=16, max_packed_length=32)
    with pytest.raises(ValueError, match=r"vision.max_tiles is for image_mode='tiles', but image_mode is 'native'"):
        make(image_mode="native", max_num_patches=16, max_tiles=2)


def test_native_spans_can_share_an_image_through_image_index():
    model, processor = build("native")
    images = [strip(20, 90, seed=10), strip(96, 32, seed=11)]
    one = processor.encode_conversations([vqa("yes", "no")], [[images[1]]])
    both = processor.encode_conversations([vqa("no", "yes")], [[images[0]]])
    pixels = {k: torch.cat([both[k], one[k]]) for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    rows = {k: one[k].repeat(2, 1) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        shared = model(**rows, **pixels, image_index=torch.tensor([1, 1])).logits
        alone = model(**{k: one[k] for k in ("input_ids", "attention_mask", *pixels)}).logits
    torch.testing.assert_close(shared[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"a run of \d+ <image> placeholder tokens"):
        model(**rows, **pixels, image_index=torch.tensor([0, 1]))  # image 0 has another grid: another count
