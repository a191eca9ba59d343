import json

import pytest
import torch

from tests.conftest import tiny_config
from vlm_vision import PRESET_NAMES, VisionTransformerConfig, VisionTransformerForImageClassification


def count_parameters_on_meta(preset: str, **overrides) -> int:
    config = VisionTransformerConfig.from_preset(preset, **overrides)
    with torch.device("meta"):  # shapes only: no memory for the big models
        model = VisionTransformerForImageClassification(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("vit-b16", 86_567_656), ("vit-l16", 304_326_632), ("vit-h14", 632_045_800)],
)
def test_parameter_counts_match_the_reference_code(preset, expected):
    assert count_parameters_on_meta(preset, num_labels=1000) == expected


def test_defaults_are_vit_b16_at_224():
    config = VisionTransformerConfig()
    preset = VisionTransformerConfig.from_preset("vit-b16")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (3072, 224, 16)
    assert config.grid_size == (14, 14) and config.num_patches == 196 and config.num_prefix_tokens == 1
    assert preset.to_dict() == {**config.to_dict(), "architectures": preset.architectures}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_a_valid_config(name):
    config = VisionTransformerConfig.from_preset(name)
    assert config.hidden_size % config.num_attention_heads == 0
    assert (config.backbone_config is not None) == name.startswith("r50")


def test_preset_table_values():
    l32 = VisionTransformerConfig.from_preset("vit-l32")
    assert (l32.hidden_size, l32.num_hidden_layers, l32.num_attention_heads, l32.patch_size) == (1024, 24, 16, 32)
    h14 = VisionTransformerConfig.from_preset("ViT-H/14")
    assert (h14.hidden_size, h14.num_hidden_layers, h14.intermediate_size, h14.patch_size) == (1280, 32, 5120, 14)
    assert VisionTransformerConfig.from_preset("vit-b16", image_size=384).grid_size == (24, 24)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown preset 'vit-x16'.*vit-b16"):
        VisionTransformerConfig.from_preset("vit-x16")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size=30 is not divisible by num_attention_heads=4"),
        ({"image_size": 30, "patch_size": 4}, r"image_size=30 is not divisible by patch_size=4"),
        ({"image_size": [32, 30]}, r"image_size=\[32, 30\] is not divisible"),
        ({"hidden_size": 0}, r"hidden_size must be a positive int, got 0"),
        ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive int, got -1"),
        ({"patch_size": 0}, r"patch_size must be a positive int or a pair"),
        ({"hidden_act": "relu6"}, r"hidden_act='relu6' is not supported"),
        ({"pooling": "max"}, r"pooling='max' is not supported"),
        ({"use_class_token": False}, r'pooling="cls" needs use_class_token=True'),
        ({"num_register_tokens": -2}, r"num_register_tokens must be >= 0, got -2"),
        ({"classifier_head": "deep"}, r"classifier_head='deep' is not supported"),
        ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob must be in \[0, 1\), got 1.5"),
    ],
)
def test_invalid_configs_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(image_size=[32, 48], num_register_tokens=2, pooling="map", layer_scale_init_value=0.1)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vlm_vit" and saved["image_size"] == [32, 48]
    loaded = VisionTransformerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.grid_size == (8, 12) and loaded.num_prefix_tokens == 3
