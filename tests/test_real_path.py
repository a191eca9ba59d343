"""The real path: a Hub tower folder, a causal LM folder with its chat template and LLaVA-format data with bad files,
through the shipped LLaVA-1.5 recipe and the documented command (both stages), on 1 and 2 processes."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from tests.launch import launch_two_processes
from tests.real_path import (
    CHATML_TEMPLATE,
    LLAVA_RECIPE,
    build_world,
    corpus_of,
    llava_command,
    llava_expand2square,
    llava_recipe,
    write_lm_folder,
)
from vlm_vision import VisionLanguageForConditionalGeneration, VisionTransformerModel
from vlm_vision.data.images import load_image
from vlm_vision.training import vlm_parts, vlm_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("real"))


command = llava_command


def train_vlm_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="train_vlm")["main"]


def test_the_llava_recipe_trains_both_stages_on_a_hub_clip_folder(world, tmp_path, monkeypatch, capsys):
    data, out = world["data"], tmp_path / "run"
    trained_on, stage_starts = [], {}
    features = VisionLanguageForConditionalGeneration.get_image_features

    def recording_features(self, pixel_values):  # a spy: the images the VLM trains on
        if self.training:  # (not the blank image a text-only batch runs the tower on, for DDP)
            trained_on.extend(image for image in pixel_values.detach().cpu() if image.any())
        return features(self, pixel_values)

    loop_train = vlm_recipe.train

    def recording_train(model, dataset, args, *rest, **kwargs):  # a spy: each stage's adapter when it starts
        adapter = (model.get_base_model() if hasattr(model, "get_base_model") else model).adapter
        stage_starts[Path(args.output_dir).name] = {k: v.clone() for k, v in adapter.state_dict().items()}
        return loop_train(model, dataset, args, *rest, **kwargs)

    monkeypatch.setattr(VisionLanguageForConditionalGeneration, "get_image_features", recording_features)
    monkeypatch.setattr(vlm_recipe, "train", recording_train)
    evaluation = (f"data.eval={data.finetune}", f"data.eval_image_folder={data.root}", "data.eval_subset=12")
    train_vlm_main()(command(world, "clip", out, *evaluation))
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [(r["stage"], r["kind"]) for r in rows] == [("pretrain", "pretrain"), ("finetune", "finetune")]
    assert rows[0]["steps"] == 240 // 16 and rows[1]["steps"] == 120 // 8  # one epoch each

    # the bad files are skipped and reported by name, with their reason, in each stage's report and the log
    report = json.loads((out / "pretrain" / "data_report.json").read_text())
    skipped = {(s["file"], s["reason"]) for s in report["skipped"]}
    assert skipped == {(str(p), "missing_image") for p in data.missing} | {
        (str(p), "unreadable_image") for p in data.truncated
    }
    assert rows[0]["skipped_samples"] == len(data.missing) + len(data.truncated)
    log = (out / "train.log").read_text()
    assert f"stage pretrain skipped {rows[0]['skipped_samples']} samples" in log and data.missing[0].name in log
    assert re.search(r"vlm_vision.training.loop.progress: step 15/15 epoch 1 loss \d+\.\d{4} lr ", log)  # the curve
    finetune_report = json.loads((out / "finetune" / "data_report.json").read_text())
    in_mix = [e.get("image", []) for e in json.loads(data.finetune.read_text())]
    in_mix = {str(data.root / i) for images in in_mix for i in ([images] if isinstance(images, str) else images)}
    bad_in_mix = {str(p) for p in data.missing + data.truncated} & in_mix
    assert bad_in_mix and {s["file"] for s in finetune_report["skipped"]} == bad_in_mix

    # the pixel values trained on are the tower's own processor output (shortest edge, centre crop, OpenAI mean/std)
    # for a file, after LLaVA's pad-to-square with the processor's mean colour
    processor = AutoImageProcessor.from_pretrained(world["clip"])
    assert type(processor).__name__.startswith("CLIPImageProcessor")
    background = tuple(int(255 * c) for c in processor.image_mean)
    expected = torch.stack(
        [
            processor(images=[llava_expand2square(load_image(p), background)], return_tensors="pt")["pixel_values"][0]
            for p in data.good_images
        ]
    )
    assert len(trained_on) > 240
    for pixels in trained_on:
        assert (expected - pixels).abs().flatten(1).max(dim=1).values.min() < 1e-6

    # stage 2 starts from stage 1's projector; the tower is the CLIP tower, converted into ours, unchanged
    projector = load_file(out / "pretrain" / "projector" / "projector.safetensors")
    assert projector.keys() == stage_starts["finetune"].keys()
    for key, value in projector.items():
        assert torch.equal(stage_starts["finetune"][key], value), key
    assert not torch.equal(stage_starts["pretrain"]["linear_1.weight"], projector["linear_1.weight"])

    # the saved folders reload without the training code, with the tower's processor and the LM's template
    model = AutoModelForImageTextToText.from_pretrained(out / "vlm")
    saved = AutoProcessor.from_pretrained(out / "vlm")
    assert isinstance(model.vision_tower, VisionTransformerModel) and model.num_image_tokens == 16  # 4x4, no [CLS]
    assert saved.chat_template == CHATML_TEMPLATE and saved.image_aspect_ratio == "pad"
    assert saved.image_processor.to_dict() == processor.to_dict()
    prompt = saved.prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
    inputs = saved(images=[load_image(data.good_images[0])], text=prompt, add_special_tokens=False)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    for stage in ("pretrain", "finetune"):
        assert AutoModelForImageTextToText.from_pretrained(out / stage / "model").num_image_tokens == 16
    # the end-of-run evaluation on LLaVA data (first answers, exact match), labelled with its file, and the script
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"]["data"] == str(data.finetune) and results["seed"] == 42
    assert results["evaluation"]["num_samples"] + results["evaluation"]["num_unanswered"] == 12
    assert f"{data.finetune} (" in printed and "easy-VQA" not in printed
    assert len(json.loads((out / "eval_predictions.json").read_text())["predictions"]) == 12
    evaluate = runpy.run_path(str(ROOT / "scripts" / "evaluate_vlm.py"), run_name="evaluate_vlm")["main"]
    report = tmp_path / "eval.json"
    evaluate([str(out / "vlm"), "--llava", str(data.finetune), "--images", str(data.root), "--limit", "6",
              "--max-new-tokens", "5", "--batch-size", "4", "--no-progress-bar", "--output", str(report)])  # fmt: skip
    report = json.loads(report.read_text())
    assert report["num_samples"] + report["num_unanswered"] == 6 and len(report["predictions"]) == 6
    # stage 1 trained only the projector; stage 2 the projector and the whole LM
    first, second = (
        load_file(out / "pretrain" / "model" / "model.safetensors"),
        load_file(out / "vlm" / "model.safetensors"),
    )
    lm_keys = [k for k in second if k.startswith("language_model.")]
    assert all(torch.equal(first[k], second[k]) for k in second if k.startswith("vision_tower."))
    assert sum(not torch.equal(first[k], second[k]) for k in lm_keys) > len(lm_keys) // 2


@pytest.mark.parametrize("tower, convert, prefix", [("siglip", True, 0), ("dinov2", False, 1)])
def test_siglip_and_dinov2_folders_with_their_processors(world, tmp_path, tower, convert, prefix, monkeypatch):
    """A SigLIP tower (no [CLS]) converted into ours, and a DINOv2 tower kept as transformers' class, with their
    images squashed/cropped by their own processors (no padding)."""
    trained_on = []
    features = VisionLanguageForConditionalGeneration.get_image_features

    def recording_features(self, pixel_values):
        if self.training:
            trained_on.extend(image for image in pixel_values.detach().cpu() if image.any())
        return features(self, pixel_values)

    monkeypatch.setattr(VisionLanguageForConditionalGeneration, "get_image_features", recording_features)
    out = tmp_path / tower
    train_vlm_main()(
        command(
            world, tower, out, f"vision.convert={json.dumps(convert)}", "vision.image_aspect_ratio=squash",
            "stages.pretrain.max_steps=2", "stages.finetune.max_steps=2",
        )
    )  # fmt: skip
    processor = AutoImageProcessor.from_pretrained(world[tower])
    expected = torch.stack(
        [processor(images=[load_image(p)], return_tensors="pt")["pixel_values"][0] for p in world["data"].good_images]
    )
    assert trained_on
    for pixels in trained_on:
        assert (expected - pixels).abs().flatten(1).max(dim=1).values.min() < 1e-6
    model = AutoModelForImageTextToText.from_pretrained(out / "vlm")
    assert isinstance(model.vision_tower, VisionTransformerModel) == convert
    assert model.config.prefix_tokens == prefix and model.num_image_tokens == 16  # patch tokens only


def test_two_processes_train_the_llava_recipe_as_one(world, tmp_path):
    extra = ("stages.pretrain.max_steps=3", "stages.finetune.max_steps=3", "stages.finetune.per_device_batch_size=2")
    done = launch_two_processes("train_vlm.py", *command(world, "clip", tmp_path / "two", *extra), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes x 2 per device x 2 accumulation" in done.stderr  # finetune: 8 = 2 x 2 x 2
    # one process, no accumulation in the finetune stage (8 per device): the same gradients, token for token
    train_vlm_main()(command(world, "clip", tmp_path / "one", *extra[:2], "stages.finetune.per_device_batch_size=8"))
    one, two = (load_file(tmp_path / run / "vlm" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)


def test_the_plain_template_supervises_the_caption_only(world):
    from vlm_vision.data.dataset import VLMDataset
    from vlm_vision.data.index import JsonIndex
    from vlm_vision.vlm.processing_vlm import PLAIN_CHAT_TEMPLATE

    _, processor = vlm_parts.build_vlm(llava_recipe(world), None, Path("unused"))
    index = JsonIndex(world["data"].pretrain, world["data"].root)
    item = VLMDataset(index, processor, chat_template=PLAIN_CHAT_TEMPLATE)[0]
    ids, labels = item["encoded"]["input_ids"], item["encoded"]["labels"]
    n = processor.num_image_tokens
    assert ids[:n] == [processor.image_token_id] * n  # the image first: no system prompt, no question, no markup
    caption = index.entry(0)["conversations"][1]["value"]
    supervised = processor.tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
    assert supervised == caption + processor.tokenizer.eos_token
    assert processor.tokenizer.decode(ids[n:]) == caption + processor.tokenizer.eos_token


# ---- bad input, each with the problem and the fix named ------------------------------------------------------


def test_bad_towers(world, tmp_path):
    from vlm_vision.vlm.towers import load_vision_tower

    unknown = tmp_path / "bert"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"vision towers of type 'bert' are not supported.*Supported: \["):
        load_vision_tower(unknown)
    bare = tmp_path / "bare-clip"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((world["clip"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json.*--image-processor FOLDER"):
        load_vision_tower(bare)
    _tower, processor = load_vision_tower(bare, image_processor=world["clip"])  # the fix: the processor from elsewhere
    assert processor.crop_size == {"height": 28, "width": 28}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vision_tower(tmp_path / "nowhere")


def test_bad_recipes_and_flags(world, tmp_path):
    main = train_vlm_main()
    with pytest.raises(ValueError, match=r"needs vision\.path.*pass --vision FOLDER"):
        main(["--recipe", str(LLAVA_RECIPE)])
    with pytest.raises(ValueError, match=r"no data\.train: pass --set stages\.pretrain\.data\.train=PATH"):
        main(["--recipe", str(LLAVA_RECIPE), "--vision", str(world["clip"]), "--lm", str(world["lm"])])
    with pytest.raises(ValueError, match=r"unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        main(command(world, "clip", tmp_path / "x", "stages.finetune.batch_sise=8"))
    with pytest.raises(ValueError, match=r"vision: unknown key 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        main(["--set", "vision.hiden_size=64"])  # the built-in recipe's fresh tower
    with pytest.raises(ValueError, match=r"--set stages\.nope: no element 'nope'; name one of \["):
        main(["--set", "stages.nope.batch_size=8"])
    with pytest.raises(ValueError, match=r"write dotted\.key=value"):
        main(["--set", "seed"])
    broken = tmp_path / "broken.json"
    broken.write_text(LLAVA_RECIPE.read_text()[:200])
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON .*check the file is complete"):
        main(["--recipe", str(broken)])


def test_an_lm_without_a_chat_template_needs_one(world, tmp_path):
    plain_lm = write_lm_folder(tmp_path / "base-lm", corpus_of(world["data"]), chat_template=None)
    with pytest.raises(ValueError, match=r"base-lm has no chat template\. Pass one: --chat-template NAME"):
        train_vlm_main()(command(world, "clip", tmp_path / "run", lm=plain_lm))
    # the fix: name one; the run then gets past building the parts (a bad path raises in the data, after them)
    fixed = command(world, "clip", tmp_path / "run", "stages.pretrain.data.train=none.json", lm=plain_lm)
    with pytest.raises(FileNotFoundError, match=r"Data file none\.json does not exist"):
        train_vlm_main()([*fixed, "--chat-template", "user_assistant"])


def test_image_tokens_that_do_not_fit_max_length(world, tmp_path):
    with pytest.raises(ValueError, match=r"One image takes 16 tokens .* max_length=16: raise max_length"):
        train_vlm_main()(command(world, "clip", tmp_path / "run", "max_length=16"))


def test_init_from_a_stage_that_has_not_run_or_a_projector_of_another_shape(world, tmp_path):
    main = train_vlm_main()
    with pytest.raises(ValueError, match=r"init_from='finetune' names a stage that runs at or after it"):
        main(command(world, "clip", tmp_path / "a", "stages.pretrain.init_from=finetune"))
    with pytest.raises(FileNotFoundError, match=r"init_from='nowhere' is neither a stage of this recipe"):
        main(command(world, "clip", tmp_path / "b", "stages.pretrain.init_from=nowhere"))
    # a projector saved for another tower width
    from vlm_vision.adapters import build_adapter

    other = tmp_path / "other-projector"
    build_adapter({"adapter_type": "mlp", "vision_hidden_size": 48, "text_hidden_size": 32}).save_pretrained(other)
    with pytest.raises(ValueError, match=r"the adapter in .*other-projector \(mlp\) does not fit this recipe's"):
        main(command(world, "clip", tmp_path / "c", f"stages.pretrain.init_from={other}"))
    # init_from a stage whose result is missing (the run was resumed elsewhere)
    with pytest.raises(FileNotFoundError, match=r"init_from='pretrain', but that stage has no saved result"):
        vlm_recipe.initialise_from(
            vlm_recipe._Run(llava_recipe(world), tmp_path / "d", {}),
            llava_recipe(world, "stages.finetune.init_from=pretrain").stages[1],
        )


def test_a_data_file_of_another_format(world, tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match=r"captions\.json holds a JSON object, not a list of entries"):
        train_vlm_main()(command(world, "clip", tmp_path / "a", f"stages.pretrain.data.train={coco}"))
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([{"question_id": 1, "question": "what?", "image_id": 3}] * 20))
    with pytest.raises(ValueError, match=r"questions\.json does not read as a LLaVA conversation file"):
        train_vlm_main()(command(world, "clip", tmp_path / "b", f"stages.pretrain.data.train={questions}"))


def test_parquet_and_saved_datasets_train_like_the_json_file(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    from vlm_vision.data.index import JsonIndex, RowsIndex, open_llava_index

    entries = [e for e in json.loads(world["data"].finetune.read_text()) if not isinstance(e.get("image"), list)]
    rows = datasets.Dataset.from_list(entries)  # Arrow: "image" is null for the text-only entries
    rows.to_parquet(tmp_path / "mix.parquet")
    rows.save_to_disk(tmp_path / "mix-arrow")
    (tmp_path / "mix.json").write_text(json.dumps(entries))
    root = world["data"].root
    reference = JsonIndex(tmp_path / "mix.json", root)
    for source in (tmp_path / "mix.parquet", tmp_path / "mix-arrow"):
        index = open_llava_index(source, root)
        assert isinstance(index, RowsIndex) and len(index) == len(reference)
        assert all(index.sample(i) == reference.sample(i) for i in range(len(index)))  # text-only ones too
        assert (index.length_estimates()[1] == reference.length_estimates()[1]).all()
    out = tmp_path / "run"
    train_vlm_main()(
        command(
            world, "clip", out, f"stages.finetune.data.train={tmp_path / 'mix.parquet'}", "stages.pretrain.max_steps=1"
        )
    )
    finetune = json.loads((out / "results.json").read_text())["stages"][1]
    assert finetune["steps"] == len(entries) // 8
    bad = {str(p) for p in world["data"].missing + world["data"].truncated}
    skipped = json.loads((out / "finetune" / "data_report.json").read_text())["skipped"]
    assert skipped and all(s["file"] in bad for s in skipped)  # only the bad files, no text-only entry


@pytest.fixture
def fresh_accelerator_state():
    """accelerate fixes the mixed precision once per process: a bf16 run inside this test process needs its state
    reset before (earlier tests ran fp32) and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_lora_recipe_with_bf16_weights_checkpointing_and_length_grouping(
    world, tmp_path, monkeypatch, fresh_accelerator_state
):
    seen = {}
    loop_train = vlm_recipe.train

    def recording_train(model, dataset, args, *rest, **kwargs):  # a spy: what each stage trains, and how
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen[Path(args.output_dir).name] = {
            "trainable_dtypes": {p.dtype for p in model.parameters() if p.requires_grad},
            "frozen_lm_dtypes": {p.dtype for p in base.language_model.parameters() if not p.requires_grad},
            "checkpointing": (
                base.language_model.is_activation_checkpointing,
                base.vision_tower.is_activation_checkpointing,
            ),
            "lengths": kwargs.get("lengths"),
            "attention": base.vision_tower.config._attn_implementation,
        }
        return loop_train(model, dataset, args, *rest, **kwargs)

    monkeypatch.setattr(vlm_recipe, "train", recording_train)
    out = tmp_path / "lora"
    args = command(
        world, "clip", out, "language_model.dtype=bfloat16", "vision.gradient_checkpointing=true",
        "vision.attn_implementation=eager", "stages.pretrain.max_steps=2", "stages.finetune.max_steps=3",
    )  # fmt: skip
    train_vlm_main()(
        [*args, "--recipe", str(ROOT / "configs" / "vlm" / "llava_1_5_lora.json"), "--mixed-precision", "bf16"]
    )
    finetune = seen["finetune"]
    assert finetune["trainable_dtypes"] == {torch.float32}  # LoRA and the projector in fp32 under bf16 autocast
    assert finetune["frozen_lm_dtypes"] == {torch.bfloat16}
    assert finetune["checkpointing"] == (True, True)
    assert finetune["lengths"] is not None and seen["pretrain"]["lengths"] is None  # group_by_length in finetune only
    lora = json.loads((out / "lora" / "finetune" / "adapter_config.json").read_text())
    assert lora["r"] == 128 and lora["lora_alpha"] == 256 and "language_model" in lora["target_modules"]
    assert "vision_tower" not in lora["target_modules"]
    merged = load_file(out / "vlm" / "model.safetensors")
    assert not any("lora_" in key for key in merged)
    assert finetune["attention"] == "eager"  # a run-time choice: transformers does not save it in config.json


def test_length_grouped_batches_hold_similar_lengths_and_one_modality():
    from vlm_vision.training.loop import EpochSampler

    lengths = [(i * 37) % 101 for i in range(50)]
    images = [i % 3 != 0 for i in range(50)]
    sampler = EpochSampler(50, seed=1, lengths=lengths, modalities=images, group_size=8)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and order == list(sampler)  # a permutation, the same every time
    groups = [order[i : i + 8] for i in range(0, 48, 8)]
    full = [g for g in groups if len({images[i] for i in g}) == 1]
    assert len(full) >= 4  # all but the leftovers hold one modality
    for group in full:
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != order
