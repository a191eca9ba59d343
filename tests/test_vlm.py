"""The vision-language model on tiny parts: forward, loss, backward, generate, placeholders, labels, save/load."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlamaTokenizer

from tests.vlm_helpers import build_vlm, shapes_image, vqa
from vlm_vision import VisionLanguageForConditionalGeneration, VisionTransformerModel
from vlm_vision.vlm.processing_vlm import IGNORE_INDEX


@pytest.fixture
def tokenizer(tokenizer_dir):
    return LlamaTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def vlm(tokenizer):
    return build_vlm(tokenizer)


def batch_of_two(processor):
    conversations = [vqa("what is the blue shape?", "a blue circle"), vqa("describe the image.", "yes", images=2)]
    images = [[shapes_image(0)], [shapes_image(1), shapes_image(2)]]
    return processor.encode_conversations(conversations, images)


def test_tokenizer_is_a_real_sentencepiece_model(tokenizer):
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    ids = tokenizer("what is the blue shape?", add_special_tokens=False).input_ids
    assert len(ids) < len("what is the blue shape?")  # merges learned, not characters
    assert tokenizer.decode(ids) == "what is the blue shape?"


def test_a_tokenizer_trained_on_chat_texts_has_pieces_for_the_template_markup():
    from vlm_vision.vlm.processing_vlm import DEFAULT_CHAT_TEMPLATE
    from vlm_vision.vlm.tokenizer import chat_texts, train_sentencepiece_tokenizer

    pairs = [(c, s) for c in ("red", "blue", "teal") for s in ("circle", "square")]
    conversations = [vqa(f"what is the {c} shape?", f"a {c} {s}") for c, s in pairs]
    texts = chat_texts(conversations * 10)
    assert len(texts) == 6 and all("<image>" not in t and t.startswith("USER: ") for t in texts)
    tokenizer = train_sentencepiece_tokenizer(texts * 20, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # as the VLM's processor does
    text = tokenizer.apply_chat_template(conversations[0], tokenize=False, chat_template=DEFAULT_CHAT_TEMPLATE)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    markup = [p for p in pieces if p.startswith("<0x") and p != "<0x0A>"]  # byte fallback, newlines aside
    assert not markup, pieces
    # trained on the bare messages instead, "USER:" and "ASSISTANT:" fall back to one byte per character
    bare = train_sentencepiece_tokenizer([m["content"] for c in conversations for m in c] * 20, vocab_size=300)
    bare.add_special_tokens({"additional_special_tokens": ["<image>"]})
    bare_pieces = bare.convert_ids_to_tokens(bare(text, add_special_tokens=False).input_ids)
    bare_markup = [p for p in bare_pieces if p.startswith("<0x") and p != "<0x0A>"]
    assert len(bare_markup) == len("USER:") + len("ASSISTANT:"), bare_pieces


def test_the_tokenizer_splits_text_as_its_sentencepiece_model_does(monkeypatch):
    """The loaded tokenizer must split into the pieces sentencepiece learned; newlines and repeated spaces included
    (the chat template puts the question after "<image>\n")."""
    import sentencepiece as spm

    from vlm_vision.vlm.tokenizer import train_sentencepiece_tokenizer

    trained, train = {}, spm.SentencePieceTrainer.train

    def keep_model(**kwargs):  # the trained .model lives in a temporary folder: keep its bytes
        train(**kwargs)
        trained["proto"] = Path(kwargs["model_prefix"] + ".model").read_bytes()

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", keep_model)
    texts = [f"USER: \nwhat is the {c} shape?\nASSISTANT:  {c}\n" for c in ("red", "blue", "teal", "green")]
    tokenizer = train_sentencepiece_tokenizer(texts * 50, vocab_size=350)
    model = spm.SentencePieceProcessor(model_proto=trained["proto"])
    for text in [*texts, "what is\n\nthe  red shape?"]:
        pieces = tokenizer.tokenize(text)
        assert pieces == model.encode(text, out_type=str), text
    assert "what" in tokenizer.tokenize(texts[0])  # after the newline: one piece, not "w" + "hat"


def test_forward_loss_backward(vlm):
    model, processor = vlm
    batch = batch_of_two(processor)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 3 * 64  # 8x8 patches per image (mlp)
    model.train()
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.vision_tower, model.adapter, model.language_model):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__


def test_sequences_sharing_an_image_through_image_index_match_repeated_images(vlm):
    model, processor = vlm
    questions = [vqa("what is the blue shape?", "circle"), vqa("what color?", "blue"), vqa("a square?", "no")]
    images = [shapes_image(0), shapes_image(1)]
    batch = processor.encode_conversations(questions, [[images[0]], [images[1]], [images[0]]])
    model.train()
    repeated = model(**batch)  # the tower encodes image 0 twice
    repeated.loss.backward()
    tower_grads = [p.grad.clone() for p in model.vision_tower.parameters() if p.grad is not None]
    model.zero_grad()
    calls = []
    hook = model.vision_tower.embeddings.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    shared = model(**{**batch, "pixel_values": batch["pixel_values"][:2]}, image_index=torch.tensor([0, 1, 0]))
    hook.remove()
    assert calls == [2]  # each image encoded once
    torch.testing.assert_close(shared.logits, repeated.logits)
    shared.loss.backward()  # gradients from all three questions reach the tower, summed over the shared image
    shared_grads = [p.grad for p in model.vision_tower.parameters() if p.grad is not None]
    for ours, reference in zip(shared_grads, tower_grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-4)

    two_images = {**batch, "pixel_values": batch["pixel_values"][:2]}
    with pytest.raises(ValueError, match=r"image_index holds 0\.\.2 but there are 2 images"):
        model(**two_images, image_index=torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(**two_images, image_index=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="The batch has 3 <image> spans but image_index has 2 entries"):
        model(**two_images, image_index=torch.tensor([0, 1]))  # 3 image spans, 2 indices


def test_image_features_replace_the_placeholders_in_order(vlm):
    model, processor = vlm
    batch = batch_of_two(processor)
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], None)
    features = model.get_image_features(batch["pixel_values"])  # (3, 64, 32)
    mask = batch["input_ids"] == processor.image_token_id
    torch.testing.assert_close(embeds[0][mask[0]], features[0])
    torch.testing.assert_close(embeds[1][mask[1]], features[1:].reshape(-1, 32))
    torch.testing.assert_close(embeds[~mask], model.get_input_embeddings()(batch["input_ids"])[~mask])


def test_only_the_needed_tower_layers_run(vlm):
    model, processor = vlm
    assert isinstance(model.vision_tower, VisionTransformerModel)
    ran = []
    for i, layer in enumerate(model.vision_tower.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    model.get_image_features(batch_of_two(processor)["pixel_values"])
    assert ran == [0, 1]  # 3 layers, feature layer -2: the last block never runs


def test_wrong_placeholder_count_names_the_sample_and_both_counts(vlm):
    model, processor = vlm
    batch = batch_of_two(processor)
    with pytest.raises(ValueError, match=r"placeholders for 3 images \(sample 0: 1, sample 1: 2\).*holds 2 images"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:2])
    cut = batch["input_ids"].clone()
    cut[1, (cut[1] == processor.image_token_id).nonzero()[0]] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match=r"Sample 1 has 127 <image> placeholder tokens, which is not a multiple of"):
        model(input_ids=cut, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"no pixel_values were given"):
        model(input_ids=batch["input_ids"])


def test_processor_refuses_tags_and_images_that_disagree(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match=r"have 3 <image> tags \(sample 0: 1, sample 1: 2\) but 2 images"):
        processor.encode_conversations([vqa("q", "a"), vqa("q", "a", images=2)], [[shapes_image(0)], [shapes_image(1)]])
    with pytest.raises(ValueError, match=r"The text has 1 <image> tags but 0 images"):
        processor(text="<image> what is it?")


def test_labels_cover_exactly_the_answer_tokens(vlm):
    _, processor = vlm
    tokenizer = processor.tokenizer
    conversation = vqa("what is the blue shape?", "a blue circle")
    sample = processor.encode_conversation(conversation)
    ids, labels = sample["input_ids"], sample["labels"]
    supervised = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    # the answer, the end-of-turn EOS and the template's newline after it; nothing of the prompt or the image
    assert tokenizer.decode(supervised) == "a blue circle</s>\n"  # decode drops the leading space
    assert supervised[-2] == tokenizer.eos_token_id
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels, strict=True) if i == processor.image_token_id)
    prompt_length = len(
        tokenizer(processor.expand_image_tokens(processor.prompt(conversation[:1])), add_special_tokens=False).input_ids
    )
    assert all(label == IGNORE_INDEX for label in labels[:prompt_length])
    assert all(label == token for label, token in zip(labels[prompt_length:], ids[prompt_length:], strict=True))


def test_labels_of_a_multi_turn_conversation_and_padding(vlm):
    _, processor = vlm
    conversation = [
        {"role": "user", "content": "<image>\nwhat is the blue shape?"},
        {"role": "assistant", "content": "a blue circle"},
        {"role": "user", "content": "is there a red triangle in the image?"},
        {"role": "assistant", "content": "no"},
    ]
    batch = processor.encode_conversations(
        [conversation, vqa("describe the image.", "yes", images=0)], [[shapes_image(0)], None]
    )
    tokenizer = processor.tokenizer
    for row, answers in ((0, "a blue circle</s>\n no</s>\n"), (1, "yes</s>\n")):
        labels = batch["labels"][row]
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == answers
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == IGNORE_INDEX).all()


def test_a_text_only_sample_shares_a_batch_with_image_samples_and_text_only_batches_still_run_the_tower(vlm):
    model, processor = vlm
    model.train()
    mixed = processor.encode_conversations(
        [vqa("q", "yes"), vqa("describe the image.", "no", images=0)], [[shapes_image(0)], None]
    )
    assert mixed["pixel_values"].shape[0] == 1
    model(**mixed).loss.backward()
    model.zero_grad()
    text_only = processor.encode_conversations([vqa("describe the image.", "no", images=0)])
    assert "pixel_values" not in text_only
    model(**text_only).loss.backward()
    # the tower ran (so DDP ranks agree on which parameters have gradients), contributing exactly zero
    grads = [p.grad for p in model.vision_tower.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and all(g.abs().sum() == 0 for g in grads)


def test_tower_parameters_the_feature_layer_never_reaches_are_frozen(vlm):
    model, _ = vlm
    frozen = {n for n, p in model.vision_tower.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.vision_tower.named_parameters() if n.startswith(("layers.2.", "layernorm."))}


def test_warning_when_a_batch_has_no_supervised_token(vlm, caplog):
    model, processor = vlm
    batch = processor.encode_conversations([vqa("q", "yes")], [[shapes_image(0)]])
    batch["labels"][:] = IGNORE_INDEX
    with caplog.at_level("WARNING"):
        model(**batch)
    assert "no supervised token" in caplog.text


def test_greedy_generation_with_and_without_the_cache_agree(vlm):
    model, processor = vlm
    model.eval()
    prompts = [
        processor.prompt(vqa("what is the blue shape?", "")[:1]),
        processor.prompt(vqa("describe the image.", "", images=2)[:1]),
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=[shapes_image(0), shapes_image(1), shapes_image(2)], text=prompts, add_special_tokens=False
    )
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with_cache = model.generate(**inputs, use_cache=True, **kwargs)
    without_cache = model.generate(**inputs, use_cache=False, **kwargs)
    assert with_cache.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(with_cache, without_cache)
    # placeholders without their images: refused on the first step too (generate passes an empty cache there)
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="no pixel_values were given"):
            model.generate(**text_only, use_cache=use_cache, **kwargs)


def test_save_and_load_the_whole_vlm_through_the_auto_classes(vlm, tmp_path):
    model, processor = vlm
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "VisionLanguageConfig"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is VisionLanguageForConditionalGeneration
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor).__name__ == "VisionLanguageProcessor"
    assert loaded_processor.num_image_tokens == processor.num_image_tokens == 64
    batch = loaded_processor.encode_conversations(
        [vqa("what is the blue shape?", "a blue circle")], [[shapes_image(0)]]
    )
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_the_encoder_can_be_extracted_back_out(vlm, tmp_path):
    from transformers import AutoModel

    model, processor = vlm
    model.vision_tower.save_pretrained(tmp_path)
    tower = AutoModel.from_pretrained(tmp_path).eval()
    x = batch_of_two(processor)["pixel_values"]
    torch.testing.assert_close(tower(x).last_hidden_state, model.vision_tower(x).last_hidden_state)


@pytest.mark.parametrize(
    ("adapter", "tokens"),
    [
        ({"adapter_type": "linear"}, 64),
        ({"adapter_type": "pixel_shuffle", "scale_factor": 2}, 16),
        ({"adapter_type": "resampler", "num_queries": 8, "num_attention_heads": 4}, 8),
    ],
)
def test_every_adapter_type_drives_the_token_count(tokenizer, adapter, tokens):
    model, processor = build_vlm(tokenizer, adapter=adapter)
    assert model.num_image_tokens == processor.num_image_tokens == tokens
    batch = processor.encode_conversations([vqa("q", "yes")], [[shapes_image(0)]])
    assert (batch["input_ids"] == processor.image_token_id).sum() == tokens
    assert torch.isfinite(model(**batch).loss)


def test_several_feature_layers_and_kept_prefix_tokens(tokenizer):
    model, processor = build_vlm(tokenizer, vision_feature_layer=[-2, 1], keep_prefix_tokens=True)
    assert model.config.adapter_config["vision_hidden_size"] == 64  # two layers of width 32
    assert processor.num_image_tokens == 1 + 64
    batch = processor.encode_conversations([vqa("q", "yes")], [[shapes_image(0)]])
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match=r"keep_prefix_tokens=True needs an adapter that projects prefix tokens"):
        build_vlm(tokenizer, adapter={"adapter_type": "resampler"}, keep_prefix_tokens=True)


def test_kept_cls_token_through_the_pixel_shuffle_adapter(tokenizer):
    shuffle = {"adapter_type": "pixel_shuffle", "scale_factor": 2}
    model, processor = build_vlm(tokenizer, adapter=shuffle, keep_prefix_tokens=True)
    assert processor.num_image_tokens == model.num_image_tokens == 1 + 16  # [CLS] + the 8x8 grid shuffled to 4x4
    batch = processor.encode_conversations([vqa("q", "yes")], [[shapes_image(0)]])
    assert torch.isfinite(model(**batch).loss)
    features = model.vision_features(batch["pixel_values"])
    tokens = model.get_image_features(batch["pixel_values"])
    torch.testing.assert_close(tokens[:, :1], model.adapter.forward_prefix_tokens(features[:, :1]))
    torch.testing.assert_close(tokens[:, 1:], model.adapter(features[:, 1:], (8, 8)))


def test_config_errors(tokenizer):
    with pytest.raises(ValueError, match=r"vision_feature_layer=5 is out of range for a tower with 3 layers"):
        build_vlm(tokenizer, vision_feature_layer=5)
    with pytest.raises(ValueError, match=r"image_token_id=10000 is outside the language model's vocabulary"):
        from vlm_vision import VisionLanguageConfig

        VisionLanguageConfig(text_config={"model_type": "llama", "vocab_size": 100}, image_token_id=10000)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_a_transformers_vision_tower_works_with_its_prefix_policy(tokenizer, tower):
    from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig, ViTImageProcessorPil

    from vlm_vision import VisionLanguageConfig, VisionLanguageProcessor

    sizes = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "intermediate_size": 48}
    sizes.update(num_hidden_layers=2, num_attention_heads=4)
    vision = CLIPVisionConfig(**sizes) if tower == "clip" else SiglipVisionConfig(**sizes)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = VisionLanguageConfig(
        vision_config=vision.to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
        ).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    assert config.prefix_tokens == (1 if tower == "clip" else 0)  # SigLIP has no [CLS]: all 64 tokens are kept
    torch.manual_seed(0)
    model = VisionLanguageForConditionalGeneration(config).train()
    processor = VisionLanguageProcessor.from_model_config(
        config, ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer
    )
    assert processor.num_image_tokens == 64
    batch = processor.encode_conversations([vqa("q", "yes")], [[shapes_image(0)]])
    model(**batch).loss.backward()
    frozen = model.freeze_unused_vision_parameters()
    assert frozen and all("post_layernorm" in n or "head" in n or "layers.1." in n for n in frozen)
    used = [p for p in model.vision_tower.parameters() if p.requires_grad]
    assert used and all(p.grad is not None for p in used)
