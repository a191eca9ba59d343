"""Our encoder inside transformers' LLaVA, and a VLM exported to a LLaVA checkpoint folder."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Siglip2VisionConfig,
    SiglipImageProcessorPil,
    ViTImageProcessorPil,
)

from tests.conftest import tiny_config
from tests.vlm_helpers import build_vlm, shapes_image, tiny_text_config, train_tokenizer, vqa
from vlm_vision import (
    VisionLanguageConfig,
    VisionLanguageForConditionalGeneration,
    VisionLanguageProcessor,
    VisionTransformerModel,
)
from vlm_vision.encoder.image_processing_vit import VisionTransformerImageProcessor
from vlm_vision.vlm.llava import export_to_llava


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_our_encoder_is_a_llava_vision_tower(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=tiny_config().to_dict(),
        text_config=tiny_text_config(len(tokenizer)).to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    assert isinstance(llava.model.vision_tower, VisionTransformerModel)
    prompt = tokenizer("describe the image.", add_special_tokens=False).input_ids
    input_ids = torch.tensor([[image_token_id] * 64 + prompt])  # 8x8 patches, [CLS] dropped by "default"
    pixel_values = torch.randn(1, 3, 32, 32)
    out = llava(
        input_ids=input_ids, pixel_values=pixel_values, labels=input_ids.masked_fill(input_ids == image_token_id, -100)
    )
    assert out.logits.shape == (1, input_ids.shape[1], len(tokenizer)) and torch.isfinite(out.loss)
    out.loss.backward()
    assert llava.model.vision_tower.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    generated = llava.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 3)
    # the tower's features reach LLaVA as our penultimate layer, without [CLS]
    features = llava.model.get_image_features(pixel_values).pooler_output[0]
    (penultimate,) = llava.model.vision_tower.get_intermediate_layers(pixel_values, -2, drop_prefix_tokens=True)
    torch.testing.assert_close(features, llava.model.multi_modal_projector(penultimate)[0])


def test_export_to_a_llava_folder_gives_the_same_logits(tokenizer, tmp_path):
    model, processor = build_vlm(tokenizer)
    model.eval()
    export_to_llava(model, tmp_path, processor)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor.encode_conversations([vqa("what is the blue shape?", "a blue circle")], [[shapes_image(0)]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    torch.testing.assert_close(llava(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    # plain transformers' LlavaProcessor builds the same inputs
    llava_processor = AutoProcessor.from_pretrained(tmp_path)
    text = processor.prompt(vqa("what is the blue shape?", "")[:1])
    ours = processor(images=[shapes_image(0)], text=text, add_special_tokens=False)
    theirs = llava_processor(images=[shapes_image(0)], text=text, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])


def test_export_refuses_what_llava_cannot_express(tokenizer):
    model, _ = build_vlm(tokenizer, adapter={"adapter_type": "pixel_shuffle"})
    with pytest.raises(ValueError, match="Only the plain mlp adapter maps to LLaVA"):
        export_to_llava(model, "unused")
    model, _ = build_vlm(tokenizer, vision_overrides={"num_register_tokens": 2})
    with pytest.raises(ValueError, match=r"drops exactly one prefix token, but this tower has 3"):
        export_to_llava(model, "unused")


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A non-square RGB picture of random blocks (the padding shows on the short side)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# the tiny tower takes 32x32 images: ViT's fixed resize (bilinear, 0.5 mean: a 127 background), CLIP's shortest-edge
# resize + centre crop (bicubic, CLIP mean: 122/116/104), SigLIP's fixed resize without a crop (bicubic), and ours
# in its classic mode (what the llava_1_5 recipe builds from a SigLIP2 folder in fixed mode)
PAD_TOWER_PROCESSORS = {
    "ours": lambda: VisionTransformerImageProcessor(size={"height": 32, "width": 32}, resample=3, do_convert_rgb=True),
    "vit": lambda: ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    "clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}),
}


@pytest.mark.parametrize("tower_processor", sorted(PAD_TOWER_PROCESSORS))
def test_pad_mode_exports_a_padding_llava_processor(tokenizer, tmp_path, tower_processor):
    model, _ = build_vlm(tokenizer)
    model.eval()
    processor = VisionLanguageProcessor.from_model_config(
        model.config, PAD_TOWER_PROCESSORS[tower_processor](), tokenizer, image_aspect_ratio="pad"
    )
    export_to_llava(model, tmp_path, processor)
    llava_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(llava_processor.image_processor).__name__ == "LlavaImageProcessorPil"
    assert llava_processor.image_processor.do_pad
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    text = processor.prompt(vqa("what is the blue shape?", "")[:1])
    # wide and tall, an even and an odd difference of sides (the odd pixel goes to the same side in both)
    for width, height in ((48, 24), (24, 48), (45, 24), (24, 31)):
        image = photo(width, height, seed=width + height)
        ours = processor(images=[image], text=text, add_special_tokens=False)
        theirs = llava_processor(images=[image], text=text, add_special_tokens=False, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)
        # padding changed the pixels: the squashed image differs
        squashed = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert not torch.allclose(squashed, ours["pixel_values"], atol=1e-2)
        inputs = {k: theirs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            torch.testing.assert_close(llava(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_pad_mode_refuses_a_tower_processor_llava_cannot_express(tokenizer, tmp_path):
    model, _ = build_vlm(tokenizer)
    padding = ViTImageProcessorPil(size={"height": 32, "width": 32}, do_pad=True, pad_size={"height": 40, "width": 40})
    processor = VisionLanguageProcessor.from_model_config(model.config, padding, tokenizer, image_aspect_ratio="pad")
    with pytest.raises(ValueError, match=r"ViTImageProcessorPil pads its output too \(do_pad=True\)"):
        export_to_llava(model, tmp_path / "out", processor)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_native_and_tiles_modes_are_refused(tokenizer, tmp_path):
    model, _ = build_vlm(tokenizer)
    native = VisionLanguageProcessor.from_model_config(
        model.config,
        VisionTransformerImageProcessor(patch_size=4, max_num_patches=48, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer,
        image_mode="native",
    )
    with pytest.raises(
        ValueError, match=r"image_mode='native' .* no LLaVA counterpart.*image_mode='fixed'.*VLM folder"
    ):
        export_to_llava(model, tmp_path / "native", native)
    tiles = VisionLanguageProcessor.from_model_config(
        model.config, ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, image_mode="tiles", max_tiles=2
    )
    with pytest.raises(ValueError, match=r"image_mode='tiles' .* no LLaVA counterpart.*image_mode='fixed'.*VLM folder"):
        export_to_llava(model, tmp_path / "tiles", tiles)
    # without the processor: a tiles model is known by its config's separators
    tiled, _ = build_vlm(tokenizer, tile_separator_token_ids=tiles.tile_separator_token_ids)
    with pytest.raises(ValueError, match=r"image_mode='tiles'.*tile_separator_token_ids"):
        export_to_llava(tiled, tmp_path / "tiled")
    assert not any(tmp_path.iterdir())


def test_a_naflex_tower_is_refused(tokenizer, tmp_path):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    siglip2 = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=4, num_patches=64
    )
    config = VisionLanguageConfig(
        vision_config=siglip2,
        text_config=tiny_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = VisionLanguageForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"siglip2_vision_model \(SigLIP2 NaFlex\).*image_mode='fixed'"):
        export_to_llava(model, tmp_path / "out")
