"""Tests of the projection adapters (``vlm_vision.adapters``): shapes and token counts, the pixel-shuffle channel
order, boundary errors, save/load, gradients, output norm/scale, configs."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from vlm_vision.adapters import (
    ADAPTER_CLASSES,
    ADAPTER_CONFIGS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterConfig,
    LinearAdapter,
    MLPAdapter,
    MLPAdapterConfig,
    PixelShuffleAdapter,
    PixelShuffleAdapterConfig,
    ResamplerAdapter,
    ResamplerAdapterConfig,
    adapter_config_from_dict,
    build_adapter,
    pixel_shuffle,
    sincos_2d_position_embedding,
)

VISION, TEXT, QUERIES = 8, 16, 5
TYPES = ["linear", "mlp", "pixel_shuffle", "resampler"]


def tiny_config(adapter_type: str, **overrides) -> dict:
    config = {"adapter_type": adapter_type, "vision_hidden_size": VISION, "text_hidden_size": TEXT}
    if adapter_type == "resampler":
        config.update(num_queries=QUERIES, num_attention_heads=2)
    config.update(overrides)
    return config


def tiny_adapter(adapter_type: str, seed: int = 0, **overrides) -> Adapter:
    torch.manual_seed(seed)
    return build_adapter(tiny_config(adapter_type, **overrides))


def expected_tokens(adapter_type: str, grid_h: int, grid_w: int) -> int:
    return {
        "linear": grid_h * grid_w,
        "mlp": grid_h * grid_w,
        "pixel_shuffle": (grid_h // 2) * (grid_w // 2),
        "resampler": QUERIES,
    }[adapter_type]


def test_registry_names_the_four_types():
    assert set(ADAPTER_CLASSES) == set(TYPES)
    assert set(ADAPTER_CONFIGS) == set(TYPES)
    for adapter_type, adapter_class in ADAPTER_CLASSES.items():
        assert adapter_class.config_class is ADAPTER_CONFIGS[adapter_type]
        assert ADAPTER_CONFIGS[adapter_type].adapter_type == adapter_type


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("grid", [(4, 4), (4, 6), (6, 2)])
def test_output_shape_matches_num_output_tokens(adapter_type, grid):
    adapter = tiny_adapter(adapter_type)
    features = torch.randn(3, grid[0] * grid[1], VISION)
    output = adapter(features, grid_size=grid)
    assert adapter.num_output_tokens(*grid) == expected_tokens(adapter_type, *grid)
    assert output.shape == (3, adapter.num_output_tokens(*grid), TEXT)


def test_token_counts_pinned():
    assert tiny_adapter("pixel_shuffle").num_output_tokens(4, 6) == 6
    assert tiny_adapter("pixel_shuffle", scale_factor=3).num_output_tokens(6, 9) == 6
    assert tiny_adapter("mlp").num_output_tokens(24, 24) == 576  # LLaVA-1.5 at 336 px, patch 14
    assert tiny_adapter("resampler").num_output_tokens(7, 3) == QUERIES


def test_grid_size_accepts_tensor_sides():
    adapter = tiny_adapter("pixel_shuffle")
    features = torch.randn(1, 24, VISION)
    torch.testing.assert_close(
        adapter(features, (torch.tensor(4), torch.tensor(6))), adapter(features, (4, 6)), rtol=0, atol=0
    )


def test_pixel_shuffle_channel_order_by_hand():
    grid_h, grid_w, dim, r = 4, 6, 2, 2
    # token (row, col) carries channel d = 100 * row + 10 * col + d, so every value names where it came from
    grid = torch.tensor([[[100 * i + 10 * j + d for d in range(dim)] for j in range(grid_w)] for i in range(grid_h)])
    features = grid.reshape(1, grid_h * grid_w, dim).float()
    expected = [
        [100 * (r * i + dy) + 10 * (r * j + dx) + d for dy in range(r) for dx in range(r) for d in range(dim)]
        for i in range(grid_h // r)
        for j in range(grid_w // r)
    ]
    shuffled = pixel_shuffle(features, (grid_h, grid_w), r)
    assert shuffled.shape == (1, 6, r * r * dim)
    assert shuffled[0].tolist() == expected
    # first output token = the top-left 2x2 block read row-major: (0,0), (0,1), (1,0), (1,1)
    assert shuffled[0, 0].tolist() == [0, 1, 10, 11, 100, 101, 110, 111]


def test_pixel_shuffle_ratio_3_non_square():
    features = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 18, 1)  # token index = 3 * row + col
    shuffled = pixel_shuffle(features, (6, 3), 3)
    assert shuffled[0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def test_pixel_shuffle_matches_idefics3_on_square_grids():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    features = torch.randn(2, 36, 5)
    reference = Idefics3Connector.pixel_shuffle(None, features, scale_factor=2)  # does not use self
    torch.testing.assert_close(pixel_shuffle(features, (6, 6), 2), reference, rtol=0, atol=0)


def test_pixel_shuffle_adapter_is_shuffle_then_mlp():
    adapter = tiny_adapter("pixel_shuffle")
    features = torch.randn(2, 24, VISION)
    shuffled = pixel_shuffle(features, (4, 6), 2)
    expected = adapter.linear_2(torch.nn.functional.gelu(adapter.linear_1(shuffled)))
    torch.testing.assert_close(adapter(features, (4, 6)), expected)
    assert adapter.linear_1.in_features == 4 * VISION


@pytest.mark.parametrize("output_norm", [None, "layernorm"])
def test_prefix_tokens_through_each_adapter(output_norm):
    cls = torch.randn(2, 1, VISION)
    shuffle = tiny_adapter("pixel_shuffle", output_norm=output_norm, output_scale=2.0)
    tiled = torch.cat([cls] * 4, dim=-1)  # the [CLS] fills all r*r = 4 positions of a block
    hidden = shuffle.linear_2(torch.nn.functional.gelu(shuffle.linear_1(tiled)))
    torch.testing.assert_close(shuffle.forward_prefix_tokens(cls), 2.0 * shuffle.output_norm(hidden))
    mlp = tiny_adapter("mlp", output_norm=output_norm)
    torch.testing.assert_close(mlp.forward_prefix_tokens(cls), mlp(cls, (1, 1)))  # token-wise: like a patch token
    with pytest.raises(ValueError, match=r"prefix_features must be \(batch, num_prefix_tokens, 8\)"):
        shuffle.forward_prefix_tokens(cls[0])
    with pytest.raises(ValueError, match="The resampler adapter cannot project prefix tokens"):
        tiny_adapter("resampler").forward_prefix_tokens(cls)


@pytest.mark.parametrize("grid", [(5, 4), (4, 3), (1, 1)])
def test_pixel_shuffle_refuses_grid_not_divisible(grid):
    adapter = tiny_adapter("pixel_shuffle", uneven_grid="refuse")
    pattern = rf"grid {grid[0]}x{grid[1]}.*resize the image.*scale_factor"
    with pytest.raises(ValueError, match=r"scale_factor r=2") as error:
        adapter.num_output_tokens(*grid)
    assert "resize the image" in str(error.value)
    assert "uneven_grid='pad'" in str(error.value)
    assert f"grid {grid[0]}x{grid[1]}" in str(error.value)
    with pytest.raises(ValueError, match=pattern):
        adapter(torch.randn(1, grid[0] * grid[1], VISION), grid)


@pytest.mark.parametrize(("grid", "tokens"), [((27, 27), 196), ((5, 4), 6), ((1, 1), 1), ((3, 8), 8)])
def test_pixel_shuffle_pads_uneven_grid(grid, tokens):
    """The default pads the grid with zero tokens at the bottom/right: the same as padding the features by hand."""
    adapter = tiny_adapter("pixel_shuffle")
    assert adapter.config.uneven_grid == "pad"
    assert adapter.num_output_tokens(*grid) == tokens
    torch.manual_seed(1)
    features = torch.randn(2, grid[0] * grid[1], VISION)
    padded_h, padded_w = -(-grid[0] // 2) * 2, -(-grid[1] // 2) * 2
    by_hand = torch.zeros(2, padded_h, padded_w, VISION)
    by_hand[:, : grid[0], : grid[1]] = features.reshape(2, *grid, VISION)
    output = adapter(features, grid)
    assert output.shape[1] == tokens
    torch.testing.assert_close(output, adapter(by_hand.reshape(2, -1, VISION), (padded_h, padded_w)))
    with pytest.raises(ValueError, match=r"uneven_grid='crop' is not known; use one of \['pad', 'refuse'\]"):
        tiny_adapter("pixel_shuffle", uneven_grid="crop")


@pytest.mark.parametrize("adapter_type", TYPES)
def test_boundary_errors(adapter_type):
    adapter = tiny_adapter(adapter_type)
    with pytest.raises(ValueError, match=r"last dimension 7 .*vision_hidden_size=8"):
        adapter(torch.randn(1, 16, VISION - 1), (4, 4))
    with pytest.raises(ValueError, match=r"has 15 tokens .*4x4 needs 16.*prefix tokens"):
        adapter(torch.randn(1, 15, VISION), (4, 4))
    with pytest.raises(ValueError, match=r"must be 3-D .*\(16, 8\).*unsqueeze"):
        adapter(torch.randn(16, VISION), (4, 4))
    with pytest.raises(ValueError, match=r"grid_h must be a positive int, got 0"):
        adapter.num_output_tokens(0, 4)
    with pytest.raises(ValueError, match=r"grid_size must be a \(grid_h, grid_w\) pair"):
        adapter(torch.randn(1, 16, VISION), (4, 2, 2))


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("output_norm", [None, "rmsnorm"])
def test_save_load_round_trip(tmp_path, adapter_type, output_norm):
    adapter = tiny_adapter(adapter_type, output_norm=output_norm, output_scale=0.5)
    with torch.no_grad():  # move off the init so a load that silently re-initialised would show
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter))
    adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    with safe_open(tmp_path / "adapter" / WEIGHTS_NAME, framework="pt") as f:
        assert sorted(f.keys()) == sorted(adapter.state_dict())
    with open(tmp_path / "adapter" / CONFIG_NAME) as f:
        assert json.load(f)["adapter_type"] == adapter_type

    loaded = Adapter.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is type(adapter)
    assert loaded.config == adapter.config
    features = torch.randn(2, 24, VISION)
    torch.testing.assert_close(loaded(features, (4, 6)), adapter(features, (4, 6)), rtol=0, atol=0)
    assert type(ADAPTER_CLASSES[adapter_type].from_pretrained(str(tmp_path / "adapter"))) is type(adapter)


def test_typed_from_pretrained_refuses_another_type(tmp_path):
    tiny_adapter("pixel_shuffle").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"describes a 'pixel_shuffle' adapter, not 'mlp'"):
        MLPAdapter.from_pretrained(tmp_path)
    assert type(PixelShuffleAdapter.from_pretrained(tmp_path)) is PixelShuffleAdapter


def edit_config(directory, **changes) -> None:
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_load_into_other_shape_lists_mismatches(tmp_path):
    tiny_adapter("mlp").save_pretrained(tmp_path)
    edit_config(tmp_path, text_hidden_size=TEXT * 2)
    with pytest.raises(ValueError, match=r"shape mismatches") as error:
        Adapter.from_pretrained(tmp_path)
    message = str(error.value)
    assert "linear_1.weight: file (16, 8) vs model (32, 8)" in message
    assert "linear_2.weight: file (16, 16) vs model (32, 32)" in message
    assert "missing keys []" in message
    assert WEIGHTS_NAME in message


def test_load_lists_missing_and_unexpected_keys(tmp_path):
    tiny_adapter("linear").save_pretrained(tmp_path / "plain")
    edit_config(tmp_path / "plain", output_norm="layernorm")
    with pytest.raises(ValueError, match=r"missing keys \['output_norm.bias', 'output_norm.weight'\]"):
        Adapter.from_pretrained(tmp_path / "plain")

    tiny_adapter("linear", output_norm="layernorm").save_pretrained(tmp_path / "normed")
    edit_config(tmp_path / "normed", output_norm=None)
    with pytest.raises(ValueError, match=r"unexpected keys \['output_norm.bias', 'output_norm.weight'\]"):
        Adapter.from_pretrained(tmp_path / "normed")


def test_corrupt_or_missing_files_raise_clear_errors(tmp_path):
    adapter = tiny_adapter("mlp")
    adapter.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])  # truncated, as after a crash mid-write
    with pytest.raises(ValueError, match=r"projector\.safetensors.*corrupt or truncated"):
        Adapter.from_pretrained(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"projector\.safetensors.*corrupt or truncated"):
        Adapter.from_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"projector\.safetensors does not exist"):
        Adapter.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"projector_config\.json does not exist"):
        Adapter.from_pretrained(tmp_path / "nowhere")

    adapter.save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"projector_config\.json is not valid JSON"):
        Adapter.from_pretrained(tmp_path)


def test_save_overwrites_in_place(tmp_path):
    tiny_adapter("linear", seed=0).save_pretrained(tmp_path)
    second = tiny_adapter("linear", seed=1)
    second.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    torch.testing.assert_close(Adapter.from_pretrained(tmp_path).proj.weight, second.proj.weight, rtol=0, atol=0)


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("output_norm", [None, "layernorm", "rmsnorm"])
def test_every_parameter_gets_a_gradient(adapter_type, output_norm):
    adapter = tiny_adapter(adapter_type, output_norm=output_norm)
    output = adapter(torch.randn(2, 24, VISION), (4, 6))
    (output * torch.randn_like(output)).sum().backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("adapter_type", TYPES)
def test_output_norm_and_scale(adapter_type):
    features = torch.randn(2, 16, VISION)
    plain = tiny_adapter(adapter_type, seed=0)
    projected = plain(features, (4, 4))  # same seed and the norms draw no random numbers: same projection weights

    layernorm = tiny_adapter(adapter_type, seed=0, output_norm="layernorm")
    output = layernorm(features, (4, 4))
    torch.testing.assert_close(output.mean(-1), torch.zeros(output.shape[:2]), rtol=0, atol=1e-5)
    centred = projected - projected.mean(-1, keepdim=True)
    torch.testing.assert_close(output, centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())

    rmsnorm = tiny_adapter(adapter_type, seed=0, output_norm="rmsnorm")
    output = rmsnorm(features, (4, 4))
    torch.testing.assert_close(output, projected / (projected.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    assert output.mean(-1).abs().max() > 1e-3  # rmsnorm does not centre

    scaled = build_adapter(tiny_config(adapter_type, output_scale=3.0))
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled(features, (4, 4)), 3.0 * projected)

    # norm first, then scale
    both = build_adapter(tiny_config(adapter_type, output_norm="layernorm", output_scale=3.0))
    both.load_state_dict(layernorm.state_dict())
    torch.testing.assert_close(both(features, (4, 4)), 3.0 * layernorm(features, (4, 4)))


def test_mlp_state_dict_loads_into_transformers_llava_projector():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = SimpleNamespace(
        vision_feature_layer=-2,
        vision_config=SimpleNamespace(hidden_size=VISION),
        text_config=SimpleNamespace(hidden_size=TEXT),
        multimodal_projector_bias=True,
        projector_hidden_act="gelu",
    )
    reference = LlavaMultiModalProjector(config)
    adapter = tiny_adapter("mlp")
    reference.load_state_dict(adapter.state_dict(), strict=True)
    features = torch.randn(2, 9, VISION)
    torch.testing.assert_close(adapter(features, (3, 3)), reference(features), rtol=0, atol=0)


def test_resampler_uses_token_positions_only_when_asked():
    features = torch.randn(2, 12, VISION)
    permutation = torch.randperm(12)
    blind = tiny_adapter("resampler", position_embedding=None)
    torch.testing.assert_close(blind(features, (3, 4)), blind(features[:, permutation], (3, 4)))
    sighted = tiny_adapter("resampler")
    assert not torch.allclose(sighted(features, (3, 4)), sighted(features[:, permutation], (3, 4)), atol=1e-4)


def test_sincos_2d_position_embedding_layout():
    embedding = sincos_2d_position_embedding(3, 4, 8)
    assert embedding.shape == (12, 8)
    cells = embedding.reshape(3, 4, 8)
    # first half: the row only; second half: the column only
    torch.testing.assert_close(cells[:, :, :4], cells[:, :1, :4].expand(3, 4, 4))
    torch.testing.assert_close(cells[:, :, 4:], cells[:1, :, 4:].expand(3, 4, 4))
    torch.testing.assert_close(cells[0, 0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert cells[1, 0, 0] == pytest.approx(torch.tensor(1.0).sin().item())
    with pytest.raises(ValueError, match=r"divisible by 4, got 6"):
        sincos_2d_position_embedding(2, 2, 6)


def test_documented_init():
    torch.manual_seed(0)
    adapter = build_adapter(tiny_config("resampler", vision_hidden_size=64, text_hidden_size=64, num_queries=64))
    for name, parameter in adapter.named_parameters():
        if name.endswith("bias"):
            assert parameter.abs().max() == 0, name
    assert abs(adapter.kv_proj.weight.std().item() - 0.02) < 0.002
    assert abs(adapter.queries.std().item() - 0.02) < 0.002
    assert adapter.layers[0].norm_latents.weight.eq(1).all()
    mlp = tiny_adapter("mlp", vision_hidden_size=64, text_hidden_size=64)
    assert abs(mlp.linear_2.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(
    "config",
    [
        {"adapter_type": "linear", "vision_hidden_size": 4, "text_hidden_size": 6, "bias": False},
        {"adapter_type": "mlp", "vision_hidden_size": 4, "text_hidden_size": 6, "hidden_act": "quick_gelu"},
        {"adapter_type": "pixel_shuffle", "vision_hidden_size": 4, "text_hidden_size": 6, "scale_factor": 3},
        {
            "adapter_type": "resampler",
            "vision_hidden_size": 4,
            "text_hidden_size": 6,
            "hidden_size": 12,
            "num_attention_heads": 3,
            "position_embedding": "sincos_2d",
            "output_norm": "layernorm",
            "output_scale": 2.5,
        },
    ],
)
def test_config_round_trip(config):
    built = adapter_config_from_dict(config)
    assert type(built) is ADAPTER_CONFIGS[config["adapter_type"]]
    for key, value in config.items():
        assert getattr(built, key) == value
    as_json = json.loads(json.dumps(built.to_dict()))
    assert adapter_config_from_dict(as_json) == built
    assert AdapterConfig.from_dict(as_json) == built
    assert type(built).from_dict(as_json) == built
    assert type(build_adapter(as_json)) is ADAPTER_CLASSES[config["adapter_type"]]


def test_resampler_config_resolves_defaults():
    config = ResamplerAdapterConfig(vision_hidden_size=4, text_hidden_size=16, num_attention_heads=2)
    assert (config.hidden_size, config.intermediate_size, config.num_queries, config.num_layers) == (16, 64, 64, 2)
    assert ResamplerAdapterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: MLPAdapterConfig(vision_hidden_size=0, text_hidden_size=4), r"vision_hidden_size .* got 0"),
        (lambda: MLPAdapterConfig(vision_hidden_size=4, text_hidden_size=True), r"text_hidden_size .* got True"),
        (
            lambda: MLPAdapterConfig(vision_hidden_size=4, text_hidden_size=4, output_norm="batchnorm"),
            r"output_norm='batchnorm' is not known; use one of \[None, 'layernorm', 'rmsnorm'\]",
        ),
        (
            lambda: MLPAdapterConfig(vision_hidden_size=4, text_hidden_size=4, output_scale=0.0),
            r"output_scale must be a finite number > 0, got 0.0",
        ),
        (
            lambda: MLPAdapterConfig(vision_hidden_size=4, text_hidden_size=4, hidden_act="swiglu"),
            r"hidden_act='swiglu' is not known",
        ),
        (
            lambda: PixelShuffleAdapterConfig(vision_hidden_size=4, text_hidden_size=4, scale_factor=0),
            r"scale_factor must be a positive int, got 0",
        ),
        (
            lambda: ResamplerAdapterConfig(vision_hidden_size=4, text_hidden_size=10, num_attention_heads=4),
            r"hidden_size=10 is not divisible by num_attention_heads=4",
        ),
        (
            lambda: ResamplerAdapterConfig(vision_hidden_size=4, text_hidden_size=6, num_attention_heads=2),
            r"sincos_2d' needs hidden_size divisible by 4, got 6",
        ),
        (
            lambda: MLPAdapterConfig.from_dict({"vision_hidden_size": 4, "text_hidden_size": 4, "hiden_act": "gelu"}),
            r"unknown keys \['hiden_act'\]",
        ),
        (
            lambda: MLPAdapterConfig.from_dict(
                {"adapter_type": "linear", "vision_hidden_size": 4, "text_hidden_size": 4}
            ),
            r"got adapter_type='linear', expected 'mlp'",
        ),
    ],
)
def test_config_validation(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_unknown_adapter_type_lists_known_ones():
    known = r"known adapter types: \['linear', 'mlp', 'pixel_shuffle', 'resampler'\]"
    with pytest.raises(ValueError, match=r"unknown adapter_type 'qformer'; " + known):
        build_adapter({"adapter_type": "qformer", "vision_hidden_size": 4, "text_hidden_size": 4})
    with pytest.raises(ValueError, match=r"unknown adapter_type None; " + known):
        adapter_config_from_dict({"vision_hidden_size": 4, "text_hidden_size": 4})
    with pytest.raises(ValueError, match=r"peft adapter config"):
        adapter_config_from_dict({"peft_type": "LORA", "r": 8})


def test_adapter_refuses_a_config_of_another_type():
    config = PixelShuffleAdapterConfig(vision_hidden_size=4, text_hidden_size=4)
    with pytest.raises(TypeError, match=r"MLPAdapter takes a MLPAdapterConfig, got PixelShuffleAdapterConfig"):
        MLPAdapter(config)
    assert type(build_adapter(config)) is PixelShuffleAdapter
    assert isinstance(build_adapter(tiny_config("linear")), LinearAdapter)
    assert isinstance(build_adapter(tiny_config("resampler")), ResamplerAdapter)


def test_a_failed_save_keeps_the_previous_pair(tmp_path, monkeypatch):
    import adapters.base as base_module  # noqa: F401  (the installed name is vlm_vision.adapters.base)
    import vlm_vision.adapters.base as base

    old = tiny_adapter("linear", seed=0)
    old.save_pretrained(tmp_path / "projector")
    (tmp_path / "projector" / "adapter_model.safetensors").write_bytes(b"a LoRA adapter sharing the folder")

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(base, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):  # the new config was written, the weights were not
        tiny_adapter("mlp", seed=1).save_pretrained(tmp_path / "projector")
    monkeypatch.undo()
    loaded = Adapter.from_pretrained(tmp_path / "projector")  # still the old, complete pair
    assert type(loaded) is LinearAdapter
    torch.testing.assert_close(loaded.proj.weight, old.proj.weight, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projector"]  # no staging folder left
    new = tiny_adapter("mlp", seed=1)
    new.save_pretrained(tmp_path / "projector")
    assert type(Adapter.from_pretrained(tmp_path / "projector")) is MLPAdapter
    # the other files of the folder are kept
    assert (tmp_path / "projector" / "adapter_model.safetensors").read_bytes() == b"a LoRA adapter sharing the folder"


def test_save_and_load_refuse_files_where_folders_belong(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"file is a file: save_pretrained takes a folder"):
        tiny_adapter("linear").save_pretrained(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match=r"file is a file: pass the folder"):
        Adapter.from_pretrained(tmp_path / "file")


@pytest.mark.parametrize("adapter_type", TYPES)
def test_wrong_feature_types_are_named_and_other_float_dtypes_cast(adapter_type):
    import numpy as np

    adapter = tiny_adapter(adapter_type)
    with pytest.raises(TypeError, match=r"image_features must be a torch.Tensor .*got numpy.ndarray"):
        adapter(np.zeros((1, 16, VISION), np.float32), (4, 4))
    with pytest.raises(TypeError, match=r"image_features has dtype torch.int64; pass the vision tower's float"):
        adapter(torch.zeros(1, 16, VISION, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match=r"grid_size must be a \(grid_h, grid_w\) pair such as \(14, 14\), got 4"):
        adapter(torch.zeros(1, 16, VISION), 4)
    features = torch.randn(1, 16, VISION)
    expected = adapter(features, (4, 4))
    torch.testing.assert_close(adapter(features.double(), (4, 4)), expected)  # a float64 / bf16 tower's output
    assert adapter(features.bfloat16(), (4, 4)).dtype == torch.float32
    if adapter.supports_prefix_tokens:
        with pytest.raises(TypeError, match=r"prefix_features must be a torch.Tensor"):
            adapter.forward_prefix_tokens([[0.0] * VISION])


@pytest.mark.parametrize(
    ("config", "error", "pattern"),
    [
        ("mlp", TypeError, r'got str, e.g. \{"adapter_type": "mlp", "vision_hidden_size"'),
        (
            {"adapter_type": "mlp", "vision_hidden_size": 8},
            ValueError,
            r"'mlp' adapter config needs \['text_hidden_size'\]",
        ),
        ({**tiny_config("mlp"), "bias": "yes"}, ValueError, r"bias must be True or False, got 'yes'"),
        (
            {**tiny_config("linear"), "bais": False},
            ValueError,
            r"unknown keys \['bais'\].*did you mean: 'bais' -> 'bias'",
        ),
        ({"vision_hidden_size": 8, "text_hidden_size": 8}, ValueError, r'the dict needs an "adapter_type" key'),
    ],
)
def test_build_adapter_names_what_is_wrong(config, error, pattern):
    with pytest.raises(error, match=pattern):
        build_adapter(config)
