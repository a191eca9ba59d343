"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on 2 CPU processes (DeepSpeed's CPU accelerator over gloo): the
LoRA recipe partitioned, trained as on one process, merged after gathering, evaluated on every process, a ZeRO-3
checkpoint that resumes exactly (on as many processes: what DeepSpeed can load), bf16, and a classifier recipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.launch import launch_two_processes
from tests.real_path import build_world, llava_command
from tests.test_classifier import assert_stages_match, tiny_recipe, write_image_folder
from tests.test_distributed import LORA_RECIPE, ROOT, SMALL, assert_same_weights, launch, train_vlm_main, weights
from vlm_vision.training.classifier import ClassifierRecipe, run_recipe
from vlm_vision.training.distributed import check_deepspeed_precision

pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra: pip install -e '.[dev]'")

# the pre-training stage reads the frozen tower's cached features, built before its tower is partitioned
CACHED = "stages.pretrain.cache_features=true"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("deepspeed"), num_images=120)


@pytest.fixture(scope="module")
def evaluation(world):
    data = world["data"]
    return (f"data.eval={data.finetune}", f"data.eval_image_folder={data.root}", "data.eval_subset=10", CACHED)


@pytest.fixture(scope="module")
def one_process(world, evaluation, tmp_path_factory):
    """The same recipe on one process (no DeepSpeed): the reference."""
    out = tmp_path_factory.mktemp("one") / "run"
    train_vlm_main()(llava_command(world, "clip", out, *SMALL, *evaluation, recipe=LORA_RECIPE))
    return out


def partitions(stderr: str, stage: int) -> list[tuple[int, int, int]]:
    found = re.findall(rf"DeepSpeed ZeRO-{stage}: process (\d) of 2 holds (\d+) of (\d+) ", stderr)
    return [tuple(map(int, f)) for f in found]


def assert_evaluated(run, reference):
    """Every process answered its share of the samples, gathered in the order one process answers them."""
    evaluation = json.loads((run / "results.json").read_text())["evaluation"]
    assert evaluation["num_samples"] + evaluation["num_unanswered"] == 10
    ids = [p["id"] for p in json.loads((run / "eval_predictions.json").read_text())["predictions"]]
    assert ids == [p["id"] for p in json.loads((reference / "eval_predictions.json").read_text())["predictions"]]


def test_zero3_partitions_trains_as_one_process_and_resumes_exactly(world, evaluation, one_process, tmp_path):
    config = "deepspeed_zero3_cpu_2proc.yaml"
    done = launch(world, tmp_path / "zero3", *evaluation, "--save-every-steps", "2", config=config, cwd=tmp_path)
    # every parameter partitioned: each process holds half of the values, in both stages
    held = partitions(done.stderr, 3)
    assert sorted(p for p, _, _ in held) == [0, 0, 1, 1]
    for _, part, total in held:
        assert 0.45 < part / total < 0.55
    assert_same_weights(tmp_path / "zero3", one_process)
    assert_evaluated(tmp_path / "zero3", one_process)

    # each process saved its partition; stopped after 2 steps and resumed, the run ends on the same weights
    checkpoint = tmp_path / "zero3" / "finetune" / "checkpoints" / "checkpoint-00000002"
    assert sorted(p.name for p in (checkpoint / "pytorch_model").glob("*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    resumed, stop = tmp_path / "resumed", (CACHED, "--no-eval", "--save-every-steps", "2")
    launch(world, resumed, *stop, "--stop-after-steps", "2", config=config, cwd=tmp_path)
    assert not (resumed / "vlm").exists()
    # what DeepSpeed can't load is refused before anything is loaded, naming the fix: no DeepSpeed, or 1 process
    with pytest.raises(ValueError, match=r"saved under DeepSpeed \(ZeRO partitions in pytorch_model/\) on 2 processes"):
        train_vlm_main()(llava_command(world, "clip", resumed, *SMALL, *stop, "--resume", recipe=LORA_RECIPE))
    alone = launch(world, resumed, *stop, "--resume", config=config, cwd=tmp_path, check=False, num_processes=1)
    assert alone.returncode != 0
    assert "saved under DeepSpeed on 2 processes" in alone.stderr and "resume with --num_processes 2" in alone.stderr
    launch(world, resumed, *stop, "--resume", config=config, cwd=tmp_path)
    finished, straight = weights(resumed), weights(tmp_path / "zero3")
    for key in straight:
        assert torch.equal(finished[key], straight[key]), key


def test_zero2_partitions_the_optimizer_state_and_trains_as_one_process(world, evaluation, one_process, tmp_path):
    done = launch(world, tmp_path / "zero2", *evaluation, config="deepspeed_zero2_cpu_2proc.yaml", cwd=tmp_path)
    held = partitions(done.stderr, 2)
    assert sorted(p for p, _, _ in held) == [0, 0, 1, 1]
    for _, part, total in held:  # the optimizer state of the trainable parameters, split in two
        assert 0.45 < part / total < 0.55
    assert_same_weights(tmp_path / "zero2", one_process)
    assert_evaluated(tmp_path / "zero2", one_process)

    # a DeepSpeed config that clips at another norm than the recipe's stage is refused, naming both
    config = tmp_path / "clipping.yaml"
    shipped = (ROOT / "configs" / "accelerate" / "deepspeed_zero2_cpu_2proc.yaml").read_text()
    config.write_text(shipped.replace("gradient_clipping: auto", "gradient_clipping: 0.5"))
    refused = launch(world, tmp_path / "clipping", "--no-eval", config=str(config), cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "deepspeed_config.gradient_clipping is 0.5, the stage's max_grad_norm 1.0" in refused.stderr


def test_zero3_in_bf16_keeps_the_frozen_weights_and_takes_the_trained_ones_from_the_fp32_masters(world, tmp_path):
    """DeepSpeed's bf16 casts the whole model: frozen float32 weights (no master copy) would be rounded, so they are
    refused; loaded in bf16 they stay as loaded, and the trained ones come back in fp32 from the optimizer."""
    # (the loop checks before accelerate.prepare; peft's untrained `original_module` copies are never saved)
    wrapped = torch.nn.ModuleDict({"original_module": torch.nn.Linear(2, 2)})
    model = torch.nn.ModuleDict({"lm": torch.nn.Linear(2, 2), "adapter": wrapped})
    model.requires_grad_(False)
    check_deepspeed_precision(model, "no")
    with pytest.raises(ValueError, match=r"casts the whole model to it, the 2 frozen float32 tensors too \(lm.weight"):
        check_deepspeed_precision(model, "bf16")
    check_deepspeed_precision(model.to(torch.bfloat16), "bf16")

    config, bf16 = "deepspeed_zero3_cpu_2proc.yaml", ("--mixed-precision", "bf16", "--no-eval")

    frozen_in_bf16 = ("vision.dtype=bfloat16", "language_model.dtype=bfloat16")
    launch(world, tmp_path / "zero3", *frozen_in_bf16, *bf16, config=config, cwd=tmp_path)
    # the reference in a process of its own: this one's accelerator state is already fp32 (the other tests)
    one = tmp_path / "one"
    command = llava_command(world, "clip", one, *SMALL, *frozen_in_bf16, *bf16, recipe=LORA_RECIPE)
    script, env = str(ROOT / "scripts" / "train_vlm.py"), {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, script, *command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ours, alone = weights(tmp_path / "zero3"), weights(one)
    assert ours.keys() == alone.keys()
    for key in alone:
        assert ours[key].dtype == alone[key].dtype, key
    tower = [k for k in ours if k.startswith("vision_tower.")]
    assert tower and all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], alone[k]) for k in tower)
    adapter = [k for k in ours if k.startswith("adapter.")]
    assert adapter and all(ours[k].dtype == torch.float32 for k in adapter)
    for key in adapter:  # trained in bf16 on 2 processes and under autocast on one: close, not equal
        torch.testing.assert_close(ours[key], alone[key], atol=2e-2, rtol=2e-2, msg=key)


def test_a_classifier_recipe_under_zero3_trains_as_one_process(tmp_path):
    """The classifier recipe (also the VLM recipes' vision_pretrain stages) measures accuracy before and after each
    stage and hands the model on: on the gathered model, as one process."""
    data = write_image_folder(tmp_path / "images")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(data)))
    done = launch_two_processes("train_classifier.py", "--config", str(recipe), "--output-dir", str(tmp_path / "zero3"),
                                "--no-progress", cwd=tmp_path, config="deepspeed_zero3_cpu_2proc.yaml")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "DeepSpeed ZeRO-3: process 0 of 2 holds" in done.stderr
    run_recipe(ClassifierRecipe.from_json(recipe), str(tmp_path / "one"), progress_bar=False)
    assert_stages_match(tmp_path / "zero3", tmp_path / "one")
