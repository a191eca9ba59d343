"""The processor of the vision-language model: image processor + tokenizer, `<image>` expansion and label masking.

Each `<image>` tag in a text becomes exactly `num_image_tokens` placeholder tokens (the adapter's
`num_output_tokens` for the tower's grid, computed once when the processor is built from a model config and saved
with it). Conversations are rendered with the tokenizer's chat template (a plain USER/ASSISTANT template when it has
none) and only the assistant turns carry labels, so changing the language model doesn't break the masking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

# Used for tokenizers without a chat template (e.g. a sentencepiece model trained on the data). The assistant turn
# ends with the EOS token, so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

Message = dict[str, str]


class VisionLanguageProcessor(ProcessorMixin):
    """Image processor + tokenizer for [`VisionLanguageForConditionalGeneration`].

    Args:
        image_processor: resizes and normalises images for the tower (e.g. `ViTImageProcessorPil`).
        tokenizer: the language model's tokenizer; `<image>` is added to it as a special token if missing (then
            resize the model's embeddings to `len(tokenizer)`).
        num_image_tokens: placeholder tokens per image; use `from_model_config` to take it from the model.
        image_token: the placeholder text.
        chat_template: overrides the tokenizer's template.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, image_token=IMAGE_TOKEN, **kwargs):
        if num_image_tokens is None or num_image_tokens <= 0:
            raise ValueError(
                f"num_image_tokens must be a positive int, got {num_image_tokens!r}: build the processor with "
                "VisionLanguageProcessor.from_model_config(config, image_processor, tokenizer)."
            )
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        chat_template = kwargs.pop("chat_template", None) or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_model_config(cls, config, image_processor, tokenizer, **kwargs) -> VisionLanguageProcessor:
        """A processor whose image-token count comes from the model's adapter and tower grid (one source of truth)."""
        from .modeling_vlm import num_image_tokens_for

        return cls(image_processor, tokenizer, num_image_tokens=num_image_tokens_for(config), **kwargs)

    # ---- plain text + images (inference, user scripts) -------------------------------------------------------

    def expand_image_tokens(self, text: str) -> str:
        """Each `<image>` tag -> `num_image_tokens` placeholder tokens."""
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt", **kwargs) -> BatchFeature:
        """Tokenise `text` (a string or list) with expanded `<image>` tags and process `images` (flat, in tag order).

        Returns input_ids, attention_mask and, with images, pixel_values `(I, C, H, W)`.
        """
        if text is None:
            raise ValueError("text is required: the prompt(s), with one <image> tag per image.")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten(images)
        num_tags = sum(t.count(self.image_token) for t in texts)
        if num_tags != len(flat_images):
            raise ValueError(
                f"The text has {num_tags} {self.image_token} tags but {len(flat_images)} images were given: pass one "
                "image per tag, in order."
            )
        encoding = self.tokenizer(
            [self.expand_image_tokens(t) for t in texts],
            padding=padding,
            return_tensors=return_tensors,
            add_special_tokens=kwargs.pop("add_special_tokens", True),
            **kwargs,
        )
        data = dict(encoding)
        if flat_images:
            data["pixel_values"] = self.image_processor(images=flat_images, return_tensors=return_tensors)[
                "pixel_values"
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ---- conversations (training, evaluation) ---------------------------------------------------------------

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text through the chat template (`<image>` tags not yet expanded)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def supervised_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant turns in it.

        Each assistant turn's span is what the template adds between the prompt up to it (with the generation prompt)
        and the conversation through it: the answer and its end-of-turn marker. This works for any template that
        renders a conversation's prefix as a prefix of its text, which chat templates do; others raise.
        """
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(
                    "The chat template does not render conversation prefixes as text prefixes, so the answer spans "
                    "cannot be found; use a template where it does (pass chat_template=...)."
                )
            spans.append((len(before), len(through)))
        return full, spans

    def encode_conversation(self, messages: Sequence[Message], max_length: int | None = None) -> dict[str, list[int]]:
        """Token ids and labels of one conversation: labels are the ids on assistant turns, -100 elsewhere.

        Raises:
            ValueError: when the sample is longer than `max_length` (never truncated: that could cut an image span
                or the answer).
        """
        text, spans = self.supervised_spans(messages)
        # expanding the tags shifts the characters after them: map the spans through the expansion
        expanded, spans = _expand_with_spans(text, spans, self.image_token, self.num_image_tokens)
        encoding = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        labels = [IGNORE_INDEX] * len(input_ids)
        for position, (start, end) in enumerate(encoding["offset_mapping"]):
            if (
                end > start
                and any(s <= start and end <= e for s, e in spans)
                and input_ids[position] != self.image_token_id
            ):
                labels[position] = input_ids[position]
        if max_length is not None and len(input_ids) > max_length:
            raise ValueError(
                f"The conversation is {len(input_ids)} tokens long, over max_length={max_length} "
                f"({text.count(self.image_token)} images x {self.num_image_tokens} tokens): raise max_length or drop "
                "the sample (truncating would cut an image span or the answer)."
            )
        return {"input_ids": input_ids, "labels": labels}

    def encode_conversations(
        self,
        conversations: Sequence[Sequence[Message]],
        images=None,
        max_length: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """A padded training batch: input_ids, attention_mask, labels and pixel_values (images flat, in tag order).

        Args:
            conversations: per sample, a list of `{"role": "user" | "assistant" | "system", "content": str}` with
                `<image>` tags in the content.
            images: per sample, a list of images (or None for a text-only sample); or one flat list in tag order.
        """
        encoded = [self.encode_conversation(messages, max_length=max_length) for messages in conversations]
        flat_images = _flatten(images)
        tags = [sum(m["content"].count(self.image_token) for m in messages) for messages in conversations]
        if sum(tags) != len(flat_images):
            per_sample = ", ".join(f"sample {i}: {n}" for i, n in enumerate(tags))
            raise ValueError(
                f"The conversations have {sum(tags)} {self.image_token} tags ({per_sample}) but {len(flat_images)} "
                "images were given: pass one image per tag, in order."
            )
        batch = self.pad_encoded(encoded, return_tensors=return_tensors)
        if flat_images:
            batch["pixel_values"] = self.image_processor(images=flat_images, return_tensors=return_tensors)[
                "pixel_values"
            ]
        return batch

    def pad_encoded(self, encoded: Sequence[dict[str, list[int]]], return_tensors: str = "pt") -> BatchFeature:
        """Pad conversations already encoded by `encode_conversation` (so a data set can encode each one once):
        input_ids, attention_mask and labels (-100 on padding), on the tokenizer's padding side."""
        padded = self.tokenizer.pad({"input_ids": [e["input_ids"] for e in encoded]}, return_tensors=return_tensors)
        labels = torch.full_like(padded["input_ids"], IGNORE_INDEX)
        left = self.tokenizer.padding_side == "left"
        for row, sample in enumerate(encoded):
            length = len(sample["labels"])
            columns = slice(labels.shape[1] - length, None) if left else slice(0, length)
            labels[row, columns] = torch.tensor(sample["labels"])
        return BatchFeature(data={**padded, "labels": labels})

    def prompt(self, messages: Sequence[Message]) -> str:
        """The text to generate the next assistant turn from (expanded `<image>` tags not included)."""
        return self.render(messages, add_generation_prompt=True)


def _flatten(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        if item is None:
            continue
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def _expand_with_spans(
    text: str, spans: list[tuple[int, int]], tag: str, repeat: int
) -> tuple[str, list[tuple[int, int]]]:
    """Replace every `tag` with `tag * repeat` and move the character spans accordingly."""
    extra = len(tag) * (repeat - 1)
    positions = []
    start = text.find(tag)
    while start != -1:
        positions.append(start)
        start = text.find(tag, start + len(tag))

    def shift(index: int) -> int:
        return index + extra * sum(1 for p in positions if p < index)

    return text.replace(tag, tag * repeat), [(shift(s), shift(e)) for s, e in spans]


__all__ = ["DEFAULT_CHAT_TEMPLATE", "IGNORE_INDEX", "VisionLanguageProcessor"]
