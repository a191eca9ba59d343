import pytest
import torch
import torch.nn.functional as F

from vlm_vision.encoder.position_embeddings import infer_square_grid, resample_position_embeddings


def table(prefix=1, grid=(4, 6), dim=8, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(1, prefix + grid[0] * grid[1], dim, dtype=dtype)


def test_same_grid_is_the_identity():
    pos = table(grid=(4, 4))
    assert resample_position_embeddings(pos, (4, 4)) is pos


def test_non_square_source_and_target_match_a_direct_interpolation():
    pos = table(prefix=1, grid=(4, 6))
    out = resample_position_embeddings(pos, new_grid=(6, 3), old_grid=(4, 6))
    assert out.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])  # prefix untouched
    image = pos[:, 1:].reshape(1, 4, 6, 8).permute(0, 3, 1, 2)  # (1, D, 4, 6)
    expected = F.interpolate(image, size=(6, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[:, 1:], expected.reshape(1, 18, 8))


def test_row_major_layout_is_preserved():
    # a table whose value is the row index: upsampling 2x keeps rows as rows (nearest mode makes it exact)
    grid = (2, 3)
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]).float()
    pos = rows[None, :, None].expand(1, 6, 1).contiguous()
    out = resample_position_embeddings(pos, (4, 6), old_grid=grid, num_prefix_tokens=0, mode="nearest")
    assert out[0, :, 0].reshape(4, 6).tolist() == [[0.0] * 6, [0.0] * 6, [1.0] * 6, [1.0] * 6]


def test_several_prefix_tokens_and_two_dimensional_input():
    pos = table(prefix=3, grid=(2, 2))[0]  # (T, D)
    out = resample_position_embeddings(pos, (3, 3), num_prefix_tokens=3)
    assert out.shape == (3 + 9, 8)
    torch.testing.assert_close(out[:3], pos[:3])


def test_computes_in_float32_and_returns_the_input_dtype():
    pos = table(grid=(4, 4), dtype=torch.bfloat16)
    out = resample_position_embeddings(pos, (7, 5))
    assert out.dtype == torch.bfloat16
    reference = resample_position_embeddings(pos.float(), (7, 5))
    torch.testing.assert_close(out.float(), reference.to(torch.bfloat16).float())


def test_antialias_changes_downsampling_only_when_asked():
    pos = table(grid=(8, 8))
    plain = resample_position_embeddings(pos, (3, 3), mode="bilinear")
    smooth = resample_position_embeddings(pos, (3, 3), mode="bilinear", antialias=True)
    assert not torch.allclose(plain, smooth)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_grid": (3, 3), "old_grid": (5, 5)}, r"old_grid=\(5, 5\) holds 25 patches but the table has 24"),
        ({"new_grid": (3, 3)}, r"24 position embeddings: it is not a perfect square.*old_grid="),
        ({"new_grid": (3, 3), "old_grid": (4, 6), "mode": "cubic"}, r"Unknown interpolation mode 'cubic'"),
        ({"new_grid": (3, 3), "old_grid": (4, 6), "mode": "nearest", "antialias": True}, r"antialias=True needs"),
        ({"new_grid": (0, 3), "old_grid": (4, 6)}, r"new_grid must be positive"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resample_position_embeddings(table(grid=(4, 6)), **kwargs)


def test_infer_square_grid():
    assert infer_square_grid(196) == (14, 14)
    with pytest.raises(ValueError, match="not a perfect square"):
        infer_square_grid(195)


@pytest.mark.parametrize(
    ("make_table", "kwargs", "error", "message"),
    [
        (lambda: table(grid=(4, 6)).numpy(), {}, TypeError, r"must be a float torch.Tensor"),
        (lambda: table(grid=(4, 6)).long(), {}, TypeError, r"got torch.int64"),
        (lambda: table(grid=(4, 6)), {"new_grid": 3}, ValueError, r"new_grid must be a \(rows, columns\) pair"),
        (lambda: table(grid=(4, 6)), {"new_grid": (3.0, 3)}, ValueError, r"new_grid must be a \(rows, columns\)"),
        (lambda: table(grid=(4, 6)), {"old_grid": (4, 6, 1)}, ValueError, r"old_grid must be a \(rows, columns\)"),
        (lambda: table(grid=(4, 6)), {"num_prefix_tokens": 1.0}, ValueError, r"num_prefix_tokens must be an int"),
        (lambda: table(grid=(4, 6)), {"antialias": "yes"}, ValueError, r"antialias must be True or False"),
        (lambda: torch.zeros(1, 1, 8), {}, ValueError, r"all prefix rows.*no patch rows"),
    ],
)
def test_wrong_arguments_are_named(make_table, kwargs, error, message):
    with pytest.raises(error, match=message):
        resample_position_embeddings(make_table(), **{"new_grid": (3, 3), "old_grid": (4, 6), **kwargs})


def test_infer_square_grid_refuses_non_positive_counts():
    for count in (0, -4, 2.0):
        with pytest.raises(ValueError, match="need a positive count"):
            infer_square_grid(count)


@pytest.mark.parametrize("new_grid", [(2, 8), (3, 5), (1, 16), (6, 2), (7, 9), (5, 5), (1, 1)])
def test_triangle_is_antialiased_bilinear(new_grid):
    # "triangle" computes F.interpolate(bilinear, antialias=True) as explicit separable weights
    pos = table(prefix=1, grid=(5, 5))
    out = resample_position_embeddings(pos, new_grid, mode="triangle")
    image = pos[:, 1:].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(image, size=new_grid, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, -1, 8), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, :1], pos[:, :1])


@pytest.mark.parametrize("new_grid", [(16, 1), (5, 1), (2, 1), (1, 16), (3, 7), (12, 12)])
def test_triangle_is_siglip2s_resize(new_grid):
    # transformers' Siglip2VisionEmbeddings.resize_positional_embeddings, one-column grids included (where torch
    # 2.13's antialiased kernel was seen to repeat the first row)
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    pos = table(prefix=0, grid=(4, 4))
    count = new_grid[0] * new_grid[1]
    expected = Siglip2VisionEmbeddings.resize_positional_embeddings(
        pos.reshape(4, 4, 8), torch.tensor([new_grid]), count
    )
    out = resample_position_embeddings(pos, new_grid, num_prefix_tokens=0, mode="triangle")
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_triangle_interpolates_rows_on_a_one_column_grid():
    # a table whose value is its row index: each output row holds its centre's position in source rows
    pos = torch.arange(4.0)[:, None, None].expand(4, 4, 1).reshape(1, 16, 1)
    out = resample_position_embeddings(pos, (16, 1), num_prefix_tokens=0, mode="triangle")[0, :, 0]
    torch.testing.assert_close(out, ((torch.arange(16.0) + 0.5) * 0.25 - 0.5).clamp(0, 3))


def test_triangle_takes_no_antialias_flag():
    with pytest.raises(ValueError, match=r"antialias=True needs mode 'bilinear' or 'bicubic', got 'triangle'"):
        resample_position_embeddings(table(), (2, 2), mode="triangle", antialias=True)
