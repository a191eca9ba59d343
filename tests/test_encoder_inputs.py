"""Wrong and unusual inputs to the encoder, its config and its checkpoint folders: each is refused with the problem
and the fix named, or works when it should (other sizes, towers without [CLS], transformers' own keyword arguments)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from tests.conftest import TINY, tiny_config
from vlm_vision import VisionTransformerConfig, VisionTransformerForImageClassification, VisionTransformerModel
from vlm_vision.encoder.modeling_vit import CheckpointFileError, CheckpointMismatchError
from vlm_vision.export.encoder_folder import save_checkpoint


def build(**overrides) -> VisionTransformerModel:
    torch.manual_seed(0)
    return VisionTransformerModel(tiny_config(**overrides)).eval()


@pytest.fixture
def folder(tmp_path):
    return save_checkpoint(build(), tmp_path / "tiny", title="tiny", summary="A tiny test model.")


# --------------------------------------------------------------------------------------------------------------------
# The config: unknown names, transformers' own keyword arguments, values set after creation


@pytest.mark.parametrize(
    "make",
    [
        lambda: VisionTransformerConfig(image_sise=384),
        lambda: VisionTransformerConfig.from_preset("vit-b16", image_sise=384),
        lambda: tiny_config(num_layers=2),
    ],
)
def test_unknown_config_fields_are_refused_with_the_valid_names(make):
    with pytest.raises(TypeError, match=r"has no field '(image_sise|num_layers)'") as error:
        make()
    message = str(error.value)
    assert "image_size" in message and "num_hidden_layers" in message and "interpolation_mode" in message
    if "image_sise" in message:
        assert "did you mean 'image_size'?" in message


def test_transformers_own_keyword_arguments_are_accepted():
    config = tiny_config(
        dtype="bfloat16", id2label={0: "cat", 1: "dog"}, return_dict=False, attn_implementation="eager",
        output_hidden_states=True, problem_type="single_label_classification", torch_dtype="float32",
    )  # fmt: skip
    assert config.num_labels == 2 and config.return_dict is False and config._attn_implementation == "eager"
    assert VisionTransformerConfig(**config.to_dict()).to_dict() == config.to_dict()  # round trip of every key


def test_from_pretrained_overrides_are_checked_and_misspelt_ones_refused(folder):
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4"):
        AutoModel.from_pretrained(folder, image_size=30)  # transformers sets overrides after the config's checks
    with pytest.raises(ValueError, match=r"hidden_act='relu6' is not supported"):
        AutoConfig.from_pretrained(folder, hidden_act="relu6")
    with pytest.raises(TypeError, match=r"has no field 'image_sise' \(did you mean 'image_size'\?\)"):
        AutoModel.from_pretrained(folder, image_sise=48)
    with pytest.raises(TypeError, match=r"has no field 'image_sise'"):
        AutoConfig.from_pretrained(folder, image_sise=48)
    assert AutoModel.from_pretrained(folder, image_size=48, output_hidden_states=True).config.image_size == 48


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": True}, r"hidden_size must be a positive int, got True"),
        ({"image_size": (32.0, 32)}, r"image_size must be a positive int or a pair"),
        ({"image_size": "32"}, r"image_size must be a positive int or a pair"),
        ({"interpolation_mode": "cubic"}, r"interpolation_mode='cubic' is not supported"),
        ({"interpolation_mode": "nearest", "interpolation_antialias": True}, r"antialias=True needs"),
        ({"use_class_token": 1}, r"use_class_token must be True or False"),
        ({"layer_norm_eps": 0}, r"layer_norm_eps must be a finite positive number"),
        ({"layer_scale_init_value": "0.1"}, r"layer_scale_init_value must be None or a number"),
        ({"backbone_config": "r50"}, r"backbone_config must be None or a dict"),
        ({"representation_size": 0}, r"representation_size must be None or a positive int"),
        ({"num_labels": -1}, r"num_labels must be an int >= 0"),
        ({"attention_probs_dropout_prob": float("nan")}, r"attention_probs_dropout_prob must be in \[0, 1\)"),
    ],
)
def test_more_invalid_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_a_model_refuses_other_configs_and_fields_set_to_bad_values():
    from transformers import ViTConfig

    with pytest.raises(TypeError, match=r"takes a VisionTransformerConfig, got ViTConfig.*convert"):
        VisionTransformerModel(ViTConfig())
    with pytest.raises(TypeError, match=r"takes a VisionTransformerConfig, got dict"):
        VisionTransformerModel(dict(TINY))
    config = tiny_config()
    config.num_attention_heads = 5
    with pytest.raises(ValueError, match=r"hidden_size=32 is not divisible by num_attention_heads=5"):
        VisionTransformerModel(config)
    with pytest.raises(TypeError, match=r"unexpected arguments 'extra'"):
        VisionTransformerModel(tiny_config(), "extra")
    with pytest.raises(TypeError, match=r"A preset name is a string"):
        VisionTransformerConfig.from_preset(16)


# --------------------------------------------------------------------------------------------------------------------
# forward / get_intermediate_layers / patch_tokens


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    [
        (lambda: np.zeros((1, 3, 32, 32), np.float32), TypeError, r"got numpy.ndarray: torch.from_numpy"),
        (lambda: torch.zeros(1, 3, 32, 32).tolist(), TypeError, r"got builtins.list: torch.tensor"),
        (lambda: Image.new("RGB", (32, 32)), TypeError, r"got PIL.Image: pass images through the image processor"),
        (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r"dtype torch.uint8.*image processor"),
        (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.bool), TypeError, r"dtype torch.bool"),
        (lambda: torch.zeros(1, 32, 32, 3), ValueError, r"channels-last \(B, H, W, C\).*permute\(0, 3, 1, 2\)"),
        (lambda: torch.zeros(1, 4, 32, 32), ValueError, r"4 channels but the model expects num_channels=3.*RGB"),
        (lambda: torch.zeros(2, 1, 3, 32, 32), ValueError, r"must be 4-D .*\(2, 1, 3, 32, 32\)"),
        (lambda: torch.zeros(0, 3, 32, 32), ValueError, r"holds no image \(shape \(0, 3, 32, 32\)\)"),
    ],
)
def test_wrong_pixel_values_are_named_with_the_fix(make_input, error, message):
    model = build()
    with pytest.raises(error, match=message):
        model(make_input())
    with pytest.raises(error, match=message):
        model.get_intermediate_layers(make_input(), -2)


@pytest.mark.parametrize(
    ("size", "kwargs", "message"),
    [
        ((2, 2), {"interpolate_pos_encoding": True}, r"2x2 is smaller than one patch \(4x4\)"),
        ((0, 8), {"interpolate_pos_encoding": True}, r"0x8 is smaller than one patch"),
        ((34, 32), {"interpolate_pos_encoding": True}, r"34x32 is not divisible by the patch size 4x4"),
        ((48, 48), {}, r"\(48x48\) doesn't match the model's image_size 32x32.*interpolate_pos_encoding=True"),
        ((32, 32), {"interpolate_pos_encoding": "yes"}, r"interpolate_pos_encoding must be True, False or None"),
    ],
)
def test_sizes_the_model_cannot_take_say_so(size, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()(torch.zeros(1, 3, *size), **kwargs)


@pytest.mark.parametrize("overrides", [{}, {"use_class_token": False, "pooling": "mean"}, {"num_register_tokens": 2}])
@pytest.mark.parametrize("size", [(4, 4), (8, 60), (64, 32), (100, 100)])
def test_every_size_the_model_can_interpolate_to_works(overrides, size):
    model = build(**overrides)
    grid = (size[0] // 4, size[1] // 4)
    out = model(torch.randn(2, 3, *size), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, model.num_prefix_tokens + grid[0] * grid[1], 32)
    (penultimate,) = model.get_intermediate_layers(
        torch.randn(1, 3, *size), -2, interpolate_pos_encoding=True, drop_prefix_tokens=True
    )
    assert penultimate.shape == (1, grid[0] * grid[1], 32)


def test_other_float_dtypes_are_cast_to_the_model_dtype(pixel_values):
    model = build()
    expected = model(pixel_values).last_hidden_state
    torch.testing.assert_close(model(pixel_values.double()).last_hidden_state, expected)


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ("-2", TypeError, r"layers must be an int or a sequence of ints.*got '-2'"),
        (1.0, TypeError, r"got 1.0"),
        (True, TypeError, r"got True"),
        ([1, None], TypeError, r"got \[1, None\]"),
        ([], ValueError, r"layers=\[\] is out of range"),
        ([-5], ValueError, r"out of range: this model has 4 hidden states"),
    ],
)
def test_intermediate_layer_indices_are_checked(pixel_values, layers, error, message):
    with pytest.raises(error, match=message):
        build().get_intermediate_layers(pixel_values, layers)


def test_intermediate_layer_indices_may_be_numpy_or_tensor_ints(pixel_values):
    model = build()
    expected = model.get_intermediate_layers(pixel_values, [1, -1])
    for layers in (np.array([1, -1]), torch.tensor([1, -1]), (np.int64(1), -1)):
        for got, want in zip(model.get_intermediate_layers(pixel_values, layers), expected, strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: np.zeros((1, 65, 32)), r"takes a \(batch, tokens, hidden_size\) tensor.*got ndarray"),
        (lambda: torch.zeros(65, 32), r"got \(65, 32\)"),
        (lambda: torch.zeros(1, 32), r"got \(1, 32\)"),  # a pooled output
        (lambda: torch.zeros(1, 1, 32), r"got shape \(1, 1, 32\).*1 prefix tokens then the patches"),
        (lambda: torch.zeros(1, 65, 48), r"got shape \(1, 65, 48\).*32 wide"),
    ],
)
def test_patch_tokens_refuses_what_is_not_a_token_sequence(make_input, message):
    with pytest.raises(ValueError, match=message):
        build().patch_tokens(make_input())


def test_classifier_labels_are_checked(pixel_values):
    model = VisionTransformerForImageClassification(tiny_config(num_labels=3))
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor.*got list"):
        model(pixel_values, labels=[0, 1])
    with pytest.raises(ValueError, match=r"labels has shape \(3,\) but the batch holds 2 images"):
        model(pixel_values, labels=torch.tensor([0, 1, 2]))
    assert model(pixel_values, labels=torch.tensor([0, 2])).loss is not None


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders: missing, mis-shaped, truncated and empty files


def _rewrite_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_weight_is_refused_with_the_keys(folder):
    _rewrite_weights(folder, lambda s: s.pop("layers.0.mlp.fc1.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"lacks 1 weight\(s\).*\['layers.0.mlp.fc1.weight'\]") as error:
        AutoModel.from_pretrained(folder)
    assert isinstance(error.value, ValueError) and "allow_missing_keys=True" in str(error.value)
    with pytest.raises(CheckpointMismatchError, match=r"layers.0.mlp.fc1.weight"):
        AutoModelForImageClassification.from_pretrained(folder, num_labels=3)
    model = AutoModel.from_pretrained(folder, allow_missing_keys=True)  # the explicit opt-out: freshly initialised
    assert model.layers[0].mlp.fc1.weight.std() > 0


def test_overrides_that_add_weights_are_refused(folder):
    with pytest.raises(CheckpointMismatchError, match=r"lacks 2 weight\(s\).*pooler.dense.bias"):
        AutoModel.from_pretrained(folder, pooler_act="tanh")


def test_an_encoder_loads_into_a_classifier_with_a_new_head_but_a_partial_head_is_refused(folder, tmp_path):
    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=3, classifier_head="mlp")
    assert torch.count_nonzero(classifier.classifier.weight) == 0  # new, zero-initialised
    classifier.save_pretrained(tmp_path / "classifier")
    _rewrite_weights(tmp_path / "classifier", lambda s: s.pop("classifier.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"lacks 1 weight\(s\).*\['classifier.weight'\]"):
        VisionTransformerForImageClassification.from_pretrained(tmp_path / "classifier")


def test_weights_of_another_shape_raise_a_runtime_and_value_error(folder):
    with pytest.raises(RuntimeError, match=r"layers.0.mlp.fc1.weight: checkpoint \(48, 32\) vs model \(64, 32\)"):
        AutoModel.from_pretrained(folder, intermediate_size=64)
    with pytest.raises(ValueError, match=r"ignore_mismatched_sizes=True"):
        AutoModel.from_pretrained(folder, intermediate_size=64)
    AutoModel.from_pretrained(folder, intermediate_size=64, ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match=r"allow_missing_keys must be True or False"):
        AutoModel.from_pretrained(folder, allow_missing_keys="yes")


@pytest.mark.parametrize("cut", [0, 7, 100, -10])
def test_truncated_or_empty_weights_name_the_file(folder, cut):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])  # empty, inside the header, inside the data, or short of the end
    with pytest.raises(CheckpointFileError, match=r"model\.safetensors .*truncated or corrupt.*again") as error:
        AutoModel.from_pretrained(folder)
    assert isinstance(error.value, OSError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("text", ["", '{"model_type": "vlm_vit", "hidden_si'])
def test_truncated_or_empty_config_names_the_file(folder, text):
    (folder / "config.json").write_text(text)
    with pytest.raises(OSError, match=r"config\.json' is not a valid JSON file"):
        AutoModel.from_pretrained(folder)


def test_a_config_json_with_an_unknown_key_is_refused(folder):
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "hiden_size": 64}))
    with pytest.raises(TypeError, match=r"has no field 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"output_hiden_states": True}, TypeError, r"unexpected keyword arguments \['output_hiden_states'\]"),
        ({"labels": torch.tensor([0])}, TypeError, r"unexpected keyword arguments \['labels'\]"),
        ({"output_hidden_states": "yes"}, TypeError, r"output_hidden_states must be an int or a sequence of ints"),
        ({"output_hidden_states": 9}, ValueError, r"output_hidden_states=9 is out of range: .*4 hidden states"),
        ({"output_attentions": 1}, TypeError, r"output_attentions must be True, False or None"),
    ],
)
def test_misspelt_or_mistyped_forward_options_are_refused(pixel_values, kwargs, error, message):
    with pytest.raises(error, match=message):
        build()(pixel_values, **kwargs)


def test_transformers_forward_options_still_work(pixel_values):
    model = build()
    assert model(pixel_values, output_hidden_states=[-2, 1], return_dict=False)[0].shape == (2, 65, 32)
    assert model(pixel_values, output_attentions=True, image_sizes=None).attentions[0].shape == (2, 4, 65, 65)


def test_boolean_options_of_the_feature_methods_are_checked(pixel_values):
    model = build()
    with pytest.raises(TypeError, match=r"apply_layernorm must be True or False, got 'yes'"):
        model.get_intermediate_layers(pixel_values, -2, apply_layernorm="yes")
    with pytest.raises(TypeError, match=r"stop_early must be True or False"):
        model.forward_intermediates(pixel_values, stop_early=1)


def test_configs_of_other_models_and_bad_sub_configs_are_named(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"'clip_vision_model' config, not a 'vlm_vit' one: .*--from clip"):
        VisionTransformerModel.from_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"id2label must be a dict"):
        tiny_config(id2label=["cat", "dog"])
    with pytest.raises(ValueError, match=r"backbone_config has unknown keys \['layer_typ'\]"):
        tiny_config(patch_size=16, backbone_config={"layer_typ": "bottleneck"})
    with pytest.raises(ValueError, match=r"backbone_config is not a valid BitConfig"):
        tiny_config(patch_size=16, backbone_config={"depths": "3, 4"})


def test_save_pretrained_onto_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"is a file: save_pretrained writes a folder"):
        build().save_pretrained(tmp_path / "file")  # transformers logs an error and returns


def test_classifier_labels_of_the_wrong_kind_are_named(pixel_values):
    model = VisionTransformerForImageClassification(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match=r"float labels of shape \(2,\) are read as multi-label.*labels.long\(\)"):
        model(pixel_values, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels \[3, 7\] are outside 0..2"):
        model(pixel_values, labels=torch.tensor([3, 7]))
    assert model(pixel_values, labels=torch.tensor([-100, 2])).loss.isfinite()  # -100: ignored
    # transformers fixes problem_type at the first loss: float labels are now a mistake
    with pytest.raises(ValueError, match=r"problem_type is single_label_classification"):
        model(pixel_values, labels=torch.zeros(2, 3))
    fresh = VisionTransformerForImageClassification(tiny_config(num_labels=3))
    assert fresh(pixel_values, labels=torch.zeros(2, 3)).loss.isfinite()  # multi-label targets


def test_the_hybrid_interpolates_to_any_multiple_of_its_stride():
    backbone = {
        "layer_type": "bottleneck", "depths": [1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 8,
        "num_groups": 4, "global_padding": "SAME", "embedding_dynamic_padding": True, "out_features": ["stage3"],
    }  # fmt: skip
    model = build(image_size=64, patch_size=16, backbone_config=backbone)
    for size in ((16, 16), (48, 80), (96, 64)):
        out = model(torch.randn(1, 3, *size), interpolate_pos_encoding=True)
        assert out.last_hidden_state.shape == (1, 1 + (size[0] // 16) * (size[1] // 16), 32)
    with pytest.raises(ValueError, match=r"40x64 is not divisible by the patch size 16x16"):
        model(torch.randn(1, 3, 40, 64), interpolate_pos_encoding=True)
