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

from vlm_vision.conversion import convert_checkpoint, read_state_dict

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


def test_npz_hybrid_and_foreign_archives_are_refused_clearly(tmp_path):
    np.savez(tmp_path / "hybrid.npz", **{"conv_root/kernel": np.zeros((7, 7, 3, 8), np.float32)})
    with pytest.raises(ValueError, match=r"hybrid \(ResNet stem \+ ViT\) checkpoint"):
        convert_checkpoint("npz", tmp_path / "hybrid.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"No position embedding in this .npz \(found keys such as \['weights'\]"):
        convert_checkpoint("npz", tmp_path / "other.npz")
