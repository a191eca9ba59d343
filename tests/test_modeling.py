import pytest
import torch

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerForImageClassification, VisionTransformerModel

torch.set_grad_enabled(True)


def build(seed=0, **overrides) -> VisionTransformerModel:
    torch.manual_seed(seed)
    return VisionTransformerModel(tiny_config(**overrides)).eval()


def test_output_shapes_and_pooler_is_normalised_cls(pixel_values):
    model = build()
    out = model(pixel_values)
    assert out.last_hidden_state.shape == (2, 1 + 64, 32)
    assert out.pooler_output.shape == (2, 32)
    # Eq. 4: y = LN(z_L^0): the pooled output is the normalised [CLS] token
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    assert model.patch_tokens(out.last_hidden_state).shape == (2, 64, 32)


def test_hidden_states_follow_the_transformers_convention(pixel_values):
    model = build()
    out = model(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(hidden[0], model.embeddings(pixel_values))  # index 0: the embeddings
    torch.testing.assert_close(hidden[1], model.layers[0](hidden[0]))  # index i: output of block i
    # index -1 is the last block's output before the final LayerNorm
    torch.testing.assert_close(model.layernorm(hidden[-1]), out.last_hidden_state)
    assert not torch.allclose(hidden[-1], out.last_hidden_state)
    # an index selects only that hidden state
    selected = model(pixel_values, output_hidden_states=-2).hidden_states
    torch.testing.assert_close(selected[-2], hidden[-2])
    assert selected[0] is None


def test_intermediate_layers_match_hidden_states_and_stop_early(pixel_values):
    model = build()
    hidden = model(pixel_values, output_hidden_states=True).hidden_states
    calls = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(model.layers)
    ]
    penultimate, first = model.get_intermediate_layers(pixel_values, [-2, 1])
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]  # the last block never ran
    torch.testing.assert_close(penultimate, hidden[-2])
    torch.testing.assert_close(first, hidden[1])
    (patches,) = model.get_intermediate_layers(pixel_values, 0, drop_prefix_tokens=True, apply_layernorm=True)
    torch.testing.assert_close(patches, model.layernorm(hidden[0])[:, 1:])
    with pytest.raises(ValueError, match=r"layers=7 is out of range: this model has 4 hidden states"):
        model.get_intermediate_layers(pixel_values, 7)


def test_attention_weights_are_returned_under_sdpa(pixel_values):
    model = build()
    assert model.config._attn_implementation == "sdpa"
    out = model(pixel_values, output_attentions=True)
    assert len(out.attentions) == 3
    assert all(a is not None and a.shape == (2, 4, 65, 65) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 65))


def test_sdpa_and_eager_agree(pixel_values):
    sdpa = build()
    eager = build()
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(pixel_values).last_hidden_state, eager(pixel_values).last_hidden_state)
    torch.testing.assert_close(
        sdpa(pixel_values, output_attentions=True).attentions[1],
        eager(pixel_values, output_attentions=True).attentions[1],
    )


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(pixel_values):
    results = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.layers)
        out = model(pixel_values)
        out.pooler_output.pow(2).sum().backward()
        results.append((out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pooling": "mean"},
        {"pooling": "map", "use_class_token": False},
        {"num_register_tokens": 2, "layer_scale_init_value": 0.1, "pre_norm": True},
    ],
)
def test_every_parameter_gets_a_gradient(pixel_values, overrides):
    model = build(**overrides).train()
    model(pixel_values).pooler_output.pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_state_dict_keys_are_a_stable_public_api():
    model = build(num_hidden_layers=1)
    assert list(model.state_dict()) == [
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layers.0.layernorm_before.weight",
        "layers.0.layernorm_before.bias",
        "layers.0.attention.q_proj.weight",
        "layers.0.attention.q_proj.bias",
        "layers.0.attention.k_proj.weight",
        "layers.0.attention.k_proj.bias",
        "layers.0.attention.v_proj.weight",
        "layers.0.attention.v_proj.bias",
        "layers.0.attention.o_proj.weight",
        "layers.0.attention.o_proj.bias",
        "layers.0.layernorm_after.weight",
        "layers.0.layernorm_after.bias",
        "layers.0.mlp.fc1.weight",
        "layers.0.mlp.fc1.bias",
        "layers.0.mlp.fc2.weight",
        "layers.0.mlp.fc2.bias",
        "layernorm.weight",
        "layernorm.bias",
    ]
    lora_leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} <= lora_leaves


def test_input_embeddings_are_the_patch_embedding():
    model = build()
    assert model.get_input_embeddings() is model.embeddings.patch_embeddings


def test_no_split_modules_name_real_classes():
    model = build()
    names = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= names


@pytest.mark.parametrize(
    ("make_input", "kwargs", "message"),
    [
        (lambda: torch.randn(1, 3, 48, 48), {}, r"Input image size \(48x48\) doesn't match.*interpolate_pos_encoding"),
        (lambda: torch.randn(1, 1, 32, 32), {}, r"1 channels but the model expects num_channels=3.*RGB"),
        (lambda: torch.randn(1, 3, 30, 32), {"interpolate_pos_encoding": True}, r"30x32 is not divisible by the patch"),
        (lambda: torch.randn(3, 32, 32), {}, r"must be 4-D .*got shape \(3, 32, 32\).*pixel_values\[None\]"),
        (lambda: None, {}, r"pixel_values is required"),
    ],
)
def test_bad_inputs_raise_with_the_fix(make_input, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build()(make_input(), **kwargs)


def test_interpolated_forward_on_a_non_square_size_uses_the_resampled_table():
    model = build()
    out = model(torch.randn(1, 3, 48, 24), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 1 + 12 * 6, 32)
    # at the native size, interpolation is the identity
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x, interpolate_pos_encoding=True).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu", "gelu_pytorch_tanh"])
def test_activation_switch(pixel_values, activation):
    model = build(hidden_act=activation)
    x = torch.linspace(-3, 3, 7)
    expected = {
        "gelu": torch.nn.functional.gelu(x),
        "quick_gelu": x * torch.sigmoid(1.702 * x),
        "gelu_pytorch_tanh": torch.nn.functional.gelu(x, approximate="tanh"),
    }[activation]
    torch.testing.assert_close(model.layers[0].mlp.activation_fn(x), expected)
    assert torch.isfinite(model(pixel_values).last_hidden_state).all()


def test_tokens_without_class_token_with_registers(pixel_values):
    model = build(use_class_token=False, num_register_tokens=3, pooling="mean")
    out = model(pixel_values)
    assert model.num_prefix_tokens == 3
    assert out.last_hidden_state.shape == (2, 3 + 64, 32)
    assert model.embeddings.position_embeddings.shape == (1, 64, 32)  # registers carry no position embedding
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 3:].mean(1))
    embedded = model.embeddings(pixel_values)
    torch.testing.assert_close(embedded[:, :3], model.embeddings.register_tokens.expand(2, -1, -1))


def test_class_token_then_registers_layout(pixel_values):
    model = build(num_register_tokens=2)
    embedded = model.embeddings(pixel_values)
    emb = model.embeddings
    torch.testing.assert_close(embedded[:, 0], (emb.cls_token + emb.position_embeddings[:, :1]).expand(2, -1, -1)[:, 0])
    torch.testing.assert_close(embedded[:, 1:3], emb.register_tokens.expand(2, -1, -1))


def test_pre_norm_and_layer_scale(pixel_values):
    model = build(pre_norm=True, layer_scale_init_value=1e-5)
    assert isinstance(model.pre_layernorm, torch.nn.LayerNorm)
    hidden0 = model(pixel_values, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(hidden0, model.pre_layernorm(model.embeddings(pixel_values)))
    torch.testing.assert_close(model.layers[0].layer_scale1.lambda1, torch.full((32,), 1e-5))
    # with tiny layer scale, the blocks barely change the residual stream
    hidden = model(pixel_values, output_hidden_states=True).hidden_states
    assert (hidden[-1] - hidden[0]).abs().max() < 1e-3


def test_attention_pooling_head(pixel_values):
    model = build(pooling="map", use_class_token=False)
    out = model(pixel_values)
    assert out.pooler_output.shape == (2, 32)
    torch.testing.assert_close(out.pooler_output, model.head(out.last_hidden_state))
    # the probe attends over tokens: permuting the tokens leaves the pooled output unchanged
    perm = torch.randperm(out.last_hidden_state.shape[1])
    torch.testing.assert_close(model.head(out.last_hidden_state[:, perm]), out.pooler_output, atol=1e-5, rtol=1e-5)


def test_classifier_heads(pixel_values):
    torch.manual_seed(0)
    linear = VisionTransformerForImageClassification(tiny_config(num_labels=5)).eval()
    assert linear.pre_logits is None
    assert linear.classifier.weight.shape == (5, 32)
    assert torch.count_nonzero(linear.classifier.weight) == 0 and torch.count_nonzero(linear.classifier.bias) == 0
    out = linear(pixel_values, labels=torch.tensor([1, 3]))
    torch.testing.assert_close(out.logits, torch.zeros(2, 5))  # zero-initialised head: uniform predictions
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(5.0)))

    mlp = VisionTransformerForImageClassification(
        tiny_config(num_labels=5, classifier_head="mlp", representation_size=24)
    ).train()
    assert isinstance(mlp.pre_logits[1], torch.nn.Tanh) and mlp.pre_logits[0].weight.shape == (24, 32)
    out = mlp(pixel_values, labels=torch.tensor([1, 3]))
    out.loss.backward()
    assert mlp.classifier.weight.grad.abs().sum() > 0
    hidden = mlp.vit(pixel_values).pooler_output
    torch.testing.assert_close(mlp(pixel_values).logits, mlp.classifier(torch.tanh(mlp.pre_logits[0](hidden))))


def test_hybrid_takes_patches_from_a_bit_feature_map():
    backbone = {
        "layer_type": "bottleneck",
        "depths": [1, 1, 1],
        "hidden_sizes": [16, 32, 64, 128],
        "embedding_size": 8,
        "num_groups": 4,
        "global_padding": "SAME",
        "embedding_dynamic_padding": True,
        "out_features": ["stage3"],
    }
    torch.manual_seed(0)
    model = VisionTransformerModel(tiny_config(image_size=64, patch_size=16, backbone_config=backbone)).eval()
    from transformers import BitBackbone

    assert isinstance(model.embeddings.patch_embeddings.backbone, BitBackbone)
    assert model.embeddings.patch_embeddings.projection.kernel_size == (1, 1)
    x = torch.randn(2, 3, 64, 64)
    feature_map = model.embeddings.patch_embeddings.backbone(x).feature_maps[-1]
    assert feature_map.shape == (2, 64, 4, 4)  # stride 16
    out = model(x)
    assert out.last_hidden_state.shape == (2, 1 + 16, 32)
    model.train()
    model(x).pooler_output.pow(2).sum().backward()  # a plain sum of LN outputs is constant: no gradient
    backbone_params = list(model.embeddings.patch_embeddings.backbone.named_parameters())
    assert backbone_params and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in backbone_params)
