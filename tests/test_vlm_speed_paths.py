"""The align-stage speed paths: a frozen tower runs without autograd, and cached tower features replace pixels."""

import pytest
import torch

from tests.conftest import tiny_config
from tests.vlm_helpers import tiny_text_config
from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration
from vlm_vision.vlm.feature_cache import build_feature_cache

IMAGE_TOKEN_ID = 99
TOKENS_PER_IMAGE = 64  # 32 px / patch 4 = 8x8 patches, [CLS] dropped, mlp adapter


@pytest.fixture
def model():
    config = VisionLanguageConfig(
        vision_config=tiny_config(), text_config=tiny_text_config(100), image_token_id=IMAGE_TOKEN_ID
    )
    torch.manual_seed(0)
    return VisionLanguageForConditionalGeneration(config)


def batch(num_images=3):
    torch.manual_seed(1)
    text = torch.randint(0, IMAGE_TOKEN_ID, (num_images, 5))
    input_ids = torch.cat([torch.full((num_images, TOKENS_PER_IMAGE), IMAGE_TOKEN_ID), text], dim=1)
    return {"input_ids": input_ids, "labels": input_ids, "pixel_values": torch.randn(num_images, 3, 32, 32)}


def test_a_frozen_tower_runs_without_autograd_and_the_adapter_still_learns(model):
    inputs = batch()
    assert model.vision_features(inputs["pixel_values"]).grad_fn is not None  # a trainable tower records the graph
    model.vision_tower.requires_grad_(False)
    features = model.vision_features(inputs["pixel_values"])
    assert features.grad_fn is None and not features.requires_grad
    model(**inputs).loss.backward()
    assert model.adapter.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())
    # the tower's output is the same with and without the graph
    model.vision_tower.layers[0].attention.q_proj.weight.requires_grad_(True)
    torch.testing.assert_close(model.vision_features(inputs["pixel_values"]), features)


def test_cached_features_give_the_same_loss_as_pixels(model):
    inputs = batch()
    pixel_values = inputs.pop("pixel_values")
    with pytest.raises(ValueError, match="trainable tensors"):
        build_feature_cache(model, [(["a", "b", "c"], pixel_values)])
    model.vision_tower.requires_grad_(False)
    model.train()
    cache = build_feature_cache(model, [(["a", "b"], pixel_values[:2]), (["c"], pixel_values[2:])])
    assert model.vision_tower.training  # put back in its mode
    cached = cache.lookup(["a", "b", "c"])
    assert cached.shape == (3, 1 + TOKENS_PER_IMAGE, 32) and cached.device.type == "cpu"
    model.eval()
    expected = model(**inputs, pixel_values=pixel_values).loss
    torch.testing.assert_close(model(**inputs, vision_features=cached).loss, expected)
    with pytest.raises(ValueError, match=r"vision_features must be \(num_images, 65, 32\)"):
        model(**inputs, vision_features=cached[:, 1:])
    with pytest.raises(ValueError, match="placeholders for 3 images"):
        model(**inputs, vision_features=cached[:2])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, pixel_values=pixel_values, vision_features=cached)
    with pytest.raises(KeyError, match="'d'"):
        cache.lookup(["a", "d"])
