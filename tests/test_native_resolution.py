"""The native-resolution form: patchified images of their own grids, padded and masked (transformers' Siglip2
layout), in the image processor and in VisionTransformerModel; and the classic (B, C, H, W) path unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, Siglip2ImageProcessorPil, ViTImageProcessorPil
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    convert_image_to_patches,
    get_image_size_for_max_num_patches,
)

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerConfig, VisionTransformerImageProcessor, VisionTransformerModel
from vlm_vision.encoder.position_embeddings import MAX_RESAMPLE_FACTOR

ATOL = 1e-5
PATCH = 4  # tiny_config: image 32, patch 4 -> an 8 x 8 position table, 48 values per patch
GRIDS = [(8, 8), (4, 12), (10, 3)]  # the table's own grid, a wide one, a tall one (up-sampled rows)
VARIANTS = {
    "cls": {},
    "mean_registers": {"pooling": "mean", "num_register_tokens": 2},
    "map_no_cls": {"use_class_token": False, "pooling": "map"},
    "clip_like": {"pre_norm": True, "final_norm": "pooled", "patch_embedding_bias": False},
}


def build(seed=0, **overrides) -> VisionTransformerModel:
    torch.manual_seed(seed)
    return VisionTransformerModel(tiny_config(**overrides)).eval()


def images_of(grids, seed=1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(3, PATCH * h, PATCH * w) for h, w in grids]


def patchify(images, length=None):
    """(B, length, C*P*P) patches cut by transformers' Siglip2 code, the mask and the grids."""
    grids = [(im.shape[1] // PATCH, im.shape[2] // PATCH) for im in images]
    length = length or max(h * w for h, w in grids)
    pixel_values = torch.zeros(len(images), length, 3 * PATCH * PATCH)
    mask = torch.zeros(len(images), length, dtype=torch.int32)
    for i, image in enumerate(images):
        patches = torch.from_numpy(convert_image_to_patches(image.numpy(), PATCH))
        pixel_values[i, : len(patches)] = patches
        mask[i, : len(patches)] = 1
    return pixel_values, mask, torch.tensor(grids)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_batch_of_three_grids_equals_each_image_alone(variant):
    model = build(**VARIANTS[variant])
    images = images_of(GRIDS)
    pixel_values, mask, shapes = patchify(images)
    out = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    prefix = model.num_prefix_tokens
    assert out.last_hidden_state.shape == (3, prefix + 64, 32)  # padded to the largest image, 8 x 8
    for i, image in enumerate(images):
        count = GRIDS[i][0] * GRIDS[i][1]
        tokens = out.last_hidden_state[i, : prefix + count]
        # alone in the native form (no padding at all) and alone as a classic image of its own size
        single, _, single_shape = patchify([image])
        alone_native = model(single, spatial_shapes=single_shape)
        alone_classic = model(image[None], interpolate_pos_encoding=True)
        for alone in (alone_native, alone_classic):
            torch.testing.assert_close(tokens, alone.last_hidden_state[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_intermediate_layers_honour_the_mask():
    model = build(num_register_tokens=1)
    images = images_of(GRIDS)
    pixel_values, mask, shapes = patchify(images)
    layers = model.get_intermediate_layers(
        pixel_values, [1, -2], pixel_attention_mask=mask, spatial_shapes=shapes, drop_prefix_tokens=True
    )
    blocks = model.forward_intermediates(
        pixel_values, [0, 1], output_fmt="NLC", intermediates_only=True, spatial_shapes=shapes
    )
    torch.testing.assert_close(blocks[0], layers[0], atol=0, rtol=0)  # block 0's output is hidden state 1
    for i, image in enumerate(images):
        count = GRIDS[i][0] * GRIDS[i][1]
        alone = model.get_intermediate_layers(image[None], [1, -2], interpolate_pos_encoding=True)
        for masked, single in zip(layers, alone, strict=True):
            torch.testing.assert_close(masked[i, :count], single[0, 2:], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"output_fmt='NCHW'.*pass output_fmt='NLC'"):
        model.forward_intermediates(pixel_values, spatial_shapes=shapes)


@torch.no_grad()
def test_padded_patches_are_never_attended_to():
    model = build(pooling="mean", num_register_tokens=2).eval()
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    noisy = pixel_values.clone()
    noisy[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), noisy.shape[-1])
    clean_out = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    noisy_out = model(noisy, pixel_attention_mask=mask, spatial_shapes=shapes)
    real = torch.cat([torch.ones(3, model.num_prefix_tokens, dtype=torch.bool), mask.bool()], dim=1)
    torch.testing.assert_close(noisy_out.last_hidden_state[real], clean_out.last_hidden_state[real], atol=0, rtol=0)
    torch.testing.assert_close(noisy_out.pooler_output, clean_out.pooler_output, atol=0, rtol=0)
    # the weights (computed eagerly) put nothing on padded keys, and each query's weights sum to 1
    attentions = model(noisy, pixel_attention_mask=mask, spatial_shapes=shapes, output_attentions=True).attentions
    for weights in attentions:  # (B, heads, T, T)
        for b in range(3):
            assert torch.all(weights[b][:, :, ~real[b]] == 0) and torch.all(weights[b][:, :, real[b]] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@torch.no_grad()
def test_pooled_output_honours_the_mask():
    model = build(pooling="mean")
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    out = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    patches = out.last_hidden_state[:, 1:]
    for i, (h, w) in enumerate(GRIDS):
        torch.testing.assert_close(out.pooler_output[i], patches[i, : h * w].mean(0), atol=1e-6, rtol=0)
    # a plain mean over all rows would differ: the test can tell padding from no padding
    assert not torch.allclose(out.pooler_output[1], patches[1].mean(0), atol=1e-3)


@torch.no_grad()
def test_sdpa_and_eager_agree_on_a_masked_batch():
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    sdpa, eager = build(attn_implementation="sdpa"), build(attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    a = sdpa(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    b = eager(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_mask_is_optional_and_follows_from_the_shapes():
    model = build()
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    with_mask = model(pixel_values, pixel_attention_mask=mask.bool(), spatial_shapes=shapes.tolist())
    without = model(pixel_values, spatial_shapes=shapes)
    torch.testing.assert_close(with_mask.last_hidden_state, without.last_hidden_state, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["cls", "mean_registers", "map"])
def test_a_fixed_size_batch_gives_exactly_the_outputs_of_before(variant):
    # tests/fixtures/make_classic_fixture.py ran the code of 8938217 (before the native form) on these weights
    saved = load_file(Path(__file__).parent / "fixtures" / "classic" / f"{variant}.safetensors")
    overrides = {
        "cls": {},
        "mean_registers": {"pooling": "mean", "num_register_tokens": 2},
        "map": {"use_class_token": False, "pooling": "map"},
    }[variant]
    config = VisionTransformerConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    model = VisionTransformerModel(VisionTransformerConfig(**{**config.to_dict(), **overrides})).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")})
    out = model(saved["pixel_values"], output_hidden_states=True)
    larger = model(saved["larger"], interpolate_pos_encoding=True)
    # bit for bit on the machine that wrote the fixture (checked there); another CPU's kernels may sum in another order
    exact = {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(out.last_hidden_state, saved["last_hidden_state"], **exact)
    torch.testing.assert_close(out.pooler_output, saved["pooler_output"], **exact)
    torch.testing.assert_close(out.hidden_states[-2], saved["hidden_state_minus_2"], **exact)
    torch.testing.assert_close(larger.last_hidden_state, saved["larger_last_hidden_state"], **exact)
    torch.testing.assert_close(larger.pooler_output, saved["larger_pooler_output"], **exact)


# The image processor


def pil_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


SIZES = [(100, 400), (300, 300), (250, 90), (17, 33)]


def test_native_mode_is_siglip2s_preprocessing():
    images = pil_images(SIZES)
    ours = VisionTransformerImageProcessor(patch_size=16, max_num_patches=64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    theirs = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=64)
    a, b = ours(images, return_tensors="pt"), theirs(images, return_tensors="pt")
    assert set(a) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert a["pixel_values"].shape == (4, 64, 768) and a["spatial_shapes"].shape == (4, 2)
    for key in b:
        assert torch.equal(a[key], b[key]), key
    for (h, w), (rows, cols), mask in zip(SIZES, a["spatial_shapes"].tolist(), a["pixel_attention_mask"], strict=True):
        assert (rows * 16, cols * 16) == get_image_size_for_max_num_patches(h, w, 16, 64)
        assert rows * cols <= 64 and int(mask.sum()) == rows * cols and bool(mask[: rows * cols].all())
        # the largest such size: one more row or column of the same aspect would not fit
        assert (rows + 1) * (cols + 1) > 64
    assert a["spatial_shapes"].tolist()[0] == [4, 16]  # 1:4 kept


def test_classic_mode_is_vits_preprocessing():
    images = pil_images(SIZES)
    ours = VisionTransformerImageProcessor(size={"height": 32, "width": 32})
    theirs = ViTImageProcessorPil(size={"height": 32, "width": 32})
    a, b = ours(images, return_tensors="pt"), theirs(images, return_tensors="pt")
    assert set(a) == {"pixel_values"} and a["pixel_values"].shape == (4, 3, 32, 32)
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_native_mode_round_trips_through_auto_image_processor(tmp_path):
    VisionTransformerImageProcessor(patch_size=4, max_num_patches=40).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VisionTransformerImageProcessor
    assert (loaded.patch_size, loaded.max_num_patches) == (4, 40)


@torch.no_grad()
def test_processor_output_runs_through_the_model_per_image_as_alone():
    model = build()
    processor = VisionTransformerImageProcessor(patch_size=PATCH, max_num_patches=96)
    images = pil_images([(40, 160), (90, 60), (32, 32)])
    batch = processor(images, return_tensors="pt")
    out = model(**batch)
    for i, (rows, cols) in enumerate(batch["spatial_shapes"].tolist()):
        resized = images[i].resize((cols * PATCH, rows * PATCH), Image.BILINEAR)
        classic = VisionTransformerImageProcessor(size={"height": rows * PATCH, "width": cols * PATCH})
        alone = model(**classic(resized, return_tensors="pt"), interpolate_pos_encoding=True)
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], atol=ATOL, rtol=0)


# Bad input: each names the problem and the fix


def test_max_num_patches_below_one_patch_row_is_refused():
    processor = VisionTransformerImageProcessor(patch_size=16, max_num_patches=3)
    with pytest.raises(ValueError, match=r"max_num_patches=3 is below one patch row of image 0 \(100x400.*at least 4 "):
        processor(pil_images([(100, 400)]))
    assert processor(pil_images([(100, 100)]), return_tensors="pt")["spatial_shapes"].tolist() == [[1, 1]]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"max_num_patches must be an int >= 1.*None selects the classic"):
            VisionTransformerImageProcessor(max_num_patches=bad)
    with pytest.raises(ValueError, match=r"max_num_patches must be an int >= 1"):
        VisionTransformerImageProcessor()(pil_images([(32, 32)]), max_num_patches=0)
    with pytest.raises(ValueError, match=r"does not centre-crop or pad.*do_center_crop=False"):
        VisionTransformerImageProcessor(max_num_patches=4, do_center_crop=True, crop_size=8)(pil_images([(32, 32)]))


@torch.no_grad()
def test_a_grid_beyond_the_tables_resampling_is_refused():
    model = build()  # 8 x 8 table: up to 8 * MAX_RESAMPLE_FACTOR patches per side
    limit = 8 * MAX_RESAMPLE_FACTOR
    pixel_values = torch.zeros(1, limit + 1, 48)
    with pytest.raises(ValueError, match=rf"more than {MAX_RESAMPLE_FACTOR}x.*allowed grids are 1..{limit} rows"):
        model(pixel_values, spatial_shapes=[[1, limit + 1]])
    assert model(pixel_values[:, :limit], spatial_shapes=[[1, limit]]).last_hidden_state.shape == (1, 1 + limit, 32)


@torch.no_grad()
def test_a_mask_that_does_not_match_the_patch_count_is_refused():
    model = build()
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    short = mask.clone()
    short[1, 47] = 0
    with pytest.raises(ValueError, match=r"pixel_attention_mask\[1\] marks 47 valid patches.*\(4, 12\) holds 48"):
        model(pixel_values, pixel_attention_mask=short, spatial_shapes=shapes)
    with pytest.raises(ValueError, match=r"must be a \(batch, patches\) = \(3, 64\) tensor.*got \(3, 63\)"):
        model(pixel_values, pixel_attention_mask=mask[:, :63], spatial_shapes=shapes)
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\] = \(9, 8\) does not fit the 64 patch rows"):
        model(pixel_values, pixel_attention_mask=mask, spatial_shapes=[[9, 8], [4, 12], [10, 3]])
    with pytest.raises(ValueError, match=r"spatial_shapes must be integers of shape \(batch, 2\) = \(3, 2\)"):
        model(pixel_values, spatial_shapes=shapes[:2])


@torch.no_grad()
def test_spatial_shapes_missing_is_refused():
    model = build()
    pixel_values, mask, _ = patchify(images_of(GRIDS))
    with pytest.raises(ValueError, match=r"must be 4-D .*\(3, 64, 48\).*need spatial_shapes \(batch, 2\)"):
        model(pixel_values)
    with pytest.raises(ValueError, match=r"pixel_attention_mask was given without spatial_shapes.*Pass spatial_shapes"):
        model(pixel_values, pixel_attention_mask=mask)


@torch.no_grad()
def test_a_mask_in_a_mode_the_model_cannot_honour_is_refused():
    model = build()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"go with patchified pixel_values.*got pixel_values \(2, 3, 32, 32\)"):
        model(images, pixel_attention_mask=torch.ones(2, 64), spatial_shapes=[[8, 8], [8, 8]])
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention' cannot take.*'sdpa'"):
        model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    # without padding there is nothing to mask: any implementation is fine
    full = patchify(images_of([(8, 8), (8, 8)]))
    assert model(full[0], spatial_shapes=full[2]).last_hidden_state.shape == (2, 65, 32)
    backbone = {"layer_type": "bottleneck", "depths": [1, 1, 1], "hidden_sizes": [16, 32, 64, 128]}
    backbone.update(embedding_size=8, num_groups=4, global_padding="SAME", out_features=["stage3"])
    hybrid = VisionTransformerModel(tiny_config(image_size=64, patch_size=16, backbone_config=backbone))
    with pytest.raises(ValueError, match=r"hybrid ViT.*needs whole.*max_num_patches=None"):
        hybrid(torch.zeros(1, 16, 768), spatial_shapes=[[4, 4]])
    with pytest.raises(ValueError, match=r"48 values per patch, but this model's patches hold .* = 12.*patch_size=2"):
        build(patch_size=2)(pixel_values, spatial_shapes=shapes)


@torch.no_grad()
def test_the_classifier_pools_with_the_mask():
    from vlm_vision import VisionTransformerForImageClassification

    torch.manual_seed(0)
    model = VisionTransformerForImageClassification(tiny_config(pooling="mean", num_labels=3)).eval()
    torch.nn.init.normal_(model.classifier.weight)  # zero-initialised: make the logits say something
    images = images_of(GRIDS)
    pixel_values, mask, shapes = patchify(images)
    logits = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes).logits
    for i, image in enumerate(images):
        alone = model(image[None], interpolate_pos_encoding=True).logits[0]
        torch.testing.assert_close(logits[i], alone, atol=ATOL, rtol=0)


def test_a_masked_batch_trains_with_checkpointing_as_without():
    # the mask reaches every block also through activation checkpointing; padding gets no gradient
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    pixel_values.requires_grad_(True)
    results = []
    for checkpointing in (False, True):
        model = build(pooling="mean").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        pixel_values.grad = None
        out = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        out.pooler_output.pow(2).sum().backward()
        results.append((out.pooler_output.detach(), pixel_values.grad.clone()))
    (pooled_a, grad_a), (pooled_b, grad_b) = results
    torch.testing.assert_close(pooled_a, pooled_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert torch.all(grad_a[mask == 0] == 0) and bool(grad_a[mask == 1].abs().sum() > 0)


@torch.no_grad()
def test_a_masked_batch_in_bfloat16_and_under_autocast():
    model = build(pre_norm=True, final_norm="pooled")
    pixel_values, mask, shapes = patchify(images_of(GRIDS))
    reference = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
    half = model.to(torch.bfloat16)(pixel_values.bfloat16(), pixel_attention_mask=mask, spatial_shapes=shapes)
    assert half.pooler_output.dtype == torch.bfloat16
    for got in (autocast, half.pooler_output):
        torch.testing.assert_close(got.float(), reference, atol=0.05, rtol=0.05)


def test_without_resizing_images_must_already_fit():
    processor = VisionTransformerImageProcessor(patch_size=4, max_num_patches=12, do_resize=False)
    batch = processor(pil_images([(8, 24), (12, 4)]), return_tensors="pt")
    assert batch["spatial_shapes"].tolist() == [[2, 6], [3, 1]] and batch["pixel_values"].shape == (2, 12, 48)
    with pytest.raises(ValueError, match=r"Image 0 is 10x24 pixels and do_resize=False.*Set do_resize=True"):
        processor(pil_images([(10, 24)]))
    with pytest.raises(ValueError, match=r"at most max_num_patches=12 patches"):
        processor(pil_images([(16, 16)]))
