"""Converters from transformers' ViT, CLIP, SigLIP and DINOv2: exact parity against the reference classes themselves,
built from tiny random configs, plus the strictness, safety and CLI contracts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from vlm_vision.conversion import convert_checkpoint, main, read_state_dict

TINY = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
}
ATOL = RTOL = 1e-5


def randomised(model):
    """Every parameter random: zero biases and unit LayerNorm weights would hide a wrong mapping."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def saved(model, tmp_path, name="source"):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def assert_parity(reference, ours, x, layer=1, **kwargs):
    """Tokens, pooled output and hidden layer `layer` within 1e-5 (fp32)."""
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True, **kwargs)
        got = ours(x, output_hidden_states=True, **kwargs)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.hidden_states[layer], expected.hidden_states[layer], atol=ATOL, rtol=RTOL)
    assert len(got.hidden_states) == len(expected.hidden_states)


# --------------------------------------------------------------------------------------------------------------------
# transformers ViT: v4-era names on disk (what save_pretrained still writes) and v5 names


def test_hf_vit_with_pooler_v4_names_on_disk(tmp_path, pixel_values):
    reference = randomised(ViTModel(ViTConfig(**TINY)))
    converted = convert_checkpoint("hf", saved(reference, tmp_path))
    assert "v4 parameter names" in converted.notes[0]
    assert converted.model.config.pooler_act == "tanh"  # ViTModel's pooler: dense + tanh on LN([CLS])
    assert_parity(reference, converted.model, pixel_values)


def test_hf_vit_v5_names(tmp_path, pixel_values):
    reference = randomised(ViTModel(ViTConfig(**TINY, qkv_bias=False), add_pooling_layer=False))
    folder = tmp_path / "v5"
    reference.config.save_pretrained(folder)
    save_file(
        reference.state_dict(), str(folder / "model.safetensors")
    )  # in-memory v5 names: layers.N.attention.q_proj
    assert any(".q_proj." in k for k in read_state_dict(folder))
    converted = convert_checkpoint("hf", folder)
    assert "v5 parameter names" in converted.notes[0] and converted.model.config.pooler_act is None
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        got = converted.model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.hidden_states[1], expected.hidden_states[1], atol=ATOL, rtol=RTOL)


def test_hf_vit_classifier(tmp_path, pixel_values):
    config = ViTConfig(**TINY, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"})
    reference = randomised(ViTForImageClassification(config))
    converted = convert_checkpoint("hf", saved(reference, tmp_path))
    assert converted.model.config.id2label[1] == "dog"
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        got = converted.model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.hidden_states[2], expected.hidden_states[2], atol=ATOL, rtol=RTOL)


def test_image_size_resamples_the_position_embedding_like_transformers(tmp_path):
    reference = randomised(ViTModel(ViTConfig(**TINY)))
    converted = convert_checkpoint("hf", saved(reference, tmp_path), image_size=48)
    model = converted.model
    assert model.config.image_size == 48 and model.embeddings.position_embeddings.shape == (1, 1 + 12 * 12, 32)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():  # transformers interpolates at run time the same way (bicubic, no antialias)
        expected = reference(x, interpolate_pos_encoding=True)
        got = model(x)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------------------------
# CLIP, SigLIP, DINOv2


def test_clip_vision_model(tmp_path, pixel_values):
    reference = randomised(CLIPVisionModel(CLIPVisionConfig(**TINY)))
    converted = convert_checkpoint("clip", saved(reference, tmp_path))
    config = converted.model.config
    assert (config.final_norm, config.pre_norm, config.hidden_act, config.patch_embedding_bias) == (
        "pooled",
        True,
        "quick_gelu",
        False,
    )
    assert config.num_prefix_tokens == 1
    assert_parity(reference, converted.model, pixel_values, layer=0)
    assert_parity(reference, converted.model, pixel_values, layer=-2)


def test_clip_vision_tower_of_a_full_clip_model(tmp_path, pixel_values):
    text = {"vocab_size": 99, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    text["intermediate_size"] = 24
    full = randomised(CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=8)))
    converted = convert_checkpoint("clip", saved(full, tmp_path))  # text tower and projections declared, not used
    with torch.no_grad():
        expected = full.vision_model(pixel_values)
        got = converted.model(pixel_values)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=RTOL)


def test_siglip_keeps_every_token(tmp_path, pixel_values):
    reference = randomised(SiglipVisionModel(SiglipVisionConfig(**TINY)))
    converted = convert_checkpoint("siglip", saved(reference, tmp_path))
    model = converted.model
    assert model.config.num_prefix_tokens == 0 and not model.config.use_class_token
    assert model.config.pooling == "map" and model.config.hidden_act == "gelu_pytorch_tanh"
    assert_parity(reference, model, pixel_values)
    tokens = model(pixel_values).last_hidden_state
    assert model.patch_tokens(tokens).shape == (2, 64, 32)  # nothing dropped: a VLM keeps all its tokens


# SigLIP2 NaFlex: patchified inputs of their own grids, padded and masked; an 8 x 8 position table
SIGLIP2_TINY = {k: v for k, v in TINY.items() if k != "image_size"} | {"num_patches": 64}
# the table's grid, wide, tall and one column (where torch's antialiased kernel goes wrong), a small one
SIGLIP2_GRIDS = [(8, 8), (2, 24), (16, 1), (3, 5)]


def siglip2_batch(grids=SIGLIP2_GRIDS, length=64, seed=2):
    """Random patches (as Siglip2's processor lays them out), zero padding, the mask and the grids."""
    torch.manual_seed(seed)
    pixel_values = torch.zeros(len(grids), length, 3 * 4 * 4)
    mask = torch.zeros(len(grids), length, dtype=torch.int32)
    for i, (h, w) in enumerate(grids):
        pixel_values[i, : h * w] = torch.randn(h * w, 48)
        mask[i, : h * w] = 1
    return pixel_values, mask, torch.tensor(grids)


def assert_siglip2_parity(reference, ours, pixel_values, mask, shapes, layer=1):
    """Tokens (the real ones), pooled output and a middle layer within 1e-5 (fp32), image by image."""
    with torch.no_grad():
        expected = reference(pixel_values, mask, shapes, output_hidden_states=True)
        got = ours(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.hidden_states[layer][real], expected.hidden_states[layer][real], atol=ATOL, rtol=0)
    if expected.pooler_output is not None:
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=RTOL)
    assert len(got.hidden_states) == len(expected.hidden_states)


def test_siglip2_naflex_parity_on_a_masked_batch_of_mixed_grids(tmp_path):
    reference = randomised(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_TINY)))
    converted = convert_checkpoint("siglip2", saved(reference, tmp_path))
    model = converted.model
    config = model.config
    assert (config.image_size, config.grid_size, config.num_prefix_tokens) == (32, (8, 8), 0)
    assert (config.pooling, config.interpolation_mode, config.interpolation_antialias) == ("map", "triangle", False)
    assert_siglip2_parity(reference, model, *siglip2_batch())
    # each image of the batch alone, unpadded, gives its own rows of the batch
    pixel_values, mask, shapes = siglip2_batch()
    with torch.no_grad():
        batch = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        for i, (h, w) in enumerate(SIGLIP2_GRIDS):
            alone = model(pixel_values[i : i + 1, : h * w], spatial_shapes=shapes[i : i + 1])
            torch.testing.assert_close(
                batch.last_hidden_state[i, : h * w], alone.last_hidden_state[0], atol=ATOL, rtol=0
            )


def test_siglip2_without_head_and_inside_a_siglip2_model_folder(tmp_path):
    headless = randomised(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_TINY, vision_use_head=False)))
    model = convert_checkpoint("siglip2", saved(headless, tmp_path, "headless")).model
    assert model.config.pooling == "mean" and model.head is None
    assert_siglip2_parity(headless, model, *siglip2_batch())
    text = Siglip2TextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    full = Siglip2Model(Siglip2Config(text_config=text.to_dict(), vision_config=SIGLIP2_TINY))
    full = randomised(full)
    converted = convert_checkpoint("siglip2", saved(full, tmp_path, "full"))  # text tower declared, not used
    assert_siglip2_parity(full.vision_model, converted.model, *siglip2_batch())


def test_siglip2_preprocessing_is_the_sources(tmp_path):
    from PIL import Image

    from vlm_vision import VisionTransformerImageProcessor

    reference = randomised(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_TINY)))
    folder = saved(reference, tmp_path)
    default = convert_checkpoint("siglip2", folder).image_processor
    assert type(default) is VisionTransformerImageProcessor
    assert (default.patch_size, default.max_num_patches, tuple(default.image_mean)) == (4, 64, (0.5, 0.5, 0.5))
    theirs = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=48, image_mean=[0.4] * 3, image_std=[0.3] * 3)
    theirs.save_pretrained(folder)
    converted = convert_checkpoint("siglip2", folder)
    assert "native-resolution mode" in converted.notes[-1] and "at most 48 patches of 4 pixels" in converted.notes[-1]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 90), (64, 40)]]
    ours, expected = converted.image_processor(images, return_tensors="pt"), theirs(images, return_tensors="pt")
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    # the whole path: their processor and model against ours, through a written folder
    out = tmp_path / "converted"
    main(["--from", "siglip2", str(folder), "--out", str(out)])
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor) is VisionTransformerImageProcessor and processor.max_num_patches == 48
    batch = processor(images, return_tensors="pt")
    model = AutoModel.from_pretrained(out).eval()
    assert_siglip2_parity(
        reference, model, batch["pixel_values"], batch["pixel_attention_mask"], batch["spatial_shapes"]
    )


def test_siglip_and_siglip2_name_each_other(tmp_path):
    siglip = saved(randomised(SiglipVisionModel(SiglipVisionConfig(**TINY))), tmp_path, "siglip")
    with pytest.raises(ValueError, match=r"patches with a convolution: a SigLIP tower\? Use --from siglip\."):
        convert_checkpoint("siglip2", siglip)
    siglip2 = saved(randomised(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_TINY))), tmp_path, "siglip2")
    with pytest.raises(ValueError, match=r"patches with a linear layer: a SigLIP2 NaFlex tower\? Use --from siglip2"):
        convert_checkpoint("siglip", siglip2)


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2(tmp_path, pixel_values, registers):
    if registers:
        config = Dinov2WithRegistersConfig(**TINY, num_register_tokens=registers, layerscale_value=0.5)
        reference = randomised(Dinov2WithRegistersModel(config))
    else:
        reference = randomised(Dinov2Model(Dinov2Config(**TINY, layerscale_value=0.5)))
    converted = convert_checkpoint("dinov2", saved(reference, tmp_path))
    config = converted.model.config
    assert config.num_register_tokens == registers and config.num_prefix_tokens == 1 + registers
    assert config.intermediate_size == 4 * 32  # transformers' DINOv2 sizes the MLP by mlp_ratio
    assert_parity(reference, converted.model, pixel_values)


# --------------------------------------------------------------------------------------------------------------------
# Strictness, unknown layouts, unsafe files


def _clip_folder(tmp_path):
    return saved(randomised(CLIPVisionModel(CLIPVisionConfig(**TINY))), tmp_path)


def _rewrite(folder, edit):
    state = read_state_dict(folder)
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_a_leftover_source_key_is_listed(tmp_path):
    folder = _rewrite(_clip_folder(tmp_path), lambda s: s.update({"embeddings.extra_scale": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"source keys no rule uses \(1\): \['embeddings.extra_scale'\]"):
        convert_checkpoint("clip", folder)


def test_an_unfilled_model_key_is_listed(tmp_path):
    folder = _rewrite(_clip_folder(tmp_path), lambda s: s.pop("post_layernorm.weight"))
    with pytest.raises(ValueError, match=r"model keys the source does not fill \(1\): \['layernorm.weight'\]"):
        convert_checkpoint("clip", folder)


def test_a_shape_mismatch_is_listed(tmp_path):
    folder = _clip_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"shape mismatches .*mlp.fc1.weight: source \(48, 32\) vs model \(40, 32\)"):
        convert_checkpoint("clip", folder)


@pytest.mark.parametrize(
    ("source_format", "message"),
    [
        ("dinov2", r"do not look like a --from dinov2 checkpoint.*Found keys such as \['embeddings.class_embedding'"),
        ("siglip", r"class_embedding: a CLIP tower\? Use --from clip"),
        ("siglip2", r"class_embedding: a CLIP tower\? Use --from clip"),
        ("hf", r"do not look like a --from hf checkpoint"),
        ("timm", r"do not look like a --from timm checkpoint"),
        ("jpeg", r"Unknown source format 'jpeg'; use one of"),
    ],
)
def test_the_wrong_layout_is_named(tmp_path, source_format, message):
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(source_format, _clip_folder(tmp_path))


def test_missing_inputs_raise_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: pass a local checkpoint"):
        convert_checkpoint("clip", tmp_path / "nope")
    folder = _clip_folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs the source folder's config.json"):
        convert_checkpoint("clip", folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No weights in"):
        convert_checkpoint("clip", tmp_path / "empty")


class Payload:
    """Unpickling this would call an arbitrary function; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_with_objects_are_refused(tmp_path, capsys):
    torch.save({"weight": torch.ones(2), "payload": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match=r"Refusing to load .*evil.bin.*safetensors"):
        read_state_dict(tmp_path / "evil.bin")
    assert "unpickled!" not in capsys.readouterr().out
    np.savez(tmp_path / "evil.npz", weights=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"Refusing to load .*evil.npz.*allow_pickle=False"):
        read_state_dict(tmp_path / "evil.npz")


def test_plain_pytorch_files_and_training_checkpoints_load(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    torch.save({"model": state, "epoch_tensor": {"x": torch.tensor(3)}}, tmp_path / "ckpt.pth")
    assert read_state_dict(tmp_path / "ckpt.pth").keys() == state.keys()


# --------------------------------------------------------------------------------------------------------------------
# The command line writes a complete folder


def test_cli_writes_a_complete_folder_with_the_source_preprocessing(tmp_path, pixel_values):
    reference = randomised(CLIPVisionModel(CLIPVisionConfig(**TINY)))
    source = saved(reference, tmp_path)
    preprocessing = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 3}
    (source / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    out = tmp_path / "converted"
    main(["--from", "clip", str(source), "--out", str(out), "--base-model", "openai/clip-vit-base-patch32"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert "modeling_vit.py" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.1, 0.2, 0.3] and processor["image_std"] == [0.4, 0.5, 0.6]
    # CLIP's own processor (the file names no class: the CLIP family's), sized for the 32 px model: shortest edge,
    # then centre crop, not a squash to 32x32
    assert processor["image_processor_type"] == "CLIPImageProcessor" and processor["resample"] == 3
    assert processor["size"] == {"shortest_edge": 32} and processor["crop_size"] == {"height": 32, "width": 32}
    assert processor["do_center_crop"] is True and processor["do_convert_rgb"] is True
    card = (out / "README.md").read_text()
    assert "base_model: openai/clip-vit-base-patch32" in card and "--from clip" in card
    model = AutoModel.from_pretrained(out).eval()
    assert_parity(reference, model, pixel_values)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--from", "clip", str(source), "--out", str(out)])


def test_default_preprocessing_per_source(tmp_path):
    siglip = convert_checkpoint("siglip", saved(randomised(SiglipVisionModel(SiglipVisionConfig(**TINY))), tmp_path))
    # SigLIP's own processor class and defaults (google/siglip-* ship resample 3, bicubic), not ViT's bilinear
    assert type(siglip.image_processor).__name__ == "SiglipImageProcessorPil"
    assert siglip.image_mean == (0.5, 0.5, 0.5) and siglip.resample.name == "BICUBIC"
    clip = convert_checkpoint("clip", _clip_folder(tmp_path / "clip"))
    assert clip.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.resample.name == "BICUBIC"


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_other_resolutions_interpolate_like_transformers(tmp_path, family):
    """Exact parity is required at the native size; at another size both sides interpolate E_pos bicubically
    (transformers' DINOv2 does so whenever the size differs; the original DINOv2 repository's +0.1 offset is not
    reproduced, as transformers does not)."""
    reference = {
        "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**TINY)),
        "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**TINY)),
        "dinov2": lambda: Dinov2Model(Dinov2Config(**TINY)),
    }[family]()
    reference = randomised(reference)
    model = convert_checkpoint(family, saved(reference, tmp_path)).model
    x = torch.randn(1, 3, 48, 40)
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = reference(x, **kwargs).last_hidden_state
        got = model(x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
