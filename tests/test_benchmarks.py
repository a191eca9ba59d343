"""The benchmarks run on tiny sizes and print their tables (their figures are not checked: they depend on the
machine; what the tables say about the models is)."""

from __future__ import annotations

import re

import pytest
import torch

from vlm_vision import cli

TINY_TOWER = ["--image-size", "32", "--patch-size", "8"]


def test_the_encoder_benchmark_compares_the_same_model_and_prints_its_table(capsys):
    size = ["--hidden", "32", "--layers", "2", "--heads", "2", "--mlp", "64"]
    args = ["benchmark", "encoder", "--preset", "vit-ti16", *TINY_TOWER, *size, "--batch-size", "2", "--steps", "2"]
    results = cli.main([*args, "--gradient-checkpointing", "--matmul-size", "128", "--profile", "--profile-rows", "6"])
    out = capsys.readouterr().out
    assert "| model        | parameters | forward samples/s | fwd+bwd samples/s | forward peak RSS MB |" in out
    difference = float(re.search(r"max \|difference\| of the last hidden state (\S+);", out).group(1))
    assert difference < 1e-5  # ours carries transformers' weights: the same function
    assert results["ours"]["parameters"] == results["transformers"]["parameters"] == 23_904
    for name, row in results.items():
        assert re.search(rf"\| {name} +\| +23,904 \|", out)
        assert row["forward"] > 0 and row["forward+backward"] > 0
        assert row["forward+backward MB"] >= 0 and row["forward MB"] >= 0
    assert re.search(r"ours / transformers: forward \d+\.\d\dx, forward\+backward \d+\.\d\dx", out)
    assert ("timm: measured" in out) == ("timm" in results)

    # MFU: the analytic FLOPs over the matmul peak measured in the run; memory with and without checkpointing
    assert "| model        | forward MFU | fwd+bwd MFU | fwd+bwd peak RSS MB checkpointed | not checkpointed |" in out
    assert re.search(r"a 128x128 float32 matmul runs at \d+\.\d GFLOP/s", out)
    assert "0.001 GFLOP per image forward (17 tokens)" in out  # 16 patches and the class token
    for name, row in results.items():
        peak = row["peak FLOP/s"]
        assert row["flops per image"] == 827_648  # see test_the_flop_count_is_what_torch_counts_for_one_forward
        assert row["forward MFU"] == pytest.approx(row["forward"] * 827_648 / peak)
        assert row["forward+backward MFU"] == pytest.approx(row["forward+backward"] * 3 * 827_648 / peak)
        assert re.search(rf"\| {name} +\| +\d+\.\d% \| +\d+\.\d% \| +\d+\.\d \| +\d+\.\d \|", out)
        assert row["fwd+bwd MB checkpointed"] == row["forward+backward MB"]  # the run timed it checkpointed
        assert row["fwd+bwd MB not checkpointed"] >= 0

    # --profile: one forward of each, op by op; both run the same matmuls (12 addmm: 4 projections + 2 MLP, 2 layers)
    assert "one forward, op by op (self CPU time" in out
    assert re.search(r"\| aten::addmm \| \d+\.\d{3} \| 12 \| \d+\.\d{3} \| 12 \|", out)
    assert "| total (every op) |" in out


def test_the_flop_count_is_what_torch_counts_for_one_forward():
    """The analytic count of the MFU equals torch's FlopCounterMode over an eager forward (which sees every matmul:
    the patch convolution, the projections and MLP, and the two attention products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.benchmark_encoder import flops_per_image
    from vlm_vision import VisionTransformerConfig, VisionTransformerModel

    for size in (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80)):  # fmt: skip
        config = VisionTransformerConfig.from_preset(
            "vit-ti16", image_size=32, patch_size=8, attn_implementation="eager", **size
        )
        model = VisionTransformerModel(config).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            tokens = model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1]
        assert flops_per_image(config, tokens) == counter.get_total_flops()


def test_the_vlm_benchmark_packed_mode_computes_fewer_positions_than_padding(capsys):
    tower = [*TINY_TOWER, "--vision-hidden", "32", "--vision-layers", "2", "--vision-heads", "2", "--vision-mlp", "64"]
    lm = ["--text-hidden", "32", "--text-layers", "1", "--text-heads", "2", "--text-mlp", "64", "--vocab-size", "200"]
    mix = ["--max-length", "96", "--text-length", "16", "--length-sigma", "1.0"]
    steps = ["--steps", "1", "--batch-size", "6", "--num-batches", "2"]
    cli.main(["benchmark", "vlm", "--modes", "packed", *steps, *tower, *lm, *mix])
    out = capsys.readouterr().out
    assert "| layout  | model | positions computed | padding | supervised tokens/s |" in out
    rows = dict(
        ((layout.strip(), model), int(positions.replace(",", "")))
        for layout, model, positions in re.findall(
            r"\| (padded |rows   |one row) \| (ours|llava) +\| +([\d,]+) \|", out
        )
    )
    assert rows.keys() == {("padded", "ours"), ("rows", "ours"), ("one row", "ours"), ("padded", "llava")}
    real = int(re.search(r"2 batches of 6 samples, ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert real == rows[("one row", "ours")] <= rows[("rows", "ours")] < rows[("padded", "ours")]  # one row: no padding
    assert rows[("padded", "ours")] == rows[("padded", "llava")]
    for layout in ("rows", "one row"):
        assert re.search(rf"ours packed \({layout}\) / ours padded: \d+\.\d\dx supervised tokens/s", out)


def test_the_resolution_benchmark_prints_tokens_per_image_for_each_mode(capsys):
    size = [
        "--vision-hidden",
        "32",
        "--vision-mlp",
        "64",
        "--text-hidden",
        "32",
        "--text-mlp",
        "64",
        "--text-layers",
        "1",
    ]
    args = ["benchmark", "resolution", *TINY_TOWER, *size, "--batch-size", "4", "--num-batches", "1", "--steps", "1"]
    results = cli.main(args)
    out = capsys.readouterr().out
    assert (
        "| mode                | image tokens mean | min | max | LM positions/batch | tower patches/batch | step s |"
        in out
    )
    for mode in ("squash", "native-padded", "native-packed", "native-packed-tower", "tiles"):
        assert re.search(rf"\| {mode} +\| +\d+\.\d \| +\d+ \| +\d+ \|", out)
    squash, native, tiles = results["squash"], results["native-padded"], results["tiles"]
    assert squash["tokens_min"] == squash["tokens_max"] == 4  # a 4x4 grid, pixel shuffle r=2
    assert native["tokens_min"] < native["tokens_max"]  # each aspect ratio its own count
    assert native["tower_positions"] == squash["tower_positions"]  # the same patch budget per image
    assert tiles["tokens_min"] > squash["tokens_max"]  # 1:4..4:1 never fits one tile at twice the square
    assert results["native-packed"]["tokens_mean"] == native["tokens_mean"]
    packed_tower = results["native-packed-tower"]
    assert (
        packed_tower["tokens_mean"] == native["tokens_mean"] and packed_tower["lm_positions"] == native["lm_positions"]
    )
    assert packed_tower["tower_positions"] <= native["tower_positions"]  # padding only at the ends of rows


def test_the_aspect_stripes_experiment_runs_at_one_token_budget(capsys):
    import argparse

    import numpy as np

    from vlm_vision.commands import experiment_aspect_stripes as experiment

    images, answers = experiment.stripes(16, seed=0)
    assert set(answers) == {0, 1} and all(image.size == (128, 32) for image in images)
    means = {answer: np.asarray(image).mean() for image, answer in zip(images, answers, strict=True)}
    assert abs(means[0] - means[1]) < 1e-6  # no brightness cue: only the stripes' period tells
    args = argparse.Namespace(**experiment.TOWER, **experiment.LM, max_tiles=1, seed=0)
    model = experiment.build_model(args, {"adapter_type": "mlp"})
    batches = {mode: experiment.batch_for(model, mode, images[:2], answers[:2], args) for mode in experiment.MODES}
    assert batches["squash"]["input_ids"].shape == batches["native"]["input_ids"].shape == (2, 16 + 2)
    assert batches["native"]["spatial_shapes"].tolist() == [[2, 8], [2, 8]]  # 1:4 kept, 16 patches
    results = experiment.main(["--steps", "2", "--batch-size", "4", "--eval-size", "8"])
    assert set(results) == {"squash", "native"} and all(0 <= value <= 1 for value in results.values())
    assert re.search(
        r"exact match squash \d\.\d{3}, native \d\.\d{3} \(chance 0\.5, 8 held-out strips\)", capsys.readouterr().out
    )


def test_the_encoder_benchmark_measures_compiled_models_beside_eager_ones(capsys):
    size = ["--hidden", "32", "--layers", "1", "--heads", "2", "--mlp", "64"]
    args = ["benchmark", "encoder", "--preset", "vit-ti16", *TINY_TOWER, *size, "--batch-size", "2", "--steps", "1"]
    results = cli.main([*args, "--warmup", "1", "--matmul-size", "128", "--compile"])
    out = capsys.readouterr().out
    assert list(results) == ["ours", "transformers", "ours compiled", "transformers compiled"] or "timm" in results
    difference = float(re.search(r"ours compiled vs eager, max \|difference\| of the last hidden state (\S+)", out)[1])
    assert difference < 1e-5  # the same function compiled
    for name in ("ours compiled", "transformers compiled"):
        assert results[name]["forward"] > 0 and results[name]["forward+backward"] > 0
        assert results[name]["parameters"] == results["ours"]["parameters"]  # the same weights
        assert re.search(rf"\| {name} +\| +[\d,]+ \| +\d+\.\d \|", out)
    assert re.search(r"ours compiled / transformers compiled: forward \d+\.\d\dx", out)
    assert re.search(r"ours compiled / ours: forward \d+\.\d\dx", out)


def test_the_encoder_benchmark_times_a_training_step_with_adamw(capsys):
    size = ["--hidden", "32", "--layers", "1", "--heads", "2", "--mlp", "64"]
    args = ["benchmark", "encoder", "--preset", "vit-ti16", *TINY_TOWER, *size, "--batch-size", "2", "--steps", "2"]
    results = cli.main([*args, "--matmul-size", "128", "--optimizer", "adamw"])
    out = capsys.readouterr().out
    assert "forward+backward includes an AdamW step" in out
    for row in results.values():
        # every parameter stepped in the warm-up, each timed step and each memory measurement (two: with and
        # without checkpointing)
        assert row["AdamW steps"] == 1 + 2 + 2
