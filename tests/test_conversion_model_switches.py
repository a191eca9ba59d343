"""The model switches the converters need: final_norm, pooler_act, patch_embedding_bias."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerConfig, VisionTransformerModel


def build(**overrides) -> VisionTransformerModel:
    torch.manual_seed(0)
    model = VisionTransformerModel(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_defaults_are_the_paper():
    config = VisionTransformerConfig()
    assert (config.final_norm, config.pooler_act, config.patch_embedding_bias) == ("all", None, True)


def test_final_norm_pooled_cls_is_clip(pixel_values):
    model = build(final_norm="pooled")
    out = model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])  # un-normalised last block output
    torch.testing.assert_close(out.pooler_output, model.layernorm(out.hidden_states[-1][:, 0]))
    default = build()
    assert not torch.allclose(default(pixel_values).last_hidden_state, out.last_hidden_state)


def test_final_norm_pooled_mean_is_timm_fc_norm(pixel_values):
    model = build(final_norm="pooled", pooling="mean", num_register_tokens=2)
    out = model(pixel_values)
    torch.testing.assert_close(out.pooler_output, model.layernorm(out.last_hidden_state[:, 3:].mean(1)))


def test_pooler_act_is_transformers_vit_pooler(pixel_values):
    model = build(pooler_act="tanh")
    assert [k for k in model.state_dict() if k.startswith("pooler.")] == ["pooler.dense.weight", "pooler.dense.bias"]
    out = model(pixel_values)
    torch.testing.assert_close(out.pooler_output, torch.tanh(model.pooler.dense(out.last_hidden_state[:, 0])))


def test_patch_projection_without_bias():
    model = build(patch_embedding_bias=False)
    assert model.embeddings.patch_embeddings.projection.bias is None
    assert "embeddings.patch_embeddings.projection.bias" not in model.state_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"final_norm": "none"}, r"final_norm='none' is not supported; use one of \('all', 'pooled'\)"),
        ({"final_norm": "pooled", "pooling": "map"}, r'final_norm="pooled" normalises the pooled vector'),
        ({"pooler_act": "relu6"}, r"pooler_act='relu6' is not supported; use None or one of"),
    ],
)
def test_invalid_switches_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_switches_round_trip_through_save_and_load(tmp_path, pixel_values):
    model = build(final_norm="pooled", pooler_act="tanh", patch_embedding_bias=False, pre_norm=True)
    model.save_pretrained(tmp_path)
    loaded = VisionTransformerModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.final_norm, loaded.config.pooler_act, loaded.config.patch_embedding_bias) == (
        "pooled",
        "tanh",
        False,
    )
    torch.testing.assert_close(loaded(pixel_values).pooler_output, model(pixel_values).pooler_output)


TINY_BACKBONE = {
    "layer_type": "bottleneck",
    "depths": [1],
    "hidden_sizes": [128],
    "embedding_size": 32,
    "global_padding": "SAME",
    "embedding_dynamic_padding": True,
    "out_features": ["stage1"],
}


def _group_norm_eps(model) -> set[float]:
    return {m.eps for m in model.embeddings.patch_embeddings.backbone.modules() if isinstance(m, torch.nn.GroupNorm)}


def test_backbone_norm_eps_sets_every_group_norm_of_the_backbone(tmp_path):
    hybrid = {"image_size": 16, "patch_size": 4, "backbone_config": TINY_BACKBONE}
    assert _group_norm_eps(build(**hybrid)) == {1e-5}  # default: BiT's own
    model = build(**hybrid, backbone_norm_eps=1e-6)
    assert _group_norm_eps(model) == {1e-6}
    x = 0.01 * torch.randn(1, 3, 16, 16)  # small activations: the epsilon shows
    with torch.no_grad():
        assert not torch.allclose(model(x).pooler_output, build(**hybrid)(x).pooler_output, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = VisionTransformerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.backbone_norm_eps == 1e-6 and _group_norm_eps(loaded) == {1e-6}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone_norm_eps": 1e-6}, r"backbone_norm_eps=1e-06 sets the GroupNorm epsilon .* backbone_config is None"),
        ({"backbone_norm_eps": 0.0, "backbone_config": TINY_BACKBONE}, r"backbone_norm_eps must be None or a positive"),
        (
            {"backbone_norm_eps": True, "backbone_config": TINY_BACKBONE},
            r"backbone_norm_eps must be None or a positive",
        ),
    ],
)
def test_invalid_backbone_norm_eps_names_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
