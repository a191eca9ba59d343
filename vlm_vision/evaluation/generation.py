"""Answers from a vision-language model: batched greedy generation on the model's device, and their scores.

:func:`generate_answers` answers each sample's first user turn (its images and question), left-padded batches of
`batch_size` on `model.device`, images decoded and processed once per file (a bounded cache), with a progress bar.
:func:`evaluate_samples` scores the answers with a metric of :mod:`vlm_vision.evaluation.metrics`. A sample whose image
cannot be read is not scored (its prediction is None) and is counted in the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.conversations import VLMSample
from ..data.images import ImageLoadError, ProcessedImages
from ..vlm.processing_vlm import normalize_messages

logger = logging.getLogger(__name__)

METRICS = ("exact_match", "vqa", "captions")
IMAGE_CACHE_SIZE = 2048  # processed images kept while answering (many questions share an image)


def first_turn(sample: VLMSample) -> tuple[list[dict], list]:
    """The messages up to the first user turn (a system prompt included) and the images its `<image>` tags show."""
    messages = normalize_messages(sample.messages)
    end = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if end is None:
        raise ValueError(f"Sample {sample.id} has no user turn to answer: give it a question.")
    prompt = messages[: end + 1]
    tags = sum(m["content"].count("<image>") for m in prompt)
    return prompt, list(sample.images[:tags])


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    samples: Sequence[VLMSample],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    progress_bar: bool = True,
) -> list[str | None]:
    """Greedy answers to each sample's first user turn, batched and left-padded on `model.device`.

    Under several processes (call it on every one, each with the whole model), each process answers every
    world-size-th sample and the answers are gathered: every process returns all of them, in order.

    Returns:
        Per sample, the decoded answer (stripped), or None when one of its images cannot be read.
    """
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be positive.")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    if world > 1:
        mine = _answer(
            model, processor, list(samples)[rank::world], batch_size, max_new_tokens, progress_bar and not rank
        )
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        answers: list[str | None] = [None] * len(samples)
        for part_rank, part in enumerate(parts):
            answers[part_rank::world] = part
        return answers
    return _answer(model, processor, samples, batch_size, max_new_tokens, progress_bar)


def _answer(model, processor, samples, batch_size: int, max_new_tokens: int, progress_bar: bool) -> list[str | None]:
    model.eval()
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pixels = ProcessedImages(processor, max_size=IMAGE_CACHE_SIZE, keep_in_memory_images=True)
    answers: list[str | None] = []

    try:
        batches = range(0, len(samples), batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not progress_bar, dynamic_ncols=True):
            prompts, images, usable = [], [], []
            for sample in samples[start : start + batch_size]:
                prompt, sample_images = first_turn(sample)
                try:
                    images_of_sample = [pixels(image) for image in sample_images]
                except ImageLoadError as error:
                    logger.warning("not answering %s: %s", sample.id, error)
                    usable.append(False)
                    continue
                usable.append(True)
                images += images_of_sample
                layouts = [image[1] for image in images_of_sample if isinstance(image, tuple)] or None
                prompts.append(processor.expand_image_tokens(processor.prompt(prompt), layouts))
            batch_answers = iter(_generate(model, tokenizer, prompts, images, max_new_tokens) if prompts else [])
            answers += [next(batch_answers) if ok else None for ok in usable]
    finally:
        tokenizer.padding_side = side
    return answers


def _generate(model, tokenizer, prompts: list[str], images: list[torch.Tensor], max_new_tokens: int) -> list[str]:
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in encoded.items()}
    if images and isinstance(images[0], tuple):  # native / tiles: each image's inputs, concatenated
        inputs.update({key: torch.cat([image[0][key] for image in images]).to(model.device) for key in images[0][0]})
    elif images:
        inputs["pixel_values"] = torch.stack(images).to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def reference_answer(sample: VLMSample) -> str:
    """The answer a sample's first question expects: `meta["qa"][0]["answer"]` (easy-VQA), else its first assistant
    turn."""
    if "qa" in sample.meta:
        return sample.meta["qa"][0]["answer"]
    answer = next((m["content"] for m in normalize_messages(sample.messages) if m["role"] == "assistant"), None)
    if answer is None:
        raise ValueError(f"Sample {sample.id} has no assistant turn to compare answers with.")
    return answer


def evaluate_samples(
    model,
    processor,
    samples: Sequence[VLMSample],
    metric: str,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    progress_bar: bool = True,
) -> dict:
    """Greedy answers to each sample's first turn, scored by `metric`:

    - `"exact_match"` (easy-VQA and any data with one answer): normalised exact match with `meta["qa"][0]["answer"]`
      or the first assistant turn, by question type when the samples have one;
    - `"vqa"` (VQAv2): the official accuracy against the ten annotators' `meta["answers"]`, by answer type;
    - `"captions"`: BLEU-1..4 and CIDEr against `meta["captions"]` (or the first assistant turn; needs the `eval`
      extra).

    Returns:
        `{"accuracy": {...}}` (or `{"captions": {...}}`), `"num_samples"` scored, `"num_unanswered"` (unreadable
        images) and `"predictions"` (per sample, in order; None where unanswered).
    """
    from .metrics import accuracy_by, caption_scores, exact_match, vqa_accuracy

    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; use one of {METRICS}.")
    predictions = generate_answers(
        model, processor, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress_bar=progress_bar
    )
    answered = [(s, p) for s, p in zip(samples, predictions, strict=True) if p is not None]
    if not answered:
        raise ValueError(f"None of the {len(samples)} evaluation samples could be answered (unreadable images).")
    result = {"num_samples": len(answered), "num_unanswered": len(samples) - len(answered), "predictions": predictions}
    if metric == "captions":
        references = {s.id: s.meta.get("captions") or [reference_answer(s)] for s, _ in answered}
        return {"captions": caption_scores({s.id: p for s, p in answered}, references), **result}
    if metric == "vqa":
        scores = [vqa_accuracy(p, s.meta["answers"]) for s, p in answered]
        groups = [s.meta.get("answer_type", "all") for s, _ in answered]
    else:
        scores = [exact_match(p, reference_answer(s)) for s, p in answered]
        groups = [s.meta["qa"][0].get("question_type", "all") if "qa" in s.meta else "all" for s, _ in answered]
    return {"accuracy": accuracy_by(scores, groups), **result}


__all__ = ["METRICS", "evaluate_samples", "first_turn", "generate_answers", "reference_answer"]
