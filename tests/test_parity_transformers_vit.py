"""Numerical parity with transformers' own ViTModel: same hyper-parameters, weights copied across."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from vlm_vision import VisionTransformerConfig, VisionTransformerModel

HPARAMS = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "layer_norm_eps": 1e-12,
}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = ViTModel(ViTConfig(**HPARAMS), add_pooling_layer=False).eval()
    ours = VisionTransformerModel(VisionTransformerConfig(**HPARAMS)).eval()
    # the v5 names coincide; this is the whole mapping
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference, ours


@pytest.mark.parametrize(("height", "width"), [(224, 224), (160, 288)])
def test_matches_transformers_vit(pair, height, width):
    reference, ours = pair
    torch.manual_seed(1)
    x = torch.randn(2, 3, height, width)
    interpolate = (height, width) != (224, 224)
    with torch.no_grad():
        expected = reference(x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
        got = ours(x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
    assert got.last_hidden_state.shape == (2, 1 + (height // 16) * (width // 16), 48)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    for ours_state, ref_state in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours_state, ref_state, atol=1e-5, rtol=1e-5)
