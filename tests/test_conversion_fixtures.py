"""Converters from timm and the JAX `.npz` layouts, against golden outputs of the real reference code.

timm, jax and flax cannot be installed beside the project's torch; tests/fixtures/make_timm_fixture.py and
make_npz_fixture.py produced these fixtures once with the real libraries (versions and commands in their docstrings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm_vision.conversion import convert_checkpoint, fold_weight_standardization, read_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = RTOL = 1e-5


def close(got, expected):
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def encoder_of(model):
    return getattr(model, "vit", model)


@pytest.mark.parametrize(
    ("variant", "prefix", "pooling", "final_norm"),
    [("vit_cls", 1, "cls", "all"), ("vit_reg_fcnorm", 3, "mean", "pooled"), ("vit_map", 1, "map", "all")],
)
def test_timm_matches_timm(variant, prefix, pooling, final_norm):
    folder = FIXTURES / "timm" / variant
    expected = load_file(str(folder / "expected.safetensors"))
    converted = convert_checkpoint("timm", folder)
    model = converted.model
    encoder = encoder_of(model)
    config = encoder.config
    assert (config.num_prefix_tokens, config.pooling, config.final_norm) == (prefix, pooling, final_norm)
    x = expected["pixel_values"]
    with torch.no_grad():
        out = encoder(x, output_hidden_states=True)
    close(out.last_hidden_state, expected["features"])  # timm forward_features
    close(out.pooler_output, expected["pooled"])  # forward_head(pre_logits=True)
    close(out.hidden_states[1][:, prefix:], expected["block1_patches"])  # forward_intermediates(indices=[0])
    close(out.hidden_states[1][:, :prefix], expected["block1_prefix"])
    if "logits" in expected:
        with torch.no_grad():
            close(model(x).logits, expected["logits"])
    assert converted.resample.name == "BICUBIC" and converted.image_mean == (0.5, 0.5, 0.5)  # its pretrained_cfg


def test_timm_pytorch_file_without_config_needs_the_head_count(tmp_path):
    folder = FIXTURES / "timm" / "vit_cls"
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"number of attention heads .*--num-heads"):
        convert_checkpoint("timm", tmp_path / "vit.pth")
    expected = load_file(str(folder / "expected.safetensors"))
    model = convert_checkpoint("timm", tmp_path / "vit.pth", num_attention_heads=2).model
    with torch.no_grad():
        close(model(expected["pixel_values"]).logits, expected["logits"])


def _expected_npz(name):
    with np.load(FIXTURES / "npz" / f"{name}.expected.npz") as archive:
        return {k: torch.from_numpy(archive[k]) for k in archive.files}


@pytest.mark.parametrize(
    ("name", "model_class", "note"),
    [
        ("vit_jax_cls_prelogits", "VisionTransformerForImageClassification", "[CLS] with its E_pos row"),
        ("big_vision_tok_scan", "VisionTransformerModel", "[CLS] without E_pos"),
        ("big_vision_map", "VisionTransformerForImageClassification", "no [CLS]"),
    ],
)
def test_npz_matches_the_jax_reference(name, model_class, note):
    expected = _expected_npz(name)
    converted = convert_checkpoint("npz", FIXTURES / "npz" / f"{name}.npz")
    model = converted.model
    assert type(model).__name__ == model_class and note in converted.notes[0]
    x = expected["pixel_values"]
    with torch.no_grad():
        out = encoder_of(model)(x, output_hidden_states=True)
        close(out.last_hidden_state, expected["features"])
        close(out.hidden_states[1], expected["block1"])
        if "pooled" in expected:
            close(out.pooler_output, expected["pooled"])
        if "logits" in expected:
            close(model(x).logits, expected["logits"])


def test_npz_pre_linen_names_and_old_position_embedding_place(tmp_path):
    """The paper-era files count modules of all types (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) and
    keep the position embedding in the encoder: renamed that way, the fixture converts to the same outputs."""
    renames = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2"}
    renames["MlpBlock_0"] = "MlpBlock_3"
    state = {}
    for key, value in read_state_dict(FIXTURES / "npz" / "vit_jax_cls_prelogits.npz").items():
        for old, new in renames.items():
            key = key.replace(old, new) if key.startswith("Transformer/encoderblock_") else key
        key = "Transformer/pos_embedding" if key.endswith("pos_embedding") else key
        state[key] = value.numpy()
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in state
    np.savez(tmp_path / "old.npz", **state)
    expected = _expected_npz("vit_jax_cls_prelogits")
    with torch.no_grad():
        close(
            convert_checkpoint("npz", tmp_path / "old.npz").model(expected["pixel_values"]).logits, expected["logits"]
        )


@pytest.mark.parametrize(("name", "depths", "patch_size"), [("vit_jax_r_hybrid", [2, 1], 8), ("vit_jax_r_root", [], 8)])
def test_npz_hybrid_matches_the_jax_reference(name, depths, patch_size):
    """The ResNet + ViT hybrids of vit_jax: the ResNet feature map, the tokens, block 1 and the logits. The fixture's
    filters and activations are small enough that JAX's standardisation and GroupNorm epsilons change the outputs
    far beyond 1e-5, so this fails without the fold or without backbone_norm_eps (see make_npz_hybrid_fixture.py)."""
    expected = _expected_npz(name)
    converted = convert_checkpoint("npz", FIXTURES / "npz" / f"{name}.npz")
    model = converted.model
    config = model.config
    assert config.backbone_config["depths"] == depths and config.patch_size == patch_size
    assert config.backbone_norm_eps == 1e-6 and "Hybrid" in converted.notes[1]
    x = expected["pixel_values"]
    with torch.no_grad():
        feature_map = model.vit.embeddings.patch_embeddings.backbone(x).feature_maps[-1]
        out = model.vit(x, output_hidden_states=True)
        close(feature_map, expected["feature_map"])
        close(out.last_hidden_state, expected["features"])
        close(out.hidden_states[1], expected["block1"])
        close(model(x).logits, expected["logits"])


def test_folded_weight_standardization_is_jax_standardization():
    """BiT's standardisation (transformers' own module, eps 1e-8) of the folded weight equals JAX's
    (w - mean) / (std + 1e-5) per output channel, for filter stds from 0 (a constant filter) to 10."""
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    rng = np.random.default_rng(0)
    scales = np.array([0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0])
    kernel = rng.standard_normal((3, 3, 4, len(scales))) * scales + 0.3  # HWIO, a non-zero mean too
    mean = kernel.mean(axis=(0, 1, 2))
    jax_standardized = (kernel - mean) / (kernel.std(axis=(0, 1, 2)) + 1e-5)  # vit_jax weight_standardize, float64
    conv = WeightStandardizedConv2d(4, len(scales), 3, eps=1e-8)
    with torch.no_grad():
        conv.weight.copy_(fold_weight_standardization(torch.from_numpy(kernel)))
        x = torch.zeros(1, 4, 3, 3)
        x[0, :, 1, 1] = 1.0  # the centre tap of each input channel: reads the standardised weights
        got = conv(x)[0, :, 1, 1]
    expected = torch.from_numpy(jax_standardized[1, 1].sum(axis=0)).float()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    unfolded = WeightStandardizedConv2d(4, len(scales), 3, eps=1e-8)
    with torch.no_grad():
        unfolded.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
        assert not torch.allclose(unfolded(x)[0, :, 1, 1], expected, atol=1e-4, rtol=1e-4)


def test_foreign_archives_are_refused_clearly(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"No position embedding in this .npz \(found keys such as \['weights'\]"):
        convert_checkpoint("npz", tmp_path / "other.npz")
