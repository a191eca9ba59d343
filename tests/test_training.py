"""The training library: optimizer groups and schedule, the accelerate loop, atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerForImageClassification
from vlm_vision.training import (
    DamagedCheckpointError,
    EpochSampler,
    OptimizerConfig,
    TrainerState,
    TrainingArguments,
    assign_parts,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    decays,
    find_latest_checkpoint,
    load_state,
    make_accelerator,
    resolve_resume,
    save_state_atomically,
    train,
)


class RandomImages(torch.utils.data.Dataset):
    """Fixed random 8x8 images with 3 labels; records the epochs it is told about."""

    def __init__(self, num_samples: int = 24):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(num_samples, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (num_samples,), generator=generator)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def tiny_classifier(**overrides) -> VisionTransformerForImageClassification:
    torch.manual_seed(0)
    fields = dict(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        classifier_head="mlp",
    )
    return VisionTransformerForImageClassification(tiny_config(**{**fields, **overrides}))


def run(tmp_path, name, **overrides):
    fields = dict(output_dir=str(tmp_path / name), num_epochs=2, batch_size=4, progress_bar=False, seed=3)
    args = TrainingArguments(**{**fields, **overrides})
    model = tiny_classifier(hidden_dropout_prob=0.1)  # dropout: the resume must restore the RNG too
    return train(model, RandomImages(), args, OptimizerConfig(learning_rate=3e-3, warmup_steps=2))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# optim
# ---------------------------------------------------------------------------------------------------------------------


def test_weight_decay_only_on_weight_matrices():
    model = tiny_classifier(num_register_tokens=1)
    decay = decays(model)
    assert decay["vit.layers.0.attention.q_proj.weight"] and decay["vit.layers.0.mlp.fc1.weight"]
    assert decay["vit.embeddings.patch_embeddings.projection.weight"]  # a Conv2d is a weight matrix
    assert decay["classifier.weight"] and decay["pre_logits.0.weight"]
    for name in (
        "vit.embeddings.position_embeddings",
        "vit.embeddings.cls_token",
        "vit.embeddings.register_tokens",
        "vit.layers.0.layernorm_before.weight",
        "vit.layers.0.attention.q_proj.bias",
        "classifier.bias",
    ):
        assert not decay[name], name

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"proj.weight"}

    assert decays(WithTable()) == {"embed_tokens.weight": False, "proj.weight": False, "proj.bias": False}


def test_parts_longest_pattern_wins_and_groups_carry_their_rates():
    model = tiny_classifier()
    parts = {"vision": "vit", "attention": "vit.*attention*", "head": ["classifier", "pre_logits"]}
    part_of = assign_parts(model, parts)
    assert part_of["vit.layers.0.attention.k_proj.weight"] == "attention"
    assert part_of["vit.layers.0.mlp.fc2.weight"] == "vision"
    assert part_of["pre_logits.0.bias"] == "head"
    model.vit.embeddings.requires_grad_(False)
    config = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, parts=parts, learning_rates={"head": 5e-3})
    groups = {g["name"]: g for g in build_param_groups(model, config)}
    assert groups["head/decay"]["lr"] == 5e-3 and groups["vision/decay"]["lr"] == 1e-3
    assert groups["vision/no_decay"]["weight_decay"] == 0.0 and groups["attention/decay"]["weight_decay"] == 0.1
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}  # every trainable one, frozen left out
    assert not any(id(p) in grouped for p in model.vit.embeddings.parameters())


def test_parts_errors_name_the_problem():
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"'visoin'.*match no parameter"):
        assign_parts(model, {"visoin": "visoin"})
    with pytest.raises(ValueError, match="equally"):
        assign_parts(model, {"a": "vit", "b": "vit"})
    with pytest.raises(ValueError, match="learning_rates names parts \\['lm'\\]"):
        OptimizerConfig(learning_rates={"lm": 1e-4})
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model, OptimizerConfig())


def test_cosine_schedule_with_warmup_per_group():
    model = tiny_classifier()
    config = OptimizerConfig(
        learning_rate=1e-2, warmup_steps=4, parts={"head": "classifier"}, learning_rates={"head": 1e-1}
    )
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, num_training_steps=12)
    rates = []
    for _ in range(12):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    head = next(i for i, g in enumerate(optimizer.param_groups) if g["name"].startswith("head"))
    other = (
        1 - head
        if len(optimizer.param_groups) == 2
        else next(i for i, g in enumerate(optimizer.param_groups) if not g["name"].startswith("head"))
    )
    assert rates[0][head] == 0.0 and rates[2][head] == pytest.approx(0.05)  # linear warm-up
    assert rates[4][head] == pytest.approx(0.1) and rates[4][other] == pytest.approx(0.01)  # peak
    assert rates[8][head] == pytest.approx(0.05)  # cosine half-way
    assert [g["lr"] for g in optimizer.param_groups][head] == pytest.approx(0.0)


def _rates(config: OptimizerConfig, steps: int) -> list[float]:
    optimizer = build_optimizer(tiny_classifier(), config)
    scheduler = build_scheduler(optimizer, config, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_other_schedules_by_transformers_name():
    constant = _rates(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, lr_scheduler_type="constant_with_warmup"), 10)
    assert constant[:3] == pytest.approx([0.0, 5e-3, 1e-2]) and constant[-1] == pytest.approx(1e-2)
    # warm-up 2, stable until the last 4 steps (decay_ratio 0.4 of 10), then cosine to 0.
    wsd = _rates(
        OptimizerConfig(
            learning_rate=1e-2,
            warmup_steps=2,
            lr_scheduler_type="warmup_stable_decay",
            lr_scheduler_kwargs={"decay_ratio": 0.4},
        ),
        10,
    )
    reference = _rates(
        OptimizerConfig(
            learning_rate=1e-2,
            warmup_steps=2,
            lr_scheduler_type="warmup_stable_decay",
            lr_scheduler_kwargs={"num_decay_steps": 4},
        ),
        10,
    )
    assert wsd == reference
    assert wsd[2:6] == pytest.approx([1e-2] * 4) and 0 < wsd[7] < 1e-2 and wsd[-1] < wsd[7]
    floor = _rates(
        OptimizerConfig(
            learning_rate=1e-2,
            warmup_steps=0,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
        ),
        10,
    )
    assert min(floor) >= 1e-3 - 1e-12 and floor[0] == pytest.approx(1e-2)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"lr_scheduler_type": "cosine_decay"}, "not a schedule this loop can run; use one of"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "not a schedule this loop can run"),
        ({"lr_scheduler_type": "warmup_stable_decay"}, "set exactly one of lr_scheduler_kwargs.decay_ratio"),
    ],
)
def test_schedule_refusals(fields, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**fields)


def test_schedule_arguments_that_do_not_fit_are_named():
    config = OptimizerConfig(lr_scheduler_type="linear", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    with pytest.raises(ValueError, match="do not fit lr_scheduler_type='linear'"):
        build_scheduler(build_optimizer(tiny_classifier(), config), config, num_training_steps=10)


# ---------------------------------------------------------------------------------------------------------------------
# loop and data order
# ---------------------------------------------------------------------------------------------------------------------


def test_epoch_sampler_is_seeded_per_epoch_and_skips_once():
    sampler = EpochSampler(10, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.skip(4)
    sampler.set_epoch(1)  # accelerate calls set_epoch again before iterating: the skip stays
    assert list(sampler) == second[4:]
    assert list(sampler) == second  # only the next pass skips


def test_batch_size_must_split_over_processes_and_accumulation(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        run(tmp_path, "bad", batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(tmp_path, "small", batch_size=32)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingArguments(mixed_precision="fp8")


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    whole = run(tmp_path, "whole", batch_size=8, max_steps=3)
    accumulated = run(tmp_path, "accumulated", batch_size=8, gradient_accumulation_steps=2, max_steps=3)
    assert accumulated.state.global_step == whole.state.global_step == 3
    start = params(tiny_classifier())
    moved = max((whole.model.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    # dropout draws differ between 1 x 8 and 2 x 4 samples: compare without it
    a = train(
        tiny_classifier(),
        RandomImages(),
        TrainingArguments(output_dir=str(tmp_path / "a"), batch_size=8, max_steps=3, progress_bar=False),
        OptimizerConfig(learning_rate=3e-3),
    )
    b = train(
        tiny_classifier(),
        RandomImages(),
        TrainingArguments(
            output_dir=str(tmp_path / "b"), batch_size=8, max_steps=3, gradient_accumulation_steps=2, progress_bar=False
        ),
        OptimizerConfig(learning_rate=3e-3),
    )
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_stop_and_resume_gives_the_uninterrupted_weights(tmp_path):
    uninterrupted = run(tmp_path, "full")
    assert uninterrupted.num_training_steps == 12 and uninterrupted.finished

    stopped = run(tmp_path, "resumed", save_every_steps=4, stop_after_steps=7)  # "killed" mid-epoch 2
    assert not stopped.finished and stopped.state.global_step == 7
    checkpoint = find_latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    assert checkpoint.name == "checkpoint-00000007"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (saved["global_step"], saved["epoch"], saved["batches_in_epoch"]) == (7, 1, 1)
    differs = any(
        not torch.equal(v, uninterrupted.model.state_dict()[k]) for k, v in stopped.model.state_dict().items()
    )
    assert differs  # 5 steps are still to go

    resumed = run(tmp_path, "resumed", save_every_steps=4, resume="latest")
    assert resumed.finished and resumed.state.global_step == 12
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)

    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path, "resumed", save_every_steps=4, resume="latest", batch_size=8)


def test_a_checkpoint_from_before_a_field_existed_resumes_at_its_default(tmp_path):
    """A field added to the package since a checkpoint was written (its default keeps the old behaviour) does not
    block the resume while it is at its default; set to something else, it is named like any change."""
    uninterrupted = run(tmp_path, "full")
    run(tmp_path, "old", save_every_steps=4, stop_after_steps=7)
    state_file = find_latest_checkpoint(tmp_path / "old" / "checkpoints") / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    for key in ("lr_scheduler_type", "lr_scheduler_kwargs"):  # as written before the schedule became a setting
        del saved["config"]["optimizer"][key]
    state_file.write_text(json.dumps(saved))
    resumed = run(tmp_path, "old", save_every_steps=4, resume="latest")
    assert resumed.finished
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)

    run(tmp_path, "old2", save_every_steps=4, stop_after_steps=7)
    state_file = find_latest_checkpoint(tmp_path / "old2" / "checkpoints") / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    del saved["config"]["optimizer"]["lr_scheduler_type"]
    state_file.write_text(json.dumps(saved))
    args = TrainingArguments(
        output_dir=str(tmp_path / "old2"), num_epochs=2, batch_size=4, progress_bar=False, seed=3, resume="latest"
    )
    optimizer = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match=r"optimizer\.lr_scheduler_type: saved \(absent\), now 'linear'"):
        train(tiny_classifier(hidden_dropout_prob=0.1), RandomImages(), args, optimizer)


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    accelerator = make_accelerator(TrainingArguments(output_dir=str(tmp_path)))
    model = accelerator.prepare(nn.Linear(2, 2))
    checkpoints = tmp_path / "checkpoints"
    save_state_atomically(accelerator, checkpoints, TrainerState(global_step=5))

    def killed_while_writing(output_dir, **kwargs):
        (torch.save(model.state_dict(), f"{output_dir}/model.bin"))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(accelerator, "save_state", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_state_atomically(accelerator, checkpoints, TrainerState(global_step=10))
    assert (checkpoints / ".checkpoint-00000010.tmp" / "model.bin").is_file()
    assert not (checkpoints / "checkpoint-00000010").exists()
    assert find_latest_checkpoint(checkpoints).name == "checkpoint-00000005"
    assert resolve_resume("latest", checkpoints).name == "checkpoint-00000005"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(checkpoints / ".checkpoint-00000010.tmp", checkpoints)

    monkeypatch.undo()
    save_state_atomically(accelerator, checkpoints, TrainerState(global_step=10), keep_last=1)
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-00000010"]  # stale .tmp replaced, old pruned


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")


@pytest.mark.parametrize("how", ["truncated", "empty"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(tmp_path, caplog, name, how):
    accelerator = make_accelerator(TrainingArguments(output_dir=str(tmp_path)))
    model = nn.Linear(2, 2)
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    checkpoints = tmp_path / "checkpoints"
    for step in (5, 10):
        save_state_atomically(accelerator, checkpoints, TrainerState(global_step=step))
    newest = checkpoints / "checkpoint-00000010"
    damage(newest / name, how)  # accelerate itself loads a truncated random_states_0.pkl without a word

    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", checkpoints).name == "checkpoint-00000005"
    assert "newest intact checkpoint" in caplog.text and f"checkpoint-00000010: {name}" in caplog.text
    for call in (lambda: resolve_resume(newest, checkpoints), lambda: load_state(accelerator, newest)):
        with pytest.raises(
            DamagedCheckpointError, match=re.escape(f"Cannot resume from {newest}: {name} is")
        ) as caught:
            call()
        assert "--resume latest takes the newest intact one" in str(caught.value)
    assert load_state(accelerator, checkpoints / "checkpoint-00000005").global_step == 5

    damage(checkpoints / "checkpoint-00000005" / name, how)
    with pytest.raises(DamagedCheckpointError, match=r"Every checkpoint in .* is damaged: checkpoint-00000010"):
        resolve_resume("latest", checkpoints)


def test_a_run_resumes_exactly_from_the_newest_intact_checkpoint(tmp_path):
    uninterrupted = run(tmp_path, "full")
    run(tmp_path, "resumed", save_every_steps=4, stop_after_steps=7)  # checkpoints at steps 4 and 7
    damage(tmp_path / "resumed" / "checkpoints" / "checkpoint-00000007" / "optimizer.bin", "truncated")
    resumed = run(tmp_path, "resumed", save_every_steps=4, resume="latest")
    assert resumed.finished and resumed.state.global_step == 12
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_the_result_carries_the_gathered_state_dict_the_saves_write(tmp_path):
    """`TrainResult.state_dict` is accelerate's `get_state_dict` of the trained model (what the recipe runner saves
    from: under ZeRO-3 the module's own weights are partitioned); on one process it is the module's, and a folder
    saved from it reloads to the trained weights."""
    result = run(tmp_path, "run", max_steps=2)
    trained = result.model.state_dict()
    assert result.state_dict.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(result.state_dict[key], value), key
    result.model.save_pretrained(tmp_path / "saved", state_dict=result.state_dict)
    reloaded = VisionTransformerForImageClassification.from_pretrained(tmp_path / "saved").state_dict()
    assert reloaded.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(reloaded[key], value), key
    assert any(not torch.equal(v, tiny_classifier().state_dict()[k]) for k, v in trained.items())  # it trained


def test_a_checkpoint_without_a_recorded_recipe_resumes_and_one_with_it_names_the_changes(tmp_path, caplog):
    def attempt(name, extra, **overrides):
        fields = dict(output_dir=str(tmp_path / name), max_steps=4, batch_size=4, progress_bar=False, seed=3)
        args = TrainingArguments(**{**fields, **overrides})
        optimizer = OptimizerConfig(learning_rate=3e-3)
        return train(tiny_classifier(), RandomImages(), args, optimizer, fingerprint_extra=extra)

    # saved before runs recorded their recipe (an older version): resumed, with a warning that it wasn't checked
    attempt("old", {"stage": "s"}, save_every_steps=2, stop_after_steps=2)
    with caplog.at_level(logging.WARNING):
        resumed = attempt("old", {"stage": "s", "recipe": {"max_length": 256}}, resume="latest")
    assert resumed.finished and "saved before runs recorded their recipe" in caplog.text
    # saved with its recipe: a changed field is named
    attempt("new", {"stage": "s", "recipe": {"max_length": 256}}, save_every_steps=2, stop_after_steps=2)
    with pytest.raises(ValueError, match=r"another configuration:\n  recipe\.max_length: saved 256, now 200\n"):
        attempt("new", {"stage": "s", "recipe": {"max_length": 200}}, resume="latest")
