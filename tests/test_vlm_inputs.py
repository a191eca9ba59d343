"""The VLM side of bad input: strict weight loading, wrong pixel values and token ids, chat messages in transformers'
content-list form, processors without a tokenizer, misspelt roles and null answers, LLaVA's config names."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tests.vlm_helpers import build_vlm, shapes_image, vqa
from vlm_vision import VisionLanguageForConditionalGeneration
from vlm_vision.encoder.modeling_vit import CheckpointFileError, CheckpointMismatchError


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def vlm(tokenizer):
    return build_vlm(tokenizer)


@pytest.fixture
def saved_vlm(vlm, tmp_path):
    model, _ = vlm
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    return model, folder


# ---- 1. strict loading -------------------------------------------------------------------------------------------


def test_a_checkpoint_missing_weights_is_refused_listing_them(saved_vlm):
    model, folder = saved_vlm
    weights = load_file(folder / "model.safetensors")
    dropped = ["adapter.linear_2.weight", "vision_tower.layers.0.attention.q_proj.weight"]
    assert all(key in weights for key in dropped)
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors")

    with pytest.raises(CheckpointMismatchError, match="allow_missing_keys=True") as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ValueError)
    assert all(key in str(caught.value) for key in dropped) and str(folder) in str(caught.value)

    loaded = VisionLanguageForConditionalGeneration.from_pretrained(folder, allow_missing_keys=True)
    kept = "adapter.linear_1.weight"
    assert torch.equal(loaded.state_dict()[kept], model.state_dict()[kept])
    with pytest.raises(TypeError, match="allow_missing_keys must be True or False"):
        VisionLanguageForConditionalGeneration.from_pretrained(folder, allow_missing_keys="yes")


def test_weights_of_another_shape_are_all_listed(saved_vlm):
    _, folder = saved_vlm
    weights = load_file(folder / "model.safetensors")
    resized = ["adapter.linear_1.weight", "vision_tower.layers.1.mlp.fc1.weight"]
    for key in resized:
        weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, folder / "model.safetensors")

    with pytest.raises(CheckpointMismatchError) as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert all(key in message for key in resized) and "ignore_mismatched_sizes=True" in message


@pytest.mark.parametrize("size", ["truncated", "empty"])
def test_a_damaged_weight_file_is_named(saved_vlm, size):
    _, folder = saved_vlm
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if size == "truncated" else b"")

    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as caught:
        VisionLanguageForConditionalGeneration.from_pretrained(folder)
    assert str(path) in str(caught.value) and isinstance(caught.value, OSError)


# ---- 2. pixel values and token ids that aren't the processor's ---------------------------------------------------


@pytest.fixture
def batch(vlm):
    _, processor = vlm
    return processor(images=[shapes_image(0)], text="<image>\nwhat is the blue shape?")


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: p.numpy(), TypeError, "got numpy.ndarray"),
        (lambda p: [p[0]], TypeError, "got builtins.list"),
        (lambda p: (p * 60 + 120).clamp(0, 255).to(torch.uint8), TypeError, "dtype torch.uint8"),
        (lambda p: p.long(), TypeError, "dtype torch.int64"),
        (lambda p: p[0], ValueError, r"pixel_values\[None\]"),
    ],
    ids=["numpy", "list", "uint8", "int64", "3-d"],
)
def test_pixel_values_the_processor_would_not_make_are_refused(vlm, batch, make, error, words):
    model, _ = vlm
    with pytest.raises(error, match=words) as caught:
        model(input_ids=batch["input_ids"], pixel_values=make(batch["pixel_values"]))
    assert error is ValueError or "VisionLanguageProcessor" in str(caught.value)
    with pytest.raises(error, match=words):  # generate reaches the same check
        model.generate(input_ids=batch["input_ids"], pixel_values=make(batch["pixel_values"]), max_new_tokens=2)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda ids: ids.numpy(), TypeError, "got numpy.ndarray"),
        (lambda ids: ids.float(), TypeError, "torch.float32"),
        (lambda ids: ids[0], ValueError, r"input_ids\[None\]"),
    ],
    ids=["numpy", "float", "1-d"],
)
def test_input_ids_that_are_not_integer_batches_are_refused(vlm, batch, make, error, words):
    model, _ = vlm
    with pytest.raises(error, match=words):
        model(input_ids=make(batch["input_ids"]), pixel_values=batch["pixel_values"])


def test_image_index_and_vision_features_that_are_not_tensors_are_refused(vlm, batch):
    model, _ = vlm
    features = model.vision_features(batch["pixel_values"]).detach()
    with pytest.raises(ValueError, match=r"image_index must be a 1-D integer tensor .*got numpy\.ndarray"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_index=np.zeros(1, np.int64))
    with pytest.raises(TypeError, match=r"vision_features must be a float torch\.Tensor .*got numpy\.ndarray"):
        model(input_ids=batch["input_ids"], vision_features=features.numpy())
    with pytest.raises(TypeError, match=r"got a torch\.int64 tensor"):
        model(input_ids=batch["input_ids"], vision_features=features.long())
    assert torch.allclose(
        model(input_ids=batch["input_ids"], vision_features=features).logits, model(**batch).logits, atol=1e-5
    )


def test_the_processors_batch_still_runs(vlm, batch):
    model, processor = vlm
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))


# ---- 3. transformers' content-list messages ----------------------------------------------------------------------


def content_list(question: str, answer: str | None = None, image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def test_apply_chat_template_takes_content_lists_as_string_messages(vlm):
    _, processor = vlm
    image = shapes_image(1)
    text = processor.apply_chat_template(content_list("what is the blue shape?"), add_generation_prompt=True)
    assert text == processor.prompt(vqa("what is the blue shape?", "x")[:1])
    assert "'type'" not in text and text.count("<image>") == 1  # not a Python repr of the parts

    expected = processor(images=[image], text=text)
    given = processor.apply_chat_template(
        content_list("what is the blue shape?"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        images=[image],
    )
    inline = processor.apply_chat_template(
        content_list("what is the blue shape?", image=image),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    for encoding in (given, inline):
        assert set(encoding) == {"input_ids", "attention_mask", "pixel_values"}
        assert torch.equal(encoding["input_ids"], expected["input_ids"])
        assert torch.equal(encoding["pixel_values"], expected["pixel_values"])
    assert (given["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens

    batched = processor.apply_chat_template(
        [content_list("what is the blue shape?"), content_list("what color is the circle?")],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        images=[[image], [shapes_image(2)]],
    )
    assert batched["input_ids"].shape[0] == 2 and batched["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="give each image once"):
        processor.apply_chat_template(content_list("q", image=image), tokenize=True, images=[image])


def test_content_lists_train_and_evaluate_like_strings(vlm, tmp_path):
    from vlm_vision.data.conversations import VLMSample, read_llava
    from vlm_vision.data.dataset import VLMDataset, split_questions
    from vlm_vision.evaluation.generation import first_turn, reference_answer

    _, processor = vlm
    as_text = vqa("what is the blue shape?", "a blue circle")
    as_parts = content_list("what is the blue shape?", "a blue circle")
    assert processor.encode_conversation(as_parts) == processor.encode_conversation(as_text)
    assert processor.supervised_spans(as_parts) == processor.supervised_spans(as_text)

    image = shapes_image(3)
    sample = VLMSample([image], as_parts, "parts")
    assert sample.messages == as_text and sample.num_image_tags == 1
    assert split_questions(sample.messages) == [as_text]
    item = VLMDataset([sample], processor)[0]
    assert item["encoded"] == processor.encode_conversation(as_text) and item["skipped"] == []
    assert first_turn(sample) == (as_text[:1], [image])
    assert reference_answer(sample) == "a blue circle"

    # transformers' chat form in a data file: {"images", "messages"}
    image.save(tmp_path / "a.png")
    entries = [{"id": "chat", "images": ["a.png"], "messages": as_parts}]
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    samples, report = read_llava(tmp_path / "chat.json", tmp_path)
    assert report.skipped == [] and samples[0].messages == as_text
    assert samples[0].images == [str(tmp_path / "a.png")]


# ---- 4. processors without a tokenizer ---------------------------------------------------------------------------


def test_a_processor_without_a_usable_tokenizer_names_the_fix(vlm, tmp_path):
    from vlm_vision import VisionLanguageProcessor
    from vlm_vision.vlm.processing_vlm import ChatTemplateError, resolve_chat_template

    model, processor = vlm
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    with pytest.raises(ValueError, match="needs a tokenizer: pass the language model's tokenizer"):
        VisionLanguageProcessor.from_model_config(model.config, image_processor, None)
    with pytest.raises(TypeError, match=r"is a path, not a tokenizer: load it first \(AutoTokenizer"):
        VisionLanguageProcessor.from_model_config(model.config, image_processor, str(tmp_path))
    with pytest.raises(TypeError, match="must be a transformers tokenizer, got dict"):
        VisionLanguageProcessor.from_model_config(model.config, image_processor, {"vocab": 3})

    processor.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "tokenizer_only")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "saved" / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer .*tokenizer.save_pretrained\(folder\)"):
        VisionLanguageProcessor.from_pretrained(tmp_path / "saved")

    # a tokenizer without a chat template gets the plain USER/ASSISTANT one; asking for its own names the fix
    assert not tokenizer.chat_template
    with pytest.raises(ChatTemplateError, match=r"has no chat template\. Pass one: --chat-template NAME"):
        resolve_chat_template("model", tokenizer)


# ---- 5. misspelt roles, null answers and captions ----------------------------------------------------------------


def test_a_misspelt_role_is_refused_with_the_valid_roles(vlm):
    from vlm_vision.data.conversations import VLMSample

    _, processor = vlm
    messages = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "asistant", "content": "yes"}]
    words = r"role 'asistant' \(did you mean 'assistant'\?\); a role is one of \['system', 'user', 'assistant'\]"
    for call in (
        lambda: processor.encode_conversation(messages),
        lambda: processor.supervised_spans(messages),
        lambda: processor.apply_chat_template(messages),
        lambda: VLMSample([shapes_image(0)], messages, "typo"),
    ):
        with pytest.raises(ValueError, match=words):
            call()


@pytest.fixture
def picture(tmp_path):
    shapes_image(0).save(tmp_path / "a.png")
    return tmp_path


def llava_entry(sample_id, question, answer, speaker="gpt"):
    turns = [{"from": "human", "value": question}, {"from": speaker, "value": answer}]
    return {"id": sample_id, "image": "a.png", "conversations": turns}


def test_null_or_non_text_llava_values_and_unknown_roles_are_left_out_and_named(picture):
    from vlm_vision.data.conversations import BadSampleError, read_llava

    chat_typo = {"id": "chat", "image": "a.png", "messages": [{"role": "asistant", "content": "<image>\nno"}]}
    entries = [
        llava_entry("ok", "<image>\nwhat?", "yes"),
        llava_entry("null", "<image>\nwhat?", None),
        llava_entry("number", "<image>\nhow many?", 3),
        llava_entry("speaker", "<image>\nwhat?", "yes", speaker="asistant"),
        chat_typo,
    ]
    (picture / "data.json").write_text(json.dumps(entries))
    samples, report = read_llava(picture / "data.json", picture)
    assert [s.id for s in samples] == ["ok"] and report.counts() == {"malformed": 4}
    messages = {s.id: s.message for s in report.skipped}
    assert messages["null"] == "entry 1 (id null): conversations[1] (gpt) has 'value': null: every value must be text"
    assert "conversations[1] (gpt) has 'value': 3" in messages["number"]
    assert "'from': 'asistant'; a speaker is one of" in messages["speaker"] and "'gpt'" in messages["speaker"]
    assert "'messages': Message 0 has role 'asistant' (did you mean 'assistant'?)" in messages["chat"]
    assert all("None" not in s.messages[-1]["content"] for s in samples)
    with pytest.raises(BadSampleError, match=r"data\.json, entry 1 \(id null\): conversations\[1\] .* 'value': null"):
        read_llava(picture / "data.json", picture, on_error="raise")


def test_null_or_non_text_captions_and_answers_are_left_out_and_named(picture):
    from vlm_vision.data.conversations import BadSampleError, read_caption_folder, read_coco_captions, read_vqav2

    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [
            {"image_id": 1, "caption": None},
            {"image_id": 1, "caption": 7},
            {"image_id": 1, "caption": "ok"},
        ],
    }
    (picture / "coco.json").write_text(json.dumps(coco))
    samples, report = read_coco_captions(picture / "coco.json", picture, one_per_caption=True)
    assert [s.messages[1]["content"] for s in samples] == ["ok"] and report.counts() == {"malformed": 2}
    assert [s.message for s in report.skipped] == [
        "annotations[0]: 'caption' is null: a caption must be non-empty text",
        "annotations[1]: 'caption' is 7: a caption must be non-empty text",
    ]
    with pytest.raises(BadSampleError, match=r"coco\.json, annotations\[0\]: 'caption' is null"):
        read_coco_captions(picture / "coco.json", picture, on_error="raise")

    rows = [
        {"file_name": "a.png", "caption": 5},
        {"file_name": 3, "caption": "x"},
        {"file_name": "a.png", "caption": "ok"},
    ]
    (picture / "captions.jsonl").write_text("\n".join(map(json.dumps, rows)))
    samples, report = read_caption_folder(picture, picture / "captions.jsonl")
    assert samples[0].meta["captions"] == ["ok"] and report.counts() == {"malformed": 2}
    assert report.skipped[0].message == "line 1: 'caption' is 5: file_name and caption must be non-empty text"
    assert report.skipped[1].message.startswith("line 2: 'file_name' is 3")

    (picture / "COCO_val2014_000000000001.jpg").write_bytes((picture / "a.png").read_bytes())
    questions = [
        {"question_id": 10, "image_id": 1, "question": "what?"},
        {"question_id": 11, "image_id": 1, "question": None},
    ]
    annotations = [
        {"question_id": 10, "multiple_choice_answer": None, "answers": [{"answer": "x"}] * 10},
        {"question_id": 11, "multiple_choice_answer": "x", "answers": [{"answer": "x"}] * 10},
    ]
    (picture / "q.json").write_text(json.dumps({"questions": questions}))
    (picture / "a.json").write_text(json.dumps({"annotations": annotations}))
    samples, report = read_vqav2(picture / "q.json", picture / "a.json", picture)
    assert samples == [] and report.counts() == {"malformed": 2}
    assert report.skipped[0].message.startswith("question 10: 'multiple_choice_answer' is null")
    assert report.skipped[1].message.startswith("question 11: 'question' is null")
    with pytest.raises(BadSampleError, match="question 10: 'multiple_choice_answer' is null"):
        read_vqav2(picture / "q.json", picture / "a.json", picture, on_error="raise")


# ---- 6. LLaVA's config names -------------------------------------------------------------------------------------


def llava_named_config(tokenizer, vision=None, **fields):
    from tests.conftest import tiny_config
    from tests.vlm_helpers import tiny_text_config
    from vlm_vision import VisionLanguageConfig

    return VisionLanguageConfig(
        vision_config=vision or tiny_config(), text_config=tiny_text_config(len(tokenizer)), **fields
    )


def test_vision_feature_select_strategy_is_keep_prefix_tokens(tokenizer):
    from tests.conftest import tiny_config
    from vlm_vision.vlm.modeling_vlm import num_image_tokens_for

    full = llava_named_config(tokenizer, vision_feature_select_strategy="full")
    default = llava_named_config(tokenizer, vision_feature_select_strategy="default")
    assert full.keep_prefix_tokens and not default.keep_prefix_tokens
    assert (full.vision_feature_select_strategy, default.vision_feature_select_strategy) == ("full", "default")
    assert num_image_tokens_for(full) == num_image_tokens_for(default) + 1 == 8 * 8 + 1  # the [CLS] token kept
    assert "vision_feature_select_strategy" not in full.to_dict()  # stored once, as keep_prefix_tokens
    default.vision_feature_select_strategy = "full"
    assert default.keep_prefix_tokens

    with pytest.raises(ValueError, match="LLaVA's strategies are 'default'"):
        llava_named_config(tokenizer, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="contradicts keep_prefix_tokens=True"):
        llava_named_config(tokenizer, vision_feature_select_strategy="default", keep_prefix_tokens=True)
    with pytest.raises(ValueError, match="needs an adapter that projects prefix tokens"):
        llava_named_config(
            tokenizer,
            adapter_config={"adapter_type": "resampler", "num_queries": 4},
            vision_feature_select_strategy="full",
        )
    no_cls = tiny_config(use_class_token=False, pooling="mean")
    with pytest.raises(ValueError, match=r'has no \[CLS\]/prefix token: it would drop a patch\. Use "full"'):
        llava_named_config(tokenizer, vision=no_cls, vision_feature_select_strategy="default")
    assert llava_named_config(tokenizer, vision=no_cls).vision_feature_select_strategy == "full"


def test_projector_hidden_act_and_bias_set_the_mlp_adapter(tokenizer, tmp_path):
    config = llava_named_config(tokenizer, projector_hidden_act="relu", multimodal_projector_bias=False)
    assert config.adapter_config["hidden_act"] == "relu" and config.projector_hidden_act == "relu"
    assert config.adapter_config["bias"] is False and config.multimodal_projector_bias is False
    model = VisionLanguageForConditionalGeneration(config)
    adapter = model.adapter
    tokens = torch.randn(1, 64, config.adapter_config["vision_hidden_size"])
    expected = adapter.linear_2(torch.relu(adapter.linear_1(tokens)))
    assert torch.allclose(adapter(tokens, (8, 8)), expected) and adapter.linear_1.bias is None

    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path).projector_hidden_act == "relu"
    with pytest.raises(ValueError, match=r"projector_hidden_act='relux' \(the adapter's hidden_act\)"):
        llava_named_config(tokenizer, projector_hidden_act="relux")
    with pytest.raises(ValueError, match="the 'pixel_shuffle' adapter has no such setting"):
        llava_named_config(tokenizer, adapter_config={"adapter_type": "pixel_shuffle"}, projector_hidden_act="gelu")


def test_misspelt_vlm_config_fields_are_refused_not_kept(tokenizer, saved_vlm):
    from vlm_vision import VisionLanguageConfig

    with pytest.raises(TypeError, match=r"no field 'keep_prefix_token' \(did you mean 'keep_prefix_tokens'\?\)"):
        llava_named_config(tokenizer, keep_prefix_token=True)
    _, folder = saved_vlm
    with pytest.raises(TypeError, match=r"no field 'image_token_idx' \(did you mean 'image_token_id'\?\)"):
        VisionLanguageConfig.from_pretrained(folder, image_token_idx=3)
    with pytest.raises(TypeError, match=r"unexpected arguments vision_feature_layers: .*did you mean"):
        VisionLanguageForConditionalGeneration.from_pretrained(folder, vision_feature_layers=[-2])
    assert VisionLanguageConfig.from_pretrained(folder, keep_prefix_tokens=True).keep_prefix_tokens
    assert VisionLanguageConfig.from_pretrained(folder, vision_feature_select_strategy="full").keep_prefix_tokens


def test_the_image_text_to_text_pipeline_takes_chat_messages(vlm, tmp_path):
    from transformers import pipeline

    model, processor = vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    generate = pipeline("image-text-to-text", model=str(tmp_path))
    image = shapes_image(4)
    chat = [content_list("what is the blue shape?", image=image)[0]]
    answer = generate(text=chat, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    # the same greedy answer as generate on the processor's own prompt
    inputs = processor(images=[image], text=processor.prompt(vqa("what is the blue shape?", "x")[:1]))
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer["content"] == processor.tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_truncated_tokenizer_file_is_named(vlm, tmp_path, name):
    from transformers import AutoProcessor

    from vlm_vision import VisionLanguageProcessor

    _, processor = vlm
    processor.save_pretrained(tmp_path)
    path = tmp_path / name
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    for load in (VisionLanguageProcessor.from_pretrained, AutoProcessor.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON (")) as caught:
            load(tmp_path)
        assert "processor.save_pretrained(folder)" in str(caught.value)


def test_arrow_style_parts_with_every_key_read_as_the_plain_ones(vlm, picture):
    from vlm_vision.data.index import RowsIndex

    _, processor = vlm
    # a datasets.Dataset gives every content part every key of the column, None where unused
    parts = [{"type": "image", "text": None, "image": None}, {"type": "text", "text": "what?", "image": None}]
    answer = [{"type": "text", "text": "yes", "image": None}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]
    index = RowsIndex([{"images": ["a.png"], "messages": messages}], picture)
    assert index.sample(0).messages == vqa("what?", "yes") and index.length_estimates()[1].tolist() == [1]
    image = shapes_image(0)
    encoding = processor.apply_chat_template(messages[:1], tokenize=True, return_dict=True, images=[image])
    assert encoding["pixel_values"].shape[0] == 1
