"""Our encoder inside transformers' LLaVA, and a VLM exported to a LLaVA checkpoint folder."""

import pytest
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from tests.conftest import tiny_config
from tests.vlm_helpers import build_vlm, shapes_image, tiny_text_config, train_tokenizer, vqa
from vlm_vision import VisionTransformerModel
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
