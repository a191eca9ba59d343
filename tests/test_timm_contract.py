"""timm's model contract on the encoder and the classifier (timm.models.vision_transformer.VisionTransformer):
`forward_features`, `forward_head`, `forward_intermediates`, `reset_classifier`, `set_grad_checkpointing`,
`num_prefix_tokens`, `no_weight_decay`. timm does not import here (it needs torchvision), so each is tested against
timm's documented semantics and against our own outputs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerForImageClassification, VisionTransformerModel


def encoder(**overrides) -> VisionTransformerModel:
    torch.manual_seed(0)
    return VisionTransformerModel(tiny_config(**overrides)).eval()


def classifier(**overrides) -> VisionTransformerForImageClassification:
    torch.manual_seed(0)
    model = VisionTransformerForImageClassification(tiny_config(num_labels=5, **overrides)).eval()
    with torch.no_grad():  # a trained head, so that a head that is not applied would show
        model.classifier.weight.normal_()
    return model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"final_norm": "pooled"}, {"pooling": "mean", "num_register_tokens": 2}, {"classifier_head": "mlp"}],
)
def test_forward_features_then_forward_head_is_forward(pixel_values, overrides):
    model = classifier(**overrides)
    features = model.forward_features(pixel_values)
    out = model(pixel_values)
    torch.testing.assert_close(features, model.vit(pixel_values).last_hidden_state)
    torch.testing.assert_close(model.forward_head(features), out.logits)
    pre_logits = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(model.classifier(pre_logits), out.logits)
    expected = model.vit(pixel_values).pooler_output
    if model.pre_logits is not None:  # the MLP head's tanh layer is the paper's (and big_vision's) "pre-logits"
        expected = model.pre_logits(expected)
    torch.testing.assert_close(pre_logits, expected)
    # an encoder has no classifier (timm's num_classes=0): forward_head is the pooled output either way
    torch.testing.assert_close(model.vit.forward_head(features), out_pool := model.vit(pixel_values).pooler_output)
    torch.testing.assert_close(model.vit.forward_head(features, pre_logits=True), out_pool)


def test_forward_intermediates_indices_follow_timm(pixel_values):
    """timm: indices over blocks (0 = first block's output); None = all; an int n = the last n; negatives from the
    end; intermediates in block order."""
    model = encoder(num_hidden_layers=4)
    hidden = model(pixel_values, output_hidden_states=True).hidden_states  # hidden[i + 1] = block i's output
    patches = [h[:, 1:] for h in hidden]
    cases = {None: [0, 1, 2, 3], 2: [2, 3], 1: [3], (0, -1): [0, 3], (-1, 0): [0, 3], (2, 2): [2]}
    for indices, blocks in cases.items():
        got = model.forward_intermediates(pixel_values, indices, output_fmt="NLC", intermediates_only=True)
        assert len(got) == len(blocks), indices
        for tensor, block in zip(got, blocks, strict=True):
            torch.testing.assert_close(tensor, patches[block + 1])
    for bad in (0, 5, [4], [-5]):
        with pytest.raises(ValueError, match=r"indices=.*this model has 4 blocks"):
            model.forward_intermediates(pixel_values, bad)
    with pytest.raises(ValueError, match=r"output_fmt='NHWC'; use 'NCHW'"):
        model.forward_intermediates(pixel_values, output_fmt="NHWC")


def test_forward_intermediates_matches_get_intermediate_layers_and_reshapes_nchw():
    model = encoder(num_register_tokens=2)
    x = torch.randn(2, 3, 32, 48)
    kwargs = {"interpolate_pos_encoding": True}
    (ours,) = model.get_intermediate_layers(x, 2, drop_prefix_tokens=True, apply_layernorm=True, **kwargs)
    ((nchw, prefix),) = model.forward_intermediates(
        x, [1], return_prefix_tokens=True, norm=True, intermediates_only=True, **kwargs
    )
    assert nchw.shape == (2, 32, 8, 12) and prefix.shape == (2, 3, 32)  # (B, D, grid_h, grid_w), [CLS] + 2 registers
    torch.testing.assert_close(nchw.flatten(2).transpose(1, 2), ours)  # row-major patches
    torch.testing.assert_close(nchw[:, :, 1, 5], ours[:, 1 * 12 + 5])
    (full,) = model.get_intermediate_layers(x, 2, apply_layernorm=True, **kwargs)
    torch.testing.assert_close(prefix, full[:, :3])


def test_forward_intermediates_final_features_and_stop_early(pixel_values):
    model = encoder(num_hidden_layers=4)
    final, intermediates = model.forward_intermediates(pixel_values, [1])
    torch.testing.assert_close(final, model.forward_features(pixel_values))
    calls = []
    handles = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.layers)]
    final_early, early = model.forward_intermediates(pixel_values, [1], stop_early=True)
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]  # blocks 2 and 3 never ran
    torch.testing.assert_close(early[0], intermediates[0])
    # timm: the final features of a stopped run are the normalised output of the last block run
    (second,) = model.get_intermediate_layers(pixel_values, 2, apply_layernorm=True)
    torch.testing.assert_close(final_early, second)


def test_forward_intermediates_without_prefix_tokens_returns_plain_maps(pixel_values):
    model = encoder(use_class_token=False, pooling="mean")
    assert model.num_prefix_tokens == 0
    (only,) = model.forward_intermediates(pixel_values, 1, return_prefix_tokens=True, intermediates_only=True)
    assert isinstance(only, torch.Tensor) and only.shape == (2, 32, 8, 8)  # timm: no pairs without prefix tokens


def test_reset_classifier_replaces_the_last_layer_and_pooling(pixel_values):
    model = classifier(classifier_head="mlp", num_register_tokens=1)
    features = model.forward_features(pixel_values)
    pre_logits = model.forward_head(features, pre_logits=True)
    model.reset_classifier(3)
    assert model.config.num_labels == 3 and model.num_labels == 3 and len(model.config.id2label) == 3
    assert model.get_classifier() is model.classifier and model.classifier.weight.shape == (3, 32)
    torch.testing.assert_close(model(pixel_values).logits, torch.zeros(2, 3))  # zero-initialised, as in Sec. 3.2
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), pre_logits)  # the features stay
    model.reset_classifier(0)  # timm's num_classes=0: the logits are the pre-logits features
    assert isinstance(model.classifier, torch.nn.Identity)
    torch.testing.assert_close(model(pixel_values).logits, pre_logits)
    model.reset_classifier(4, global_pool="avg")  # timm's names for our pooling
    assert model.config.pooling == "mean" and model.vit.config.pooling == "mean"
    torch.testing.assert_close(model.vit.forward_head(features), features[:, 2:].mean(1))  # registers left out
    with pytest.raises(ValueError, match=r"global_pool='map' needs the attention-pooling head"):
        model.reset_classifier(4, global_pool="map")
    with pytest.raises(ValueError, match=r"global_pool='' is not supported.*forward_features"):
        model.reset_classifier(4, global_pool="")
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0"):
        model.reset_classifier(-1)


def test_a_reset_classifier_saves_and_loads(tmp_path, pixel_values):
    model = classifier()
    model.reset_classifier(0)
    model.save_pretrained(tmp_path / "headless")
    loaded = VisionTransformerForImageClassification.from_pretrained(tmp_path / "headless")
    assert isinstance(loaded.classifier, torch.nn.Identity) and loaded.config.num_labels == 0
    torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits)


def test_reset_classifier_on_an_encoder(pixel_values):
    model = encoder(pooling="map", use_class_token=False)
    model.reset_classifier(0, global_pool="avg")  # from the MAP head to the mean: the head goes, as in timm
    assert model.config.pooling == "mean" and model.head is None
    torch.testing.assert_close(model(pixel_values).pooler_output, model(pixel_values).last_hidden_state.mean(1))
    with pytest.raises(ValueError, match=r"pooling=\"cls\" needs use_class_token=True"):
        model.reset_classifier(0, global_pool="token")
    with pytest.raises(ValueError, match=r"encoder without a classifier.*num_labels=10"):
        model.reset_classifier(10)


def test_set_grad_checkpointing_is_transformers_checkpointing(pixel_values):
    model = classifier().train()
    model.set_grad_checkpointing()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.vit.layers)
    model(pixel_values).logits.sum().backward()
    model.set_grad_checkpointing(False)
    assert not any(layer.gradient_checkpointing for layer in model.vit.layers)
    with pytest.raises(TypeError, match="enable must be True or False"):
        model.set_grad_checkpointing("yes")


def test_num_prefix_tokens_and_no_weight_decay():
    model = classifier(num_register_tokens=2)
    assert model.num_prefix_tokens == model.vit.num_prefix_tokens == 3
    # timm: {'pos_embed', 'cls_token', 'reg_token'}, by the model's own parameter names
    assert model.no_weight_decay() == {
        "vit.embeddings.position_embeddings",
        "vit.embeddings.cls_token",
        "vit.embeddings.register_tokens",
    }
    assert encoder(use_class_token=False, pooling="mean").no_weight_decay() == {"embeddings.position_embeddings"}
    assert model.no_weight_decay() <= {name for name, _ in model.named_parameters()}
