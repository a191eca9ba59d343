"""Packed native resolution (NaViT's "patch n' pack"): several images' patches in one tower row, each image with its
own prefix tokens and position embeddings, attending only within itself (`patch_image_ids`); the image processor's
`pack_images=True`; per-image outputs the same as each image alone."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from tests.conftest import tiny_config
from tests.test_native_resolution import GRIDS, PATCH, VARIANTS, build, images_of, pil_images
from vlm_vision import VisionTransformerImageProcessor, VisionTransformerModel
from vlm_vision.encoder.image_processing_vit import pack_first_fit
from vlm_vision.encoder.modeling_vit import PackedLayout

ATOL = 1e-5


def pack(images, rows: list[list[int]], length: int):
    """pixel_values (R, length, C*P*P), patch_image_ids (R, length) and spatial_shapes (I, 2) with `rows[r]` the
    images of row r, in order, then padding."""
    grids = [(im.shape[1] // PATCH, im.shape[2] // PATCH) for im in images]
    pixel_values = torch.zeros(len(rows), length, 3 * PATCH * PATCH)
    ids = torch.full((len(rows), length), -1)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            patches = torch.from_numpy(convert_image_to_patches(images[i].numpy(), PATCH))
            pixel_values[r, start : start + len(patches)] = patches
            ids[r, start : start + len(patches)] = i
            start += len(patches)
    return pixel_values, ids, torch.tensor(grids)


ONE_ROW = [[0, 1, 2]]  # 64 + 48 + 30 patches in one row of 150 slots: 8 of them padding
LENGTH = sum(h * w for h, w in GRIDS) + 8


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_packed_row_of_three_grids_gives_each_image_as_alone(variant, implementation):
    model = build(**VARIANTS[variant], attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    images = images_of(GRIDS)
    pixel_values, ids, shapes = pack(images, ONE_ROW, LENGTH)
    out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
    prefix = model.num_prefix_tokens
    assert out.last_hidden_state.shape == (1, LENGTH + 3 * prefix, 32) and out.pooler_output.shape == (3, 32)
    tokens = model.unpack_image_tokens(out.last_hidden_state, ids, shapes)
    middle = model.get_intermediate_layers(pixel_values, [2], spatial_shapes=shapes, patch_image_ids=ids)[0]
    middle = model.unpack_image_tokens(middle, ids, shapes)
    for i, image in enumerate(images):
        alone = model(image[None], interpolate_pos_encoding=True, output_hidden_states=True)
        assert tokens[i].shape == (prefix + GRIDS[i][0] * GRIDS[i][1], 32)
        torch.testing.assert_close(tokens[i], alone.last_hidden_state[0], atol=ATOL, rtol=0)  # [CLS] and patches
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(middle[i], alone.hidden_states[2][0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_packed_batch_of_several_rows_with_trailing_padding():
    model = build(pooling="mean", num_register_tokens=2)
    grids = [(8, 8), (4, 12), (10, 3), (2, 5), (6, 6), (3, 3)]
    images = images_of(grids, seed=3)
    rows = pack_first_fit([h * w for h, w in grids], 80)
    assert rows == [[0, 3], [1, 2], [4, 5]]  # 64 + 10, 48 + 30, 36 + 9 of 80 slots
    pixel_values, ids, shapes = pack(images, rows, 80)
    assert bool((ids == -1).any(dim=1).all())  # every row ends in padding
    out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, output_hidden_states=True)
    tokens = model.unpack_image_tokens(out.last_hidden_state, ids, shapes)
    second = model.unpack_image_tokens(out.hidden_states[-2], ids, shapes)
    patches = model.get_intermediate_layers(
        pixel_values, -2, spatial_shapes=shapes, patch_image_ids=ids, drop_prefix_tokens=True
    )[0]
    assert patches.shape == (len(rows), 80, 32)  # each patch token back at its input slot
    for i, image in enumerate(images):
        alone = model(image[None], interpolate_pos_encoding=True, output_hidden_states=True)
        torch.testing.assert_close(tokens[i], alone.last_hidden_state[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(second[i], alone.hidden_states[-2][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(patches[ids == i], alone.hidden_states[-2][0, 3:], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], atol=ATOL, rtol=0)
    # the padding is never attended to: noise there changes no image's tokens
    noisy = pixel_values.clone()
    noisy[ids == -1] = 100 * torch.randn(int((ids == -1).sum()), noisy.shape[-1])
    noisy_out = model(noisy, spatial_shapes=shapes, patch_image_ids=ids)
    for clean, dirty in zip(tokens, model.unpack_image_tokens(noisy_out.last_hidden_state, ids, shapes), strict=True):
        torch.testing.assert_close(dirty, clean, atol=0, rtol=0)
    torch.testing.assert_close(noisy_out.pooler_output, out.pooler_output, atol=0, rtol=0)


@torch.no_grad()
def test_attention_weights_are_block_diagonal():
    model = build(num_register_tokens=1, attn_implementation="eager")
    pixel_values, ids, shapes = pack(images_of(GRIDS), ONE_ROW, LENGTH)
    out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, output_attentions=True)
    layout = model.packed_layout(ids, shapes)
    segments = layout.segment_ids[0]
    same = segments[:, None] == segments[None, :]
    for weights in out.attentions:  # (1, heads, T, T)
        assert torch.all(weights[0][:, ~same] == 0) and torch.all(weights[0][:, same] > 0)
        padding = segments < 0  # padding attends only to itself, and nothing attends to it
        assert torch.all(weights[0][:, :, padding][:, ~padding] == 0)


def test_gradients_of_a_packed_row_equal_the_sum_over_images_alone():
    images = images_of(GRIDS)
    pixel_values, ids, shapes = pack(images, ONE_ROW, LENGTH)

    def loss_of(out, i):  # a loss that reads every token and the pooled vector
        return out.pooler_output[i].pow(2).sum() + out.tokens[i].sin().sum()

    grads = []
    for checkpointing in (False, True):
        model = build(pooling="mean", num_register_tokens=1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
        out.tokens = model.unpack_image_tokens(out.last_hidden_state, ids, shapes)
        sum(loss_of(out, i) for i in range(3)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model = build(pooling="mean", num_register_tokens=1).train()
    for image in images:
        out = model(image[None], interpolate_pos_encoding=True)
        out.tokens = [out.last_hidden_state[0]]
        loss_of(out, 0).backward()  # accumulates over the images
    alone = {n: p.grad for n, p in model.named_parameters()}
    assert alone["embeddings.register_tokens"].abs().sum() > 0
    for packed in grads:
        assert set(packed) == set(alone)
        for name, grad in alone.items():
            torch.testing.assert_close(packed[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@torch.no_grad()
def test_the_image_processor_packs_first_fit_and_the_model_matches_the_padded_form():
    model = build(num_register_tokens=1)
    images = pil_images([(40, 160), (90, 60), (32, 32), (17, 33), (64, 20), (50, 50)])
    padded = VisionTransformerImageProcessor(patch_size=PATCH, max_num_patches=96)(images, return_tensors="pt")
    processor = VisionTransformerImageProcessor(
        patch_size=PATCH, max_num_patches=96, pack_images=True, max_packed_length=192
    )
    packed = processor(images, return_tensors="pt")
    assert set(packed) == {"pixel_values", "patch_image_ids", "spatial_shapes"}
    assert torch.equal(packed["spatial_shapes"], padded["spatial_shapes"])
    counts = [h * w for h, w in packed["spatial_shapes"].tolist()]
    rows = pack_first_fit(counts, 192)
    longest = max(sum(counts[i] for i in members) for members in rows)
    assert packed["pixel_values"].shape == (len(rows), longest, 48) and len(rows) < len(images) and longest <= 192
    for r, members in enumerate(rows):
        expected = torch.cat([torch.full((counts[i],), i) for i in members])
        assert torch.equal(packed["patch_image_ids"][r, : len(expected)], expected)
        assert bool((packed["patch_image_ids"][r, len(expected) :] == -1).all())
    for i, count in enumerate(counts):  # the same patches as the padded form
        torch.testing.assert_close(
            packed["pixel_values"][packed["patch_image_ids"] == i], padded["pixel_values"][i, :count], atol=0, rtol=0
        )
    a, b = model(**packed), model(**padded)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=ATOL, rtol=0)
    for i, tokens in enumerate(
        model.unpack_image_tokens(a.last_hidden_state, packed["patch_image_ids"], packed["spatial_shapes"])
    ):
        torch.testing.assert_close(tokens, b.last_hidden_state[i, : 2 + counts[i]], atol=ATOL, rtol=0)
    default = VisionTransformerImageProcessor(patch_size=PATCH, max_num_patches=96, pack_images=True)
    assert default(images, return_tensors="pt")["pixel_values"].shape[1] <= 96  # rows of max_num_patches at most
    one_row = processor(images, max_packed_length=sum(counts), return_tensors="pt")
    assert one_row["pixel_values"].shape == (1, sum(counts), 48) and bool((one_row["patch_image_ids"] >= 0).all())


def test_the_packing_options_round_trip_through_auto_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    options = {"patch_size": 4, "max_num_patches": 40, "pack_images": True, "max_packed_length": 80}
    VisionTransformerImageProcessor(**options).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VisionTransformerImageProcessor
    assert {name: getattr(loaded, name) for name in options} == options


def test_first_fit():
    assert pack_first_fit([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_first_fit([8, 1], 8) == [[0], [1]]
    assert pack_first_fit([], 8) == []


@torch.no_grad()
def test_the_classifier_gives_one_logit_row_per_packed_image():
    from vlm_vision import VisionTransformerForImageClassification

    torch.manual_seed(0)
    model = VisionTransformerForImageClassification(tiny_config(num_labels=3)).eval()
    torch.nn.init.normal_(model.classifier.weight)
    images = images_of(GRIDS)
    pixel_values, ids, shapes = pack(images, ONE_ROW, LENGTH)
    logits = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids).logits
    assert logits.shape == (3, 3)
    for i, image in enumerate(images):
        torch.testing.assert_close(
            logits[i], model(image[None], interpolate_pos_encoding=True).logits[0], atol=ATOL, rtol=0
        )


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A stand-in for transformers' flash_attention_forward on its varlen path (no kernel here): refuses a mask,
    flattens (B, heads, T, d) to (B * T, heads, d) as `_flash_attention_forward` does, and attends within each
    `cu_seq_lens_q` sequence only."""
    assert attention_mask is None, "the varlen path takes no mask"
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert torch.equal(cu, kwargs["cu_seq_lens_k"]) and cu.dtype == torch.int32 and isinstance(longest, int)
    assert longest == int(cu.diff().max()) and int(cu[-1]) == query.shape[0] * query.shape[2]
    batch, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(-1, heads, dim) for x in (query, key, value))
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (heads, n, d)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scaling).transpose(0, 1)
    return out.view(batch, length, heads, dim), None


@torch.no_grad()
def test_flash_attention_gets_varlen_kwargs_and_no_mask(monkeypatch):
    # No GPU or flash_attn here: a stand-in kernel checks what the model passes (the kwargs, not the kernel).
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", _varlen_attention)
    model = build(num_register_tokens=1)
    images = images_of(GRIDS)
    pixel_values, ids, shapes = pack(images, [[0], [1, 2]], 80)
    reference = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
    layout = model.packed_layout(ids, shapes)
    kwargs = layout.flash_attention_kwargs("cpu")
    # row 0: image 0 (2 + 64 tokens) then its padding; row 1: image 1 (2 + 48), image 2 (2 + 30), padding
    tokens = layout.num_tokens
    assert tokens == 80 + 2 * 2
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 66, tokens, tokens + 50, tokens + 82, 2 * tokens]
    model.config._attn_implementation = "flash_attention_2"
    out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
    for a, b in zip(
        model.unpack_image_tokens(out.last_hidden_state, ids, shapes),
        model.unpack_image_tokens(reference.last_hidden_state, ids, shapes),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, reference.pooler_output, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"output_attentions=True.*flash-attention varlen.*'eager'"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, output_attentions=True)


def test_sdpa_runs_each_image_alone_without_a_mask(monkeypatch):
    """Under sdpa a packed batch builds no (R, 1, T, T) mask: each image's segment is attended alone, the images of
    one token count in one sdpa call, and the rows (padding included), the pooled vectors and the gradients are
    eager's under the block-diagonal mask."""
    grids = [(8, 8), (4, 12), (8, 8), (2, 5), (6, 6), (8, 8)]  # 64 patches three times: one call for the three
    images = images_of(grids, seed=5)
    rows = pack_first_fit([h * w for h, w in grids], 80)
    pixel_values, ids, shapes = pack(images, rows, 80)
    assert bool((ids == -1).any())
    results = {}
    for implementation in ("eager", "sdpa"):
        model = build(num_register_tokens=1, attn_implementation=implementation).train()
        out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
        (out.last_hidden_state.sin().sum() + out.pooler_output.pow(2).sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[implementation] = out.last_hidden_state.detach(), out.pooler_output.detach(), grads
    (rows_e, pooled_e, grads_e), (rows_s, pooled_s, grads_s) = results["eager"], results["sdpa"]
    torch.testing.assert_close(rows_s, rows_e, atol=ATOL, rtol=0)  # every token, the padding's too
    torch.testing.assert_close(pooled_s, pooled_e, atol=ATOL, rtol=0)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_s[name], grad, atol=1e-4, rtol=1e-4, msg=name)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(query, key, value, **kwargs):
        assert kwargs.get("attn_mask") is None
        calls.append(tuple(query.shape))
        return sdpa(query, key, value, **kwargs)

    def no_mask(*args, **kwargs):
        raise AssertionError("sdpa built the block-diagonal mask")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(PackedLayout, "attention_mask", no_mask)
    model = build(num_register_tokens=1)
    with torch.no_grad():
        out = model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
        middle = model.get_intermediate_layers(pixel_values, -2, spatial_shapes=shapes, patch_image_ids=ids)[0]
    torch.testing.assert_close(out.last_hidden_state, rows_e, atol=ATOL, rtol=0)  # eval: no dropout in either
    config, prefix = model.config, model.num_prefix_tokens
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    per_layer = sorted({(grids.count(g), heads, prefix + g[0] * g[1], head_dim) for g in grids})  # one per length
    layers = config.num_hidden_layers
    assert sorted(calls) == sorted(per_layer * layers + per_layer * (layers - 1))
    assert middle.shape == out.last_hidden_state.shape


# Bad input: each names the problem and the fix


@torch.no_grad()
def test_ids_that_do_not_match_the_patch_count_are_refused():
    model = build()
    pixel_values, ids, shapes = pack(images_of(GRIDS), ONE_ROW, LENGTH)
    short = ids.clone()
    short[0, 64 + 47] = -1
    with pytest.raises(ValueError, match=r"padding \(-1\) before image 2.*images first, then its padding"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=short)
    fewer = ids.clone()
    fewer[0, 64 + 47] = 2  # image 1 loses a patch to image 2
    with pytest.raises(ValueError, match=r"marks 47 patches of image 1, but spatial_shapes\[1\] = \(4, 12\) holds 48"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=fewer)
    split = ids.clone()
    split[0, 10] = 1
    with pytest.raises(ValueError, match=r"Image 0's patches are split.*one contiguous run in one row"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=split)
    with pytest.raises(ValueError, match=r"holds 3, but spatial_shapes has 3 images: ids are 0..2"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids.masked_fill(ids == 2, 3))
    with pytest.raises(ValueError, match=r"no patch of image\(s\) \[3\]"):
        model(pixel_values, spatial_shapes=[*GRIDS, (2, 2)], patch_image_ids=ids)
    with pytest.raises(ValueError, match=r"patch_image_ids must have the shape \(rows, patches\) = \(1, 150\)"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids[:, :-1])
    with pytest.raises(ValueError, match=r"patch_image_ids must hold integers"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids.float())
    with pytest.raises(ValueError, match=r"pixel_attention_mask does not match patch_image_ids"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, pixel_attention_mask=torch.ones(1, LENGTH))
    consistent = (ids >= 0).long()  # a mask that agrees with the ids is accepted
    assert model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, pixel_attention_mask=consistent) is not None
    with pytest.raises(ValueError, match=r"patch_image_ids was given without spatial_shapes"):
        model(pixel_values, patch_image_ids=ids)
    with pytest.raises(ValueError, match=r"takes the packed token rows .* = \(1, 153\).*got \(1, 150, 32\)"):
        model.unpack_image_tokens(torch.zeros(1, 150, 32), ids, shapes)


@torch.no_grad()
def test_a_segment_longer_than_the_row_is_refused():
    model = build()
    pixel_values, ids, _ = pack(images_of([(4, 4)]), [[0]], 16)
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\] = \(4, 5\) does not fit the 16 patch rows"):
        model(pixel_values, spatial_shapes=[[4, 5]], patch_image_ids=ids)
    processor = VisionTransformerImageProcessor(patch_size=PATCH, max_num_patches=96, pack_images=True)
    with pytest.raises(ValueError, match=r"max_packed_length must be an int >= max_num_patches=96.*largest image"):
        processor(pil_images([(32, 32)]), max_packed_length=95)


@torch.no_grad()
def test_packing_a_tower_that_cannot_honour_it_is_refused():
    pixel_values, ids, shapes = pack(images_of(GRIDS), ONE_ROW, LENGTH)
    model = build()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"'flex_attention' cannot keep packed images apart.*'sdpa'.*pack_images"):
        model(pixel_values, spatial_shapes=shapes, patch_image_ids=ids)
    backbone = {"layer_type": "bottleneck", "depths": [1, 1, 1], "hidden_sizes": [16, 32, 64, 128]}
    backbone.update(embedding_size=8, num_groups=4, global_padding="SAME", out_features=["stage3"])
    hybrid = VisionTransformerModel(tiny_config(image_size=64, patch_size=16, backbone_config=backbone))
    with pytest.raises(ValueError, match=r"hybrid ViT.*cannot take patchified, packed images"):
        hybrid(torch.zeros(1, 16, 768), spatial_shapes=[[4, 4]], patch_image_ids=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"forward_intermediates does not take packed images.*get_intermediate_layers"):
        build().forward_intermediates(pixel_values, spatial_shapes=shapes, patch_image_ids=ids, output_fmt="NLC")


@torch.no_grad()
def test_packing_classic_images_is_refused():
    model = build()
    with pytest.raises(
        ValueError, match=r"\(batch, channels, height, width\) images cannot be packed.*pack_images=True"
    ):
        model(torch.randn(2, 3, 32, 32), spatial_shapes=[[8, 8], [8, 8]], patch_image_ids=torch.zeros(2, 64))
    for options, message in [
        ({"pack_images": True}, r"only the native-resolution mode makes: set max_num_patches"),
        ({"max_num_patches": 16, "max_packed_length": 32}, r"max_packed_length=32 sizes packed rows: set pack_images"),
        ({"max_num_patches": 16, "pack_images": "yes"}, r"pack_images must be True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            VisionTransformerImageProcessor(**options)


# The classic and padded forms are untouched: bit for bit the code this branch started from

REFERENCE_COMMIT = "7302507"  # main before packing (the fork point of this work)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_classic_and_padded_inputs_give_exactly_the_outputs_of_the_code_before_packing(variant, tmp_path):
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import TINY
    from tests.test_native_resolution import patchify
    from vlm_vision import VisionTransformerConfig

    root = Path(__file__).resolve().parents[1]
    package = tmp_path / "reference_encoder"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_vit", "modeling_vit", "position_embeddings"):
        shown = subprocess.run(
            ["git", "show", f"{REFERENCE_COMMIT}:vlm_vision/encoder/{name}.py"], cwd=root, capture_output=True
        )
        if shown.returncode:
            pytest.skip(f"git history with {REFERENCE_COMMIT} is not available here")
        (package / f"{name}.py").write_bytes(shown.stdout)
    sys.path.insert(0, str(tmp_path))
    try:
        old = importlib.import_module("reference_encoder.modeling_vit")
    finally:
        sys.path.remove(str(tmp_path))
    for implementation in ("sdpa", "eager"):
        options = {**TINY, **VARIANTS[variant], "attn_implementation": implementation}
        torch.manual_seed(0)
        new_model = VisionTransformerModel(VisionTransformerConfig(**options)).eval()
        old_model = old.VisionTransformerModel(old.VisionTransformerConfig(**options)).eval()
        old_model.load_state_dict(new_model.state_dict())
        torch.manual_seed(1)
        pixel_values, mask, shapes = patchify(images_of(GRIDS))
        for args, kwargs in [
            ((torch.randn(2, 3, 32, 32),), {}),
            ((torch.randn(2, 3, 40, 24),), {"interpolate_pos_encoding": True}),
            ((pixel_values,), {"pixel_attention_mask": mask, "spatial_shapes": shapes}),
        ]:
            a = new_model(*args, **kwargs, output_hidden_states=True)
            b = old_model(*args, **kwargs, output_hidden_states=True)
            assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(
                a.pooler_output, b.pooler_output
            )
            assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))
            layers = [new_model, old_model]
            a, b = (m.get_intermediate_layers(*args, [1, -2], **kwargs, drop_prefix_tokens=True) for m in layers)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
