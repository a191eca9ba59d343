"""Closed-form checks of the Figure 7 analyses and attention rollout (`vlm_vision.analysis.measures`)."""

import itertools
import math

import pytest
import torch

from vlm_vision.analysis.measures import (
    attention_rollout,
    attention_rollout_map,
    mean_attention_distance,
    patch_embedding_principal_components,
    patch_grid_coordinates,
    position_embedding_similarity,
)


def identity_attention(layers, batch, heads, tokens):
    return torch.eye(tokens).expand(layers, batch, heads, tokens, tokens).clone()  # (L, B, H, T, T)


def uniform_attention(layers, batch, heads, tokens):
    return torch.full((layers, batch, heads, tokens, tokens), 1.0 / tokens)


def random_attention(layers, batch, heads, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, batch, heads, tokens, tokens, generator=generator).softmax(dim=-1)


def brute_force_mean_pairwise_distance(grid_h, grid_w, patch_h, patch_w):
    """Mean distance over all ordered (query, key) patch pairs, self-pairs included, in pixels: pure Python."""
    centres = [((i + 0.5) * patch_h, (j + 0.5) * patch_w) for i in range(grid_h) for j in range(grid_w)]
    total = sum(math.dist(q, k) for q in centres for k in centres)
    return total / len(centres) ** 2


# --- patch_grid_coordinates -------------------------------------------------------------------------------------------


def test_patch_grid_coordinates_row_major_pixel_centres():
    coordinates = patch_grid_coordinates((2, 3), (4, 10))
    expected = [[2.0, 5.0], [2.0, 15.0], [2.0, 25.0], [6.0, 5.0], [6.0, 15.0], [6.0, 25.0]]
    assert coordinates.dtype == torch.float32
    torch.testing.assert_close(coordinates, torch.tensor(expected))


# --- mean_attention_distance ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 5])
def test_identity_attention_has_zero_distance(num_prefix_tokens):
    tokens = num_prefix_tokens + 3 * 4
    distance = mean_attention_distance(identity_attention(3, 2, 4, tokens), (3, 4), 16, num_prefix_tokens)
    assert distance.shape == (3, 4)
    assert torch.equal(distance, torch.zeros(3, 4))


@pytest.mark.parametrize(
    ("grid", "patch", "num_prefix_tokens"),
    [((4, 4), 16, 0), ((3, 5), 8, 0), ((3, 5), (4, 6), 1), ((5, 3), 16, 4)],
)
def test_uniform_attention_gives_mean_pairwise_patch_distance(grid, patch, num_prefix_tokens):
    # uniform over all T tokens, prefix included: after dropping the prefix and renormalising, uniform over patches
    tokens = num_prefix_tokens + grid[0] * grid[1]
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    expected = brute_force_mean_pairwise_distance(*grid, patch_h, patch_w)
    distance = mean_attention_distance(uniform_attention(2, 3, 2, tokens), grid, patch, num_prefix_tokens)
    torch.testing.assert_close(distance, torch.full((2, 2), expected))


def test_attention_on_one_key_patch_gives_mean_distance_to_it():
    # grid 2x3, patch 10, every query attends only to patch (0, 0); distances in patches from each centre to it:
    # (0,0): 0, (0,1): 1, (0,2): 2, (1,0): 1, (1,1): sqrt(2), (1,2): sqrt(5)
    attention = torch.zeros(1, 1, 1, 7, 7)
    attention[..., 1] = 1.0  # key token 1 = patch (0, 0), after [CLS]
    expected = 10 * (0 + 1 + 2 + 1 + math.sqrt(2) + math.sqrt(5)) / 6
    distance = mean_attention_distance(attention, (2, 3), 10)
    torch.testing.assert_close(distance, torch.tensor([[expected]]))


def test_tensor_and_list_inputs_agree_and_low_precision_is_computed_in_fp32():
    attention = random_attention(3, 2, 4, 1 + 12)
    from_tensor = mean_attention_distance(attention, (3, 4), 16)
    from_list = mean_attention_distance(tuple(attention.unbind(0)), (3, 4), 16)
    from_bf16 = mean_attention_distance([layer.bfloat16() for layer in attention], (3, 4), 16)
    torch.testing.assert_close(from_tensor, from_list, rtol=0, atol=0)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, from_tensor, rtol=1e-2, atol=1e-2)


def test_averages_over_images_and_keeps_heads_apart():
    uniform_value = brute_force_mean_pairwise_distance(3, 3, 16, 16)
    attention = identity_attention(2, 2, 2, 10)
    attention[:, 1, 1] = 1.0 / 10  # image 1, head 1: uniform; everything else attends to itself
    distance = mean_attention_distance(attention, (3, 3), 16)
    torch.testing.assert_close(distance, torch.tensor([[0.0, uniform_value / 2]] * 2))


def test_query_attending_only_to_prefix_tokens_contributes_zero():
    attention = torch.zeros(1, 1, 1, 5, 5)
    attention[..., 0] = 1.0  # every query on [CLS]: no patch weight to measure
    distance = mean_attention_distance(attention, (2, 2), 16)
    assert torch.equal(distance, torch.zeros(1, 1))


# --- position_embedding_similarity ------------------------------------------------------------------------------------


def test_position_embedding_similarity_diagonal_one_symmetric_and_prefix_dropped():
    embeddings = torch.randn(1, 2 + 3 * 5, 8, generator=torch.Generator().manual_seed(0))
    similarity = position_embedding_similarity(embeddings, (3, 5), num_prefix_tokens=2)
    assert similarity.shape == (3, 5, 3, 5)
    flat = similarity.reshape(15, 15)
    torch.testing.assert_close(flat.diagonal(), torch.ones(15))
    torch.testing.assert_close(similarity, similarity.permute(2, 3, 0, 1))
    patches = embeddings[0, 2:]
    torch.testing.assert_close(flat[4, 9], torch.cosine_similarity(patches[4], patches[9], dim=0))
    torch.testing.assert_close(
        position_embedding_similarity(embeddings[0].half(), (3, 5), 2), similarity, atol=2e-3, rtol=0
    )


def test_one_hot_position_embeddings_are_only_similar_to_themselves():
    similarity = position_embedding_similarity(torch.eye(1 + 6)[:, :], (2, 3))  # row 0 = [CLS], dropped
    for i, j in itertools.product(range(2), range(3)):
        expected = torch.zeros(2, 3)
        expected[i, j] = 1.0
        torch.testing.assert_close(similarity[i, j], expected)


def test_smooth_2d_position_embeddings_give_the_closed_form_similarity():
    # e(i, j) = [cos a*i, sin a*i, cos a*j, sin a*j] / sqrt(2)  =>  cos-sim = (cos a(i-k) + cos a(j-l)) / 2
    grid_h, grid_w, a = 4, 6, math.pi / 8
    rows, cols = torch.meshgrid(torch.arange(grid_h) * a, torch.arange(grid_w) * a, indexing="ij")
    embeddings = torch.stack([rows.cos(), rows.sin(), cols.cos(), cols.sin()], dim=-1).reshape(-1, 4)
    similarity = position_embedding_similarity(embeddings, (grid_h, grid_w), num_prefix_tokens=0)
    for i, j, k, m in itertools.product(range(grid_h), range(grid_w), range(grid_h), range(grid_w)):
        expected = (math.cos(a * (i - k)) + math.cos(a * (j - m))) / 2
        assert similarity[i, j, k, m].item() == pytest.approx(expected, abs=1e-6)
    centre = similarity[1, 2]
    assert divmod(int(centre.argmax()), grid_w) == (1, 2)
    assert centre[1, 3] > centre[1, 5] and centre[2, 2] > centre[3, 2]  # neighbours beat far patches


# --- patch_embedding_principal_components -----------------------------------------------------------------------------


def two_direction_filters(hidden_size=64, channels=3, patch=4, seed=0):
    """Filters = mean filter + 3*a*u1 + b*u2 + tiny noise, u1 and u2 orthonormal and zero-mean."""
    generator = torch.Generator().manual_seed(seed)
    size = channels * patch * patch
    basis = torch.randn(size, 2, generator=generator, dtype=torch.float64)
    basis = torch.cat([torch.ones(size, 1, dtype=torch.float64), basis], dim=1)
    directions = torch.linalg.qr(basis).Q[:, 1:].T  # (2, size), orthonormal, orthogonal to the constant vector
    directions = directions * torch.where(directions.gather(1, directions.abs().argmax(1, keepdim=True)) < 0, -1, 1)
    coefficients = torch.randn(hidden_size, 2, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 1.0])
    noise = 1e-4 * torch.randn(hidden_size, size, generator=generator, dtype=torch.float64)
    mean_filter = 5.0 * torch.rand(size, generator=generator, dtype=torch.float64)  # dominates unless centred
    filters = mean_filter + coefficients @ directions + noise
    return filters.reshape(hidden_size, channels, patch, patch).float(), directions.float()


def test_principal_components_span_the_known_filter_directions():
    weight, directions = two_direction_filters()
    components, ratio = patch_embedding_principal_components(weight, num_components=4)
    assert components.shape == (4, 3, 4, 4) and ratio.shape == (4,)
    assert components.min() >= 0 and components.max() <= 1
    flat = components.reshape(4, -1)
    torch.testing.assert_close(flat.amin(dim=1), torch.zeros(4))
    torch.testing.assert_close(flat.amax(dim=1), torch.ones(4))
    # the [0, 1] rescaling is affine and the true components are zero-mean, so centring recovers their direction
    recovered = flat[:2] - flat[:2].mean(dim=1, keepdim=True)
    recovered = recovered / recovered.norm(dim=1, keepdim=True)
    projected = recovered @ directions.T @ directions  # onto span(u1, u2)
    torch.testing.assert_close(projected.norm(dim=1), torch.ones(2), atol=1e-3, rtol=0)
    # variance 9 vs 1: the first component is u1, with the sign convention (largest-magnitude element positive)
    assert (recovered[0] @ directions[0]).item() == pytest.approx(1.0, abs=1e-3)
    assert bool((ratio[:-1] >= ratio[1:]).all()) and ratio.sum() <= 1 + 1e-6
    assert ratio[:2].sum() > 0.999


def test_principal_component_signs_do_not_depend_on_the_weight_sign():
    weight, _ = two_direction_filters(seed=1)
    components, ratio = patch_embedding_principal_components(weight, num_components=3)
    flipped, flipped_ratio = patch_embedding_principal_components(-weight, num_components=3)
    torch.testing.assert_close(components[:2], flipped[:2], atol=1e-4, rtol=0)
    torch.testing.assert_close(ratio, flipped_ratio)


def test_principal_components_default_is_the_papers_28():
    components, ratio = patch_embedding_principal_components(torch.randn(64, 3, 4, 4))
    assert components.shape == (28, 3, 4, 4) and ratio.shape == (28,)


@pytest.mark.parametrize("num_components", [0, 13])
def test_too_many_principal_components_is_refused(num_components):
    with pytest.raises(ValueError, match=r"min\(D, C \* P_h \* P_w\) = 12"):
        patch_embedding_principal_components(torch.randn(16, 3, 2, 2), num_components=num_components)


def test_principal_components_need_a_conv_weight():
    with pytest.raises(ValueError, match=r"\(16, 12\).*reshape it to \(D, C, P_h, P_w\)"):
        patch_embedding_principal_components(torch.randn(16, 12), num_components=2)


# --- attention_rollout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_residual", [True, False])
def test_rollout_of_identity_attention_is_identity(add_residual):
    rollout = attention_rollout(identity_attention(4, 2, 3, 5), add_residual=add_residual)
    torch.testing.assert_close(rollout, torch.eye(5).expand(2, 5, 5))


def test_rollout_of_one_uniform_layer_with_residual():
    rollout = attention_rollout([torch.full((1, 2, 4, 4), 0.25)])
    torch.testing.assert_close(rollout[0], 0.5 * torch.eye(4) + 0.5 * torch.full((4, 4), 0.25))


@pytest.mark.parametrize(
    ("head_fusion", "discard_ratio", "add_residual"),
    [("mean", 0.0, True), ("max", 0.5, True), ("min", 0.9, False), ("mean", 0.5, False)],
)
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio, add_residual):
    attention = random_attention(3, 2, 4, 10)
    rollout = attention_rollout(attention, head_fusion, discard_ratio, add_residual)
    assert rollout.shape == (2, 10, 10)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 10))


def test_rollout_multiplies_layers_last_on_the_left():
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # everyone reads token 0
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # everyone reads token 1
    layers = [first[None, None], second[None, None]]
    # with the residual: first' = [[1, 0], [.5, .5]], second' = [[.5, .5], [0, 1]]; second' @ first' by hand
    torch.testing.assert_close(attention_rollout(layers)[0], torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    torch.testing.assert_close(attention_rollout(layers[::-1])[0], torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    torch.testing.assert_close(attention_rollout(layers, add_residual=False)[0], first)


@pytest.mark.parametrize(
    ("head_fusion", "expected"),
    [
        ("mean", [[0.4, 0.2, 0.4], [0.3, 0.6, 0.1], [0.3, 0.4, 0.3]]),
        ("max", [[3 / 7, 1 / 7, 3 / 7], [5 / 14, 8 / 14, 1 / 14], [1 / 4, 5 / 12, 1 / 3]]),
        ("min", [[1 / 3, 1 / 3, 1 / 3], [1 / 6, 2 / 3, 1 / 6], [3 / 8, 3 / 8, 1 / 4]]),
    ],
)
def test_rollout_head_fusion(head_fusion, expected):
    heads = torch.tensor(
        [
            [[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
            [[0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.3, 0.5, 0.2]],
        ]
    )
    rollout = attention_rollout(heads[None, None], head_fusion=head_fusion, add_residual=False)
    torch.testing.assert_close(rollout[0], torch.tensor(expected))


def test_rollout_discard_spares_the_diagonal():
    # row 0: its own weight 0.1 is the smallest, but floor(0.5 * 3) = 1 off-diagonal weight goes: the 0.2
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4]] + [[0.25] * 4] * 3)[None, None, None]
    rollout = attention_rollout(attention, discard_ratio=0.5, add_residual=False)
    torch.testing.assert_close(rollout[0, 0], torch.tensor([0.1, 0.0, 0.3, 0.4]) / 0.8)


# --- attention_rollout_map --------------------------------------------------------------------------------------------


def test_rollout_map_points_at_the_patch_cls_attends_to():
    attention = identity_attention(2, 2, 3, 1 + 6)
    attention[:, 0, :, 0] = 0.0
    attention[:, 0, :, 0, 1 + 4] = 1.0  # image 0: [CLS] reads patch (1, 1) of a 2x3 grid in every layer
    rollout_map = attention_rollout_map(attention_rollout(attention), (2, 3))
    assert rollout_map.shape == (2, 2, 3)
    assert int(rollout_map[0].argmax()) == 4
    expected = torch.zeros(2, 3)
    expected[1, 1] = 1.0
    torch.testing.assert_close(rollout_map[0], expected)
    assert torch.equal(rollout_map[1], torch.zeros(2, 3))  # image 1: [CLS] only reads itself, no patch


def test_rollout_map_token_index_picks_a_row():
    rollout = torch.eye(1 + 4)[None]  # each token only itself
    rollout_map = attention_rollout_map(rollout, (2, 2), token_index=1 + 3)  # patch (1, 1)
    torch.testing.assert_close(rollout_map[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_rollout_map_without_prefix_tokens_averages_all_rows():
    attention = torch.zeros(1, 1, 1, 6, 6)
    attention[..., 2] = 1.0  # every patch reads patch (0, 2) of a 2x3 grid
    rollout_map = attention_rollout_map(attention_rollout(attention), (2, 3), num_prefix_tokens=0)
    # rollout = 0.5 I + 0.5 (all rows on patch 2); its mean row: 0.5/6 everywhere, plus 0.5 on patch 2
    expected = torch.full((2, 3), 0.5 / 6)
    expected[0, 2] += 0.5
    torch.testing.assert_close(rollout_map[0], expected / expected.max())
    assert rollout_map.max() == 1.0


# --- input checks -----------------------------------------------------------------------------------------------------


def test_token_count_must_match_the_grid():
    attention = uniform_attention(1, 1, 1, 10)
    with pytest.raises(ValueError, match=r"T=10 tokens, but num_prefix_tokens=1 \+ grid 3x4 = 13"):
        mean_attention_distance(attention, (3, 4), 16)
    with pytest.raises(ValueError, match=r"T=10 tokens, but num_prefix_tokens=1 \+ grid 2x2 = 5"):
        attention_rollout_map(attention_rollout(attention), (2, 2))
    with pytest.raises(ValueError, match=r"position_embeddings has T=10 tokens"):
        position_embedding_similarity(torch.randn(1, 10, 8), (3, 3), num_prefix_tokens=0)


def test_attention_shapes_are_checked():
    with pytest.raises(ValueError, match=r"shape \(2, 5, 5\); expected \(L, B, H, T, T\).*attn\[None\]"):
        mean_attention_distance(torch.rand(2, 5, 5), (2, 2), 16)
    with pytest.raises(ValueError, match=r"attentions\[0\] has shape \(2, 5, 5\); expected \(B, H, T, T\)"):
        attention_rollout([torch.rand(2, 5, 5)])
    with pytest.raises(ValueError, match=r"attentions\[1\] is None.*attn_implementation='eager'"):
        attention_rollout([torch.rand(1, 1, 5, 5), None])
    with pytest.raises(ValueError, match=r"attentions\[1\] has shape \(1, 2, 5, 5\) but attentions\[0\] has"):
        attention_rollout([torch.rand(1, 1, 5, 5), torch.rand(1, 2, 5, 5)])
    with pytest.raises(ValueError, match=r"non-empty"):
        attention_rollout([])


def test_other_arguments_are_checked():
    attention = uniform_attention(1, 1, 1, 5)
    with pytest.raises(ValueError, match=r"head_fusion='sum'; choose one of 'mean', 'max', 'min'"):
        attention_rollout(attention, head_fusion="sum")
    with pytest.raises(ValueError, match=r"discard_ratio=1.0 must be in \[0, 1\)"):
        attention_rollout(attention, discard_ratio=1.0)
    with pytest.raises(ValueError, match=r"grid_size must be .*got \(2, 0\)"):
        mean_attention_distance(attention, (2, 0), 16)
    with pytest.raises(ValueError, match=r"patch_size must be"):
        mean_attention_distance(attention, (2, 2), 16.0)
    with pytest.raises(ValueError, match=r"token_index=5 is out of range for T=5"):
        attention_rollout_map(attention_rollout(attention), (2, 2), token_index=5)
    with pytest.raises(ValueError, match=r"expected \(1, T, D\) or \(T, D\)"):
        position_embedding_similarity(torch.randn(2, 5, 8), (2, 2))
