"""Distributed training of the LLaVA recipe on 2 CPU processes: FSDP2 (torch's fully_shard, the loop's own
sharding), exact sharded resume, DDP resumed on another number of processes, and evaluation on every process."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.launch import launch_two_processes
from tests.real_path import build_world, llava_command
from vlm_vision.training.vlm_recipe import VLMRecipe

ROOT = Path(__file__).resolve().parent.parent
LORA_RECIPE = ROOT / "configs" / "vlm" / "llava_1_5_lora.json"
# the LoRA recipe, a few steps; LoRA dropout off so that 1 and 2 processes draw nothing differently
SMALL = (
    "stages.pretrain.max_steps=2",
    "stages.finetune.max_steps=3",
    "stages.finetune.per_device_batch_size=2",
    "stages.finetune.lora.lm.dropout=0",
    "data.num_workers=0",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("distributed"), num_images=120)


def train_vlm_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="train_vlm")["main"]


def launch(
    world, out: Path, *extra: str, config: str = "fsdp_cpu_2proc.yaml", cwd: Path, check: bool = True, **options
):
    done = launch_two_processes(
        "train_vlm.py", *llava_command(world, "clip", out, *SMALL, *extra, recipe=LORA_RECIPE), cwd=cwd, config=config,
        **options,
    )  # fmt: skip
    assert done.returncode == 0 or not check, done.stderr[-4000:]
    return done


def weights(run: Path, folder: str = "vlm") -> dict[str, torch.Tensor]:
    return load_file(run / folder / "model.safetensors")


def assert_same_weights(run: Path, reference: Path) -> None:
    """`run`'s final folder has the weights of `reference`'s (fp32 tolerance), with the LoRA merged."""
    ours, one = weights(run), weights(reference)
    assert ours.keys() == one.keys() and not any("lora_" in k for k in ours)
    for key in one:
        torch.testing.assert_close(ours[key], one[key], atol=2e-5, rtol=1e-4, msg=key)


def test_fsdp2_shards_trains_as_one_process_resumes_exactly_and_evaluates_on_every_process(world, tmp_path):
    data = world["data"]
    evaluation = (f"data.eval={data.finetune}", f"data.eval_image_folder={data.root}", "data.eval_subset=10")
    done = launch(world, tmp_path / "fsdp", *evaluation, "--save-every-steps", "2", cwd=tmp_path)
    # the parameters really are sharded: each process holds about half, the embedding table split by rows
    shards = re.findall(r"FSDP2: process (\d) of 2 holds (\d+) of (\d+) parameter values \((\S+): local \((\d+), 32\)"
                        r" of \((\d+), 32\)\)", done.stderr)  # fmt: skip
    assert sorted({s[0] for s in shards}) == ["0", "1"] and len(shards) == 4  # 2 stages x 2 processes
    for _, held, total, _, rows, all_rows in shards:
        assert 0.4 < int(held) / int(total) < 0.6 and int(rows) in (int(all_rows) // 2, int(all_rows) // 2 + 1)

    # the same weights as one process (the LoRA merged after the full weights were gathered)
    train_vlm_main()(llava_command(world, "clip", tmp_path / "one", *SMALL, *evaluation, recipe=LORA_RECIPE))
    assert_same_weights(tmp_path / "fsdp", tmp_path / "one")

    # the sharded checkpoint (torch distributed checkpoint, each process its shards) resumes exactly
    checkpoint = tmp_path / "fsdp" / "finetune" / "checkpoints" / "checkpoint-00000002"
    assert (checkpoint / "sharded_model_optimizer" / ".metadata").is_file()
    launch(world, tmp_path / "resumed", *evaluation, "--save-every-steps", "2", "--stop-after-steps", "2", cwd=tmp_path)
    assert not (tmp_path / "resumed" / "vlm").exists()
    launch(world, tmp_path / "resumed", *evaluation, "--save-every-steps", "2", "--resume", cwd=tmp_path)
    resumed, fsdp = weights(tmp_path / "resumed"), weights(tmp_path / "fsdp")
    for key in fsdp:
        assert torch.equal(resumed[key], fsdp[key]), key

    # every process answered its share: the gathered answers are those of the saved model answering alone
    from vlm_vision.evaluation.generation import evaluate_samples
    from vlm_vision.training.vlm_data import load_eval_samples

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "fsdp" / "vlm")  # reloads as any folder
    processor = AutoProcessor.from_pretrained(tmp_path / "fsdp" / "vlm")
    samples = load_eval_samples({"name": "llava", "eval": str(data.finetune), "eval_image_folder": str(data.root),
                                 "eval_subset": 10}, seed=42)  # fmt: skip
    # (process r answered samples r, r + 2, ...: the same batches here, so the same padding and the same answers)
    halves = [
        evaluate_samples(model, processor, samples[r::2], "exact_match", batch_size=32, max_new_tokens=128,
                         progress_bar=False)["predictions"]
        for r in (0, 1)
    ]  # fmt: skip
    alone = [None] * len(samples)
    alone[0::2], alone[1::2] = halves
    saved = json.loads((tmp_path / "fsdp" / "eval_predictions.json").read_text())["predictions"]
    assert [p["id"] for p in saved] == [s.id for s in samples]
    assert [p["prediction"] for p in saved] == alone
    evaluation = json.loads((tmp_path / "fsdp" / "results.json").read_text())["evaluation"]
    assert evaluation["num_samples"] + evaluation["num_unanswered"] == 10


def test_a_ddp_run_resumes_on_another_number_of_processes(world, tmp_path):
    """Saved on 2 processes, resumed on 1: the data order, the samples of each step, the model, optimizer and schedule
    continue exactly (dropout is off here; random draws made per process would not)."""
    launch(world, tmp_path / "run", "--save-every-steps", "1", "--stop-after-steps", "2", "--no-eval",
           config="cpu_2proc.yaml", cwd=tmp_path)  # fmt: skip
    main = train_vlm_main()
    # a changed recipe is refused, naming what changed
    changed = llava_command(world, "clip", tmp_path / "run", *SMALL, "stages.finetune.batch_size=16", "--resume",
                            "--no-eval", recipe=LORA_RECIPE)  # fmt: skip
    with pytest.raises(ValueError, match=r"another configuration:\n  args\.batch_size: saved 8, now 16\n"):
        main(changed)
    main(llava_command(world, "clip", tmp_path / "run", *SMALL, "--resume", "--no-eval", recipe=LORA_RECIPE))
    main(llava_command(world, "clip", tmp_path / "straight", *SMALL, "--no-eval", recipe=LORA_RECIPE))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "run")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=2e-5, rtol=1e-4, msg=key)


def test_an_fsdp_wrap_class_the_model_does_not_have(world, tmp_path, monkeypatch):
    from vlm_vision.training.distributed import FSDPSettings, shard

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer,BertLayer")
    settings = FSDPSettings.from_env()
    assert settings.wrap_classes == ("LlamaDecoderLayer", "BertLayer")
    from tests.conftest import tiny_config
    from vlm_vision import VisionTransformerModel

    model = VisionTransformerModel(tiny_config())
    wanted = r"names \['BertLayer', 'LlamaDecoderLayer'\], which are not classes of this"
    with pytest.raises(ValueError, match=wanted) as e:
        shard(model, settings)  # refused before anything is sharded: the error names the model's own layer classes
    assert "(the models' own layers: ['VisionTransformerEmbeddings', 'VisionTransformerLayer'])" in str(e.value)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="set fsdp_version: 2"):
        FSDPSettings.from_env()


def llava_recipe(*overrides: str):
    data = [f"stages.{s}.data.{k}=/data/{s}.{k}" for s in ("pretrain", "finetune") for k in ("train", "image_folder")]
    return VLMRecipe.from_json(LORA_RECIPE, [*data, *overrides], vision="/towers/clip", language_model="/lms/llama")


def test_the_deepspeed_stage_comes_from_the_launch_settings(monkeypatch, tmp_path):
    """Which ZeRO stage a launch runs, from the accelerate config's environment or a DeepSpeed JSON file."""
    from vlm_vision.training.distributed import deepspeed_zero_stage

    assert deepspeed_zero_stage() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert deepspeed_zero_stage() == 3

    # the stage may come from a DeepSpeed JSON file instead of the accelerate config
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert deepspeed_zero_stage() == 2
