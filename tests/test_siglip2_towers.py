"""SigLIP2 NaFlex folders (a `Siglip2Model` or a `Siglip2VisionModel`, saved with `Siglip2ImageProcessor`) as the
vision tower of VLM recipes: the tower converted into ours gives transformers' tokens for the same image, a recipe
trains on it in image_mode native (packed rows included), and the refusals name their fix."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from tests.real_path import (
    corpus_of,
    llava_command,
    llava_recipe,
    write_llava_data,
    write_lm_folder,
    write_siglip2_folder,
)
from vlm_vision import VisionTransformerModel
from vlm_vision.data.dataset import VLMCollator, VLMDataset
from vlm_vision.data.images import load_image
from vlm_vision.data.index import JsonIndex
from vlm_vision.training import vlm_parts
from vlm_vision.training.vlm_parts import mode_image_processor
from vlm_vision.vlm.towers import load_vision_tower

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 32  # the folders' max_num_patches: patches of 8 on a 4x4 position table


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("siglip2")
    data = write_llava_data(base / "data", num_images=60)
    return {
        "data": data,
        "siglip2": write_siglip2_folder(base / "siglip2-naflex"),
        "siglip2_vision": write_siglip2_folder(base / "siglip2-vision", composite=False),
        "lm": write_lm_folder(base / "lm", corpus_of(data)),
    }


def photos() -> list[Image.Image]:
    """Real pictures of three aspect ratios: 64x16 (tall), 16x64 (wide), 40x40 (height x width)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 16), (16, 64), (40, 40))]


@pytest.mark.parametrize("folder", ["siglip2", "siglip2_vision"])
def test_the_converted_tower_gives_transformers_tokens_for_the_same_image(world, folder):
    path = world[folder]
    reference = Siglip2VisionModel.from_pretrained(path).eval()
    saved = AutoImageProcessor.from_pretrained(path, backend="pil")  # the folder's Siglip2ImageProcessor
    expected_inputs = saved(images=photos(), return_tensors="pt")
    tower, processor = load_vision_tower(path)
    assert isinstance(tower, VisionTransformerModel) and tower.config.grid_size == (4, 4)
    assert type(processor).__name__.startswith("Siglip2ImageProcessor") and processor.max_num_patches == BUDGET

    ours = mode_image_processor(tower, processor, "native", BUDGET)
    inputs = ours(images=photos(), return_tensors="pt")
    grids = inputs["spatial_shapes"].tolist()
    assert grids == expected_inputs["spatial_shapes"].tolist() and len({tuple(g) for g in grids}) == 3
    assert torch.equal(inputs["pixel_attention_mask"], expected_inputs["pixel_attention_mask"])
    torch.testing.assert_close(inputs["pixel_values"], expected_inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        tokens = tower(**inputs).last_hidden_state
        expected = reference(**expected_inputs).last_hidden_state
        middle = tower(**inputs, output_hidden_states=True).hidden_states[2]
        expected_middle = reference(**expected_inputs, output_hidden_states=True).hidden_states[2]
    for i, (rows, columns) in enumerate(grids):  # the valid patches; the padding is no one's output
        n = rows * columns
        torch.testing.assert_close(tokens[i, :n], expected[i, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(middle[i, :n], expected_middle[i, :n], atol=1e-5, rtol=0)

    # convert=False keeps transformers' class, which the VLM feeds with the mask and grids
    kept, _ = load_vision_tower(path, convert=False)
    assert isinstance(kept, Siglip2VisionModel)
    with torch.no_grad():
        torch.testing.assert_close(kept(**inputs).last_hidden_state, reference(**inputs).last_hidden_state)


def test_fixed_mode_runs_the_naflex_tower_on_its_square_table(world, tmp_path):
    """image_mode fixed (and tiles): images squashed to the table's square (32x32 here), exactly Siglip2VisionModel
    with spatial_shapes (4, 4) on that image; for a square image, Siglip2ImageProcessor(max_num_patches=16)'s."""
    reference = Siglip2VisionModel.from_pretrained(world["siglip2"]).eval()
    tower, processor = load_vision_tower(world["siglip2"])
    square = mode_image_processor(tower, processor, "fixed")
    assert square.max_num_patches is None and dict(square.size) == {"height": 32, "width": 32}
    tall, _wide, even = photos()
    pixels = square(images=[tall, even], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    patches = torch.stack([torch.from_numpy(convert_image_to_patches(image.numpy(), 8)) for image in pixels])
    with torch.no_grad():
        tokens = tower(pixels).last_hidden_state
        expected = reference(patches, torch.ones(2, 16, dtype=torch.long), torch.tensor([[4, 4]] * 2))
        torch.testing.assert_close(tokens, expected.last_hidden_state, atol=1e-5, rtol=0)
        sixteen = AutoImageProcessor.from_pretrained(world["siglip2"], backend="pil", max_num_patches=16)
        torch.testing.assert_close(
            tokens[1], reference(**sixteen(images=[even], return_tensors="pt"))[0][0], atol=1e-5, rtol=0
        )

    # the LLaVA recipe as shipped (fixed, pad to square) on the folder: 16 tokens per image, 32x32 pixels
    model, vlm_processor = vlm_parts.build_vlm(_recipe(world, native=()), None, tmp_path / "tokenizer")
    assert vlm_processor.image_mode == "fixed" and vlm_processor.num_image_tokens == 16
    inputs, layouts = vlm_processor.preprocess_images([tall])
    assert inputs["pixel_values"].shape == (1, 3, 32, 32) and len(layouts[0]) == 16
    assert model.get_image_features(inputs["pixel_values"]).shape[:2] == (1, 16)

    kept, _ = load_vision_tower(world["siglip2"], convert=False)
    for mode in ("fixed", "tiles"):
        with pytest.raises(ValueError, match=rf"image_mode='{mode}' feeds .* use vision.image_mode='native' .*"):
            mode_image_processor(kept, processor, mode)


def train_vlm_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="train_vlm")["main"]


NATIVE = ("vision.image_aspect_ratio=squash", "vision.image_mode=native", f"vision.max_num_patches={BUDGET}")


@pytest.mark.parametrize("convert", [True, False])
def test_the_llava_recipe_trains_native_on_a_siglip2_folder(world, tmp_path, convert):
    out = tmp_path / "run"
    steps = ("stages.pretrain.max_steps=2", "stages.finetune.max_steps=2", f"vision.convert={json.dumps(convert)}")
    train_vlm_main()(llava_command(world, "siglip2", out, *NATIVE, *steps))

    model = AutoModelForImageTextToText.from_pretrained(out / "vlm").eval()
    saved = AutoProcessor.from_pretrained(out / "vlm")
    assert isinstance(model.vision_tower, VisionTransformerModel) == convert
    assert not convert or model.vision_tower.config.interpolation_mode == "triangle"
    assert saved.image_mode == "native" and saved.image_processor.max_num_patches == BUDGET
    # the saved processor is the folder's Siglip2ImageProcessor: the same pixels, grids and mask for a file
    square, bar = (
        load_image(next(p for p in world["data"].good_images if load_image(p).size == s)) for s in [(32, 32), (40, 24)]
    )
    siglip2 = AutoImageProcessor.from_pretrained(world["siglip2"], backend="pil")
    inputs, layouts = saved.preprocess_images([square, bar])
    expected = siglip2(images=[square, bar], return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == expected["spatial_shapes"].tolist() == [[5, 5], [4, 7]]
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
    assert [len(layout) for layout in layouts] == [25, 28]  # each aspect ratio its own token count
    # the VLM's image features are transformers' penultimate layer on the valid patches (the tower never trained)
    reference = Siglip2VisionModel.from_pretrained(world["siglip2"]).eval()
    with torch.no_grad():
        features = model.vision_features(**inputs)
        hidden = reference(**expected, output_hidden_states=True).hidden_states[-2]
    for i, (rows, columns) in enumerate(inputs["spatial_shapes"].tolist()):
        torch.testing.assert_close(features[i, : rows * columns], hidden[i, : rows * columns], atol=1e-5, rtol=0)

    prompt = saved.prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
    for image, count in ((square, 25), (bar, 28)):
        encoded = saved(images=[image], text=prompt, add_special_tokens=False)
        assert int((encoded["input_ids"] == model.config.image_token_id).sum()) == count
        generated = model.generate(**encoded, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == encoded["input_ids"].shape[1] + 3


def _recipe(world, *overrides, native=NATIVE):
    return llava_recipe(world, *native, *overrides, vision="siglip2")


def test_packed_rows_of_native_images_give_the_padded_batchs_loss(world, tmp_path):
    """The instruction mix (one image, two images, text only) on the SigLIP2 tower in native mode: packed into rows
    (position ids restarting, image_index mapping each span to its image) the loss is the padded batch's."""
    model, processor = vlm_parts.build_vlm(_recipe(world), None, tmp_path / "tokenizer")
    model.eval()
    data = world["data"]
    dataset = VLMDataset(JsonIndex(data.finetune, data.root), processor, max_length=256)
    items = [item for item in (dataset[i] for i in range(12)) if not item.get("skipped")]
    assert len(items) >= 8 and len({len(item["images"]) for item in items}) == 3  # 0, 1 and 2 images
    drop = ("image_labels", "skipped")
    padded = {k: v for k, v in VLMCollator(processor)(items).items() if k not in drop}
    packed = {
        k: v for k, v in VLMCollator(processor, pack_length=256)([dict(i) for i in items]).items() if k not in drop
    }
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert "spatial_shapes" in packed and "image_index" in packed
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, atol=1e-5, rtol=0)


def test_bad_siglip2_folders_and_settings(world, tmp_path):
    bare = tmp_path / "bare-siglip2"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((world["siglip2"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json.*--image-processor FOLDER"):
        load_vision_tower(bare)
    _tower, processor = load_vision_tower(bare, image_processor=world["siglip2"])  # the fix
    assert processor.max_num_patches == BUDGET

    tower, processor = load_vision_tower(world["siglip2"])
    # a 1 x N image stretches the 4x4 table N/4 times along a side: 64x at most
    assert mode_image_processor(tower, processor, "native", 256).max_num_patches == 256
    # without vision.max_num_patches, native mode takes the folder's own budget
    _, default = vlm_parts.build_vlm(
        _recipe(world, native=("vision.image_aspect_ratio=squash", "vision.image_mode=native")), None, tmp_path / "d"
    )
    assert default.image_mode == "native" and default.image_processor.max_num_patches == BUDGET
    with pytest.raises(
        ValueError, match=r"max_num_patches=257 is beyond what the tower's 4x4 position table .* at most 256"
    ):
        mode_image_processor(tower, processor, "native", 257)
    with pytest.raises(ValueError, match=r"max_num_patches=257 is beyond"):
        vlm_parts.build_vlm(_recipe(world, "vision.max_num_patches=257"), None, tmp_path / "tokenizer")
    other = AutoImageProcessor.from_pretrained(world["siglip2"], backend="pil", patch_size=16)
    with pytest.raises(ValueError, match=r"cuts patches of 16 pixels but the tower's patch_size is 8"):
        mode_image_processor(tower, other, "native", BUDGET)
    fixed = _recipe(world, "vision.convert=false", "vision.image_aspect_ratio=squash", native=())
    with pytest.raises(ValueError, match=r"image_mode='fixed' .*Siglip2VisionModel \(a NaFlex tower.*convert=true"):
        vlm_parts.build_vlm(fixed, None, tmp_path / "tokenizer")


def test_transformers_siglip2_tower_in_a_text_only_training_batch(world, tmp_path):
    """convert=False: Siglip2VisionModel takes patches only, so the blank image a text-only batch runs (for DDP)
    and the probe for unused tower parameters are patchified too, at the table's 4x4 grid."""
    model, processor = vlm_parts.build_vlm(_recipe(world, "vision.convert=false"), None, tmp_path / "tokenizer")
    assert isinstance(model.vision_tower, Siglip2VisionModel) and model.config.grid_size == (4, 4)
    frozen = {n for n, p in model.vision_tower.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if not n.startswith(("encoder.layers.2.", "head."))} == {
        "post_layernorm.weight",
        "post_layernorm.bias",
    }
    assert (
        "encoder.layers.2.mlp.fc2.weight" in frozen and "encoder.layers.1.mlp.fc2.weight" not in frozen
    )  # the feature layer -2 is block 1's output: block 2, the final norm and the pooling head never count
    model.train()
    conversation = [{"role": "user", "content": "What is a red bar?"}, {"role": "assistant", "content": "a bar"}]
    batch = processor.encode_conversations([conversation], [[]])
    loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    tower = model.vision_tower
    assert tower.embeddings.patch_embedding.weight.grad is not None  # reached, with zeros: the blank's factor is 0
    assert not tower.embeddings.patch_embedding.weight.grad.any()


def test_packed_tower_rows_from_the_recipe_give_the_padded_batchs_loss(world, tmp_path):
    """vision.pack_images: the collator packs the batch's images into tower rows (first-fit, max_packed_length
    slots); the loss equals the padded batch's, with fewer tower rows than images."""
    model, padded_processor = vlm_parts.build_vlm(_recipe(world), None, tmp_path / "tokenizer")
    model.eval()
    packing = ("vision.pack_images=true", f"vision.max_packed_length={3 * BUDGET}")
    _, packed_processor = vlm_parts.build_vlm(_recipe(world, *packing), None, tmp_path / "tokenizer")
    assert packed_processor.image_processor.pack_images
    data = world["data"]

    def batch(processor):
        dataset = VLMDataset(JsonIndex(data.finetune, data.root), processor, max_length=256)
        items = [item for item in (dataset[i] for i in range(12)) if not item.get("skipped")]
        return {k: v for k, v in VLMCollator(processor)(items).items() if k not in ("image_labels", "skipped")}

    padded, packed = batch(padded_processor), batch(packed_processor)
    assert torch.equal(padded["input_ids"], packed["input_ids"]) and torch.equal(padded["labels"], packed["labels"])
    assert torch.equal(packed["spatial_shapes"], padded["spatial_shapes"])
    assert packed["pixel_values"].shape[0] < padded["pixel_values"].shape[0]  # fewer tower rows than images
    assert int((packed["patch_image_ids"] >= 0).sum()) == int(padded["pixel_attention_mask"].sum())
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"vision.pack_images needs a tower that keeps packed images apart"):
        vlm_parts.build_vlm(_recipe(world, "vision.convert=false", *packing), None, tmp_path / "tokenizer")


def test_the_llava_recipe_trains_with_packed_tower_rows(world, tmp_path):
    out = tmp_path / "run"
    steps = ("stages.pretrain.max_steps=2", "stages.finetune.max_steps=2")
    packing = ("vision.pack_images=true", f"vision.max_packed_length={3 * BUDGET}")
    train_vlm_main()(llava_command(world, "siglip2", out, *NATIVE, *packing, *steps))
    saved = AutoProcessor.from_pretrained(out / "vlm")
    assert saved.image_processor.pack_images and saved.image_processor.max_packed_length == 3 * BUDGET
    model = AutoModelForImageTextToText.from_pretrained(out / "vlm").eval()
    prompt = saved.prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
    encoded = saved(images=[load_image(world["data"].good_images[0])], text=prompt, add_special_tokens=False)
    assert "patch_image_ids" in encoded
    generated = model.generate(**encoded, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == encoded["input_ids"].shape[1] + 3
