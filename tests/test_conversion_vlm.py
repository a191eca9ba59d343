"""A converted CLIP or SigLIP tower as the vision tower of the VLM: its prefix-token policy, image features equal to
the ones from transformers' own tower, and a training step."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer, SiglipVisionConfig, SiglipVisionModel

from tests.test_conversion import TINY, randomised, saved
from tests.vlm_helpers import shapes_image, tiny_text_config, train_tokenizer, vqa
from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, VisionLanguageProcessor
from vlm_vision.conversion import convert_checkpoint
from vlm_vision.export.encoder_folder import image_processor_for

ATOL = RTOL = 1e-5
REFERENCES = {
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**TINY)),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**TINY)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save_pretrained(path)
    return path


def converted_vlm(family, tmp_path, tokenizer_dir, **config_kwargs):
    """transformers' tower (random), the VLM built on its converted config, and the converted weights copied in."""
    reference = randomised(REFERENCES[family]())
    converted = convert_checkpoint(family, saved(reference, tmp_path))
    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = VisionLanguageConfig(
        vision_config=converted.model.config,
        text_config=tiny_text_config(len(tokenizer)),
        adapter_config={"adapter_type": "mlp"},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **config_kwargs,
    )
    torch.manual_seed(0)
    model = VisionLanguageForConditionalGeneration(config)
    model.vision_tower.load_state_dict(converted.model.state_dict(), strict=True)
    processor = VisionLanguageProcessor.from_model_config(
        config,
        image_processor_for(config.vision_config, converted.image_mean, converted.image_std, converted.resample),
        tokenizer,
    )
    return reference, model, processor


@pytest.mark.parametrize(("family", "prefix"), [("clip", 1), ("siglip", 0)])
def test_converted_tower_features_match_transformers_tower(family, prefix, tmp_path, tokenizer_dir):
    reference, model, processor = converted_vlm(family, tmp_path, tokenizer_dir)
    model.eval()
    # CLIP: [CLS] dropped, the 8x8 patch tokens kept; SigLIP has no [CLS]: all 64 tokens kept
    assert model.config.prefix_tokens == prefix and model.config.vision_config.num_prefix_tokens == prefix
    assert model.num_image_tokens == processor.num_image_tokens == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_states = reference(x, output_hidden_states=True).hidden_states[-2]  # (2, prefix + 64, 32)
        torch.testing.assert_close(model.vision_features(x), expected_states, atol=ATOL, rtol=RTOL)
        expected = model.adapter(expected_states[:, prefix:], (8, 8))
        torch.testing.assert_close(model.get_image_features(x), expected, atol=ATOL, rtol=RTOL)
    assert expected.shape == (2, 64, 32)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_converted_tower_trains_in_the_vlm(family, tmp_path, tokenizer_dir):
    _, model, processor = converted_vlm(family, tmp_path, tokenizer_dir)
    batch = processor.encode_conversations([vqa("what is the blue shape?", "a blue circle")], [[shapes_image(0)]])
    assert (batch["input_ids"] == processor.image_token_id).sum() == 64
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    tower = dict(model.vision_tower.named_parameters())
    # the feature layer is the penultimate block's output: the last block, the final norm and SigLIP's attention
    # pooling head never reach the image features and are frozen; everything before them trains
    frozen = {n for n, p in tower.items() if not p.requires_grad}
    assert frozen == {n for n in tower if n.startswith(("layers.1.", "layernorm.", "head."))}
    for name, parameter in tower.items():
        if name not in frozen:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())


def test_converted_clip_tower_keeps_its_cls_token_on_request(tmp_path, tokenizer_dir):
    """LLaVA's "full" strategy: [CLS] first, then the patch tokens, each through the adapter."""
    reference, model, processor = converted_vlm("clip", tmp_path, tokenizer_dir, keep_prefix_tokens=True)
    model.eval()
    assert model.num_image_tokens == processor.num_image_tokens == 1 + 64
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        states = reference(x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.get_image_features(x), model.adapter(states, (1, 65)), atol=ATOL, rtol=RTOL)
