"""Training the vision-language model in stages, as data: vision pre-training, `align`, `finetune`, `full`.

A recipe (`configs/vlm/*.json`) names the parts (tower, adapter, language model, tokenizer), the data and a list of
stages. Each stage freezes what it does not train and runs the shared accelerate loop (:func:`.loop.train`: same
run on 1 CPU or N processes, exact resume, atomic checkpoints):

- `vision_pretrain`: the tower as an image classifier on labels the data provides, with the classifier training
  code itself (:func:`.classifier.train_classifier`); the paper's recipe, which gives the ViT the inductive bias it
  lacks on small data.
- `align`: only the adapter trains (tower and language model frozen; the tower runs without autograd).
- `finetune`: the adapter trains fully, with LoRA on the language model, the vision tower or both (`lora`).
- `full`: everything trains (except tower blocks after the feature layer, which never get a gradient).

Per-part learning rates: the optimizer's parts are `adapter`, `lm`, `lm_lora`, `vision`, `vision_lora`. With
`aux_classification_weight > 0` (and a classifier from `vision_pretrain`), the classification loss on the images of
each batch is added to the language-modelling loss, so the tower keeps what it learned.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.conversations import VLMSample
from ..lora import apply_lora, parameter_table
from ..modeling_vlm import VisionLanguageForConditionalGeneration
from ..processing_vlm import IGNORE_INDEX, IMAGE_TOKEN, VisionLanguageProcessor
from .loop import TrainingArguments
from .optim import OptimizerConfig

logger = logging.getLogger(__name__)

STAGE_KINDS = ("vision_pretrain", "align", "finetune", "full")
# what a VLM stage may change in the recipe's training data (the data set itself stays the recipe's)
STAGE_DATA_KEYS = (
    "questions_per_sample",
    "separate_questions",
    "shown_fraction",
    "rewrite_shown_fraction",
    "negated_questions",
    "train_subset",
)
# The optimizer's parts: fnmatch patterns over parameter names, with or without peft's "base_model.model." prefix.
VLM_PARTS = {
    "adapter": "*adapter.*",
    "lm": "*language_model.*",
    "lm_lora": "*language_model.*lora_*",
    "vision": "*vision_tower.*",
    "vision_lora": "*vision_tower.*lora_*",
    "aux_head": "aux_head.*",
}


@dataclass
class VLMStage:
    """One stage of a VLM recipe.

    Attributes:
        name: the stage's folder under the run's output folder.
        kind: one of `STAGE_KINDS`.
        lora: for `finetune`: "lm", "vision" or "both" (see :mod:`vlm_vision.lora`).
        num_epochs, max_steps, batch_size, gradient_accumulation_steps, max_grad_norm: see `TrainingArguments`;
            `batch_size` counts conversations (a conversation may hold several questions about one image).
        horizontal_flip: flip a random half of the images of each batch (answers that are flip-invariant only).
        aux_classification_weight: weight of the tower's classification loss (needs `vision_pretrain` first).
        freeze_vision: for `full`: train the adapter and the whole LM with the tower frozen (LLaVA's second stage);
            the tower then runs without autograd, so a step costs its forward pass only.
        optimizer: AdamW and the per-part learning rates (`adapter`, `lm`, `lm_lora`, `vision`, `vision_lora`).
        classifier: for `vision_pretrain`: the `ClassifierStage` fields (task, image size, epochs, ...).
        data: overrides of the recipe's `data` for this stage's training set (`questions_per_sample`,
            `separate_questions`, `shown_fraction`, `rewrite_shown_fraction`, `negated_questions`, `train_subset`):
            e.g. a stage without negated questions, then one on the data as it is. Evaluation always reads the
            recipe's `data`.
    """

    name: str
    kind: str
    lora: str | None = None
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    horizontal_flip: bool = False
    aux_classification_weight: float = 0.0
    freeze_vision: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    classifier: dict | None = None
    data: dict | None = None

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"Stage {self.name!r}: kind={self.kind!r}; use one of {STAGE_KINDS}.")
        if self.kind == "finetune" and self.lora not in ("lm", "vision", "both"):
            raise ValueError(f"Stage {self.name!r}: a finetune stage needs lora='lm', 'vision' or 'both'.")
        if self.kind != "finetune" and self.lora is not None:
            raise ValueError(f"Stage {self.name!r}: lora is for finetune stages; {self.kind} stages don't take it.")
        if self.freeze_vision and self.kind != "full":
            raise ValueError(
                f"Stage {self.name!r}: freeze_vision is for full stages (align and finetune already keep the tower "
                f"frozen or LoRA-only); {self.kind} stages don't take it."
            )
        if self.freeze_vision and self.aux_classification_weight:
            raise ValueError(
                f"Stage {self.name!r}: the auxiliary classification loss trains the tower, which freeze_vision "
                "freezes: set aux_classification_weight to 0 or drop freeze_vision."
            )
        if self.kind == "vision_pretrain" and not self.classifier:
            raise ValueError(f"Stage {self.name!r}: vision_pretrain needs a 'classifier' section (ClassifierStage).")
        if self.data is not None:
            unknown = sorted(set(self.data) - set(STAGE_DATA_KEYS))
            if unknown:
                raise ValueError(
                    f"Stage {self.name!r}: data keys {unknown} cannot change per stage; a stage may override "
                    f"{list(STAGE_DATA_KEYS)} (the data set itself is the recipe's)."
                )
            if self.kind == "vision_pretrain":
                raise ValueError(f"Stage {self.name!r}: vision_pretrain reads its data from 'classifier', not 'data'.")
        if self.aux_classification_weight < 0:
            raise ValueError(f"aux_classification_weight={self.aux_classification_weight} must be >= 0.")
        if isinstance(self.optimizer, dict):  # the VLM's parts before OptimizerConfig checks learning_rates' names
            self.optimizer = OptimizerConfig(**{"parts": dict(VLM_PARTS), **self.optimizer})
        if not self.optimizer.parts:
            self.optimizer.parts = dict(VLM_PARTS)

    def training_arguments(self, output_dir: str, **overrides) -> TrainingArguments:
        return TrainingArguments.for_stage(self, output_dir, **overrides)


def stage_optimizer(stage: VLMStage, model: nn.Module) -> OptimizerConfig:
    """The stage's optimizer config with only the parts that name trainable parameters of `model` (a stage that
    freezes the tower has no `vision` part to give a learning rate to)."""
    from dataclasses import replace
    from fnmatch import fnmatch

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = {k: v for k, v in stage.optimizer.parts.items() if any(fnmatch(n, v) for n in names)}
    rates = {k: v for k, v in stage.optimizer.learning_rates.items() if k in parts or k == "default"}
    return replace(stage.optimizer, parts=parts, learning_rates=rates)


def set_trainable(model: nn.Module, stage: VLMStage) -> nn.Module:
    """Freeze what `stage` does not train; return the model to train (a peft model for `finetune`)."""
    vlm = model
    if stage.kind == "align":
        vlm.requires_grad_(False)
        vlm.adapter.requires_grad_(True)
    elif stage.kind == "full":
        vlm.requires_grad_(True)
        if stage.freeze_vision:
            vlm.vision_tower.requires_grad_(False)
    elif stage.kind == "finetune":
        vlm.requires_grad_(False)
        model = apply_lora(vlm, stage.lora)  # adapter in modules_to_save: trained fully
    vlm.freeze_unused_vision_parameters()
    logger.info("stage %s (%s):\n%s", stage.name, stage.kind, parameter_table(model))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Data: conversations encoded once, images processed once
# ---------------------------------------------------------------------------------------------------------------------


def split_questions(messages: list[dict]) -> list[list[dict]]:
    """A one-image conversation of k question/answer turns -> k one-turn conversations, each showing the image.

    Later turns of a conversation can read earlier answers ("what is the blue shape?" gives away the colour), a
    text shortcut that evaluation on first turns never offers; separate conversations each have to look at the image.
    """
    turns, question = [], None
    for message in messages:
        if message["role"] == "user":
            question = message["content"].replace(IMAGE_TOKEN, "").strip()
        elif message["role"] == "assistant" and question is not None:
            turns.append([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}, message])
            question = None
    return turns


class EncodedConversations(torch.utils.data.Dataset):
    """Conversations tokenised once (ids + labels) and their images processed once, for fast epochs.

    Items: `{"encoded": {"input_ids", "labels"} or a list of them, "images": [(C, H, W), ...], "image_label": int}`.
    With `separate_questions`, each one-image sample becomes one single-question conversation per turn (see
    :func:`split_questions`), all about its image: the collator encodes the image once for them. Samples longer
    than `max_length` are dropped (never truncated: that could cut an image span) and counted.
    """

    def __init__(
        self,
        samples: list[VLMSample],
        processor: VisionLanguageProcessor,
        max_length: int | None = None,
        image_label_key: str | None = None,
        label_names: list[str] | None = None,
        separate_questions: bool = False,
    ):
        self.processor = processor
        self.items, self.too_long, cache = [], 0, {}
        encoded_by_text: dict[str, dict] = {}

        def encode(messages, sample_id):
            key = json.dumps(messages)
            if key not in encoded_by_text:
                try:
                    encoded_by_text[key] = processor.encode_conversation(messages, max_length=max_length)
                except ValueError as error:
                    logger.debug("dropping %s: %s", sample_id, error)
                    encoded_by_text[key] = None
            return encoded_by_text[key]

        for sample in samples:
            if separate_questions:
                if len(sample.images) != 1:
                    raise ValueError(
                        f"separate_questions needs one image per sample; {sample.id} has {len(sample.images)}."
                    )
                encoded = [encode(turn, sample.id) for turn in split_questions(sample.messages)]
                if not encoded or any(e is None for e in encoded):
                    encoded = None
            else:
                encoded = encode(sample.messages, sample.id)
            if encoded is None:
                self.too_long += 1
                continue
            images = []
            for image in sample.images:
                image_key = image if isinstance(image, str) else id(image)
                if image_key not in cache:
                    cache[image_key] = _process_image(processor, image)
                images.append(cache[image_key])
            label = -100
            if image_label_key and label_names is not None and image_label_key in sample.meta:
                label = label_names.index(sample.meta[image_label_key])
            self.items.append((encoded, images, label))
        if self.too_long:
            logger.warning("dropped %d samples longer than max_length=%s tokens", self.too_long, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        encoded, images, label = self.items[index]
        return {"encoded": encoded, "images": images, "image_label": label}


def _process_image(processor: VisionLanguageProcessor, image) -> torch.Tensor:
    from ..data.images import load_image

    picture = load_image(image) if isinstance(image, (str, os.PathLike)) else image
    return processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]


class EncodedCollator:
    """Pads encoded conversations and stacks their images (optionally flipping a random half horizontally)."""

    def __init__(self, processor: VisionLanguageProcessor, horizontal_flip: bool = False):
        self.processor = processor
        self.horizontal_flip = horizontal_flip

    def __call__(self, items: list[dict]) -> dict:
        # an item holds one conversation, or a list of separate questions about its one image
        per_item = [item["encoded"] if isinstance(item["encoded"], list) else [item["encoded"]] for item in items]
        batch = dict(self.processor.pad_encoded([encoded for group in per_item for encoded in group]))
        if any(isinstance(item["encoded"], list) for item in items):
            if any(len(item["images"]) != 1 for item in items):
                raise ValueError("A batch with separated questions needs exactly one image per item.")
            batch["image_index"] = torch.tensor([number for number, group in enumerate(per_item) for _ in group])
        images = [image for item in items for image in item["images"]]
        if images:
            pixel_values = torch.stack(images)
            if self.horizontal_flip:
                flip = torch.rand(len(images)) < 0.5  # the loop seeds the global RNG: resumes see the same flips
                pixel_values[flip] = pixel_values[flip].flip(-1)
            batch["pixel_values"] = pixel_values
            labels = [item["image_label"] for item in items for _ in item["images"]]
            batch["image_labels"] = torch.tensor(labels)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# The auxiliary classification loss
# ---------------------------------------------------------------------------------------------------------------------


class WithAuxiliaryClassifier(nn.Module):
    """The VLM plus the tower's classification head from `vision_pretrain`: loss = LM loss + w * CE(head(y), label).

    y = LN(z^0) of the deepest tower layer the VLM runs (captured with a hook, so the tower runs once).
    """

    def __init__(self, vlm: nn.Module, head: nn.Module, weight: float):
        super().__init__()
        self.vlm, self.aux_head, self.weight = vlm, head, weight
        base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
        tower = base.vision_tower
        deepest = max(i % (tower.config.num_hidden_layers + 1) for i in base.config.feature_layers)
        self._norm = tower.layernorm
        self._captured = None
        target = tower.layers[deepest - 1] if deepest > 0 else tower.embeddings
        target.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._captured = output

    def forward(self, image_labels=None, **batch):
        outputs = self.vlm(**batch)  # batch may carry num_items_in_batch (see `vlm_loss`)
        if self._captured is not None and image_labels is not None and (image_labels >= 0).any():
            pooled = self._norm(self._captured[:, 0])
            logits = self.aux_head(pooled)
            outputs.loss = outputs.loss + self.weight * F.cross_entropy(logits, image_labels, ignore_index=-100)
        self._captured = None
        return outputs


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The number of supervised tokens per process, over all processes: sum over ranks / world size.

    The LM's loss is a mean over supervised tokens. Each process's mean over its own tokens, averaged by DDP, would
    weigh tokens differently from one process over the whole batch (samples have different answer lengths);
    dividing each process's token sum by this count makes N processes compute the same loss and gradients as one.
    """
    count = (labels[:, 1:] != IGNORE_INDEX).sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count.clamp(min=1.0)


def vlm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """`compute_loss` for VLM stages: the LM loss normalised by the global supervised-token count (and, for
    `WithAuxiliaryClassifier`, its auxiliary term); without the wrapper, `image_labels` are dropped."""
    if not isinstance(model_module(model), WithAuxiliaryClassifier):
        batch = {k: v for k, v in batch.items() if k != "image_labels"}
    return model(**batch, num_items_in_batch=supervised_tokens(batch["labels"])).loss


def model_module(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: batched greedy generation
# ---------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_answers(
    model: VisionLanguageForConditionalGeneration,
    processor: VisionLanguageProcessor,
    samples: list[VLMSample],
    batch_size: int = 256,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to each sample's first user turn (the image(s) and the question), batched, left-padded."""
    model.eval()
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    cache, answers = {}, []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            prompts = [processor.expand_image_tokens(processor.prompt(s.messages[:1])) for s in chunk]
            encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            images = []
            for sample in chunk:
                for image in sample.images:
                    key = image if isinstance(image, str) else id(image)
                    if key not in cache:
                        cache[key] = _process_image(processor, image)
                    images.append(cache[key])
            inputs = {k: v.to(model.device) for k, v in encoded.items()}
            if images:
                inputs["pixel_values"] = torch.stack(images).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_samples(model, processor, samples: list[VLMSample], metric: str, batch_size: int = 256) -> dict:
    """Greedy answers to each sample's first turn, scored by `metric`:

    - `"exact_match"` (easy-VQA): normalised exact match with `meta["qa"][0]["answer"]` (or the first assistant
      turn), by question type;
    - `"vqa"` (VQAv2): the official accuracy against the ten annotators' `meta["answers"]`, by answer type;
    - `"captions"`: BLEU-1..4 and CIDEr against `meta["captions"]` (needs the `eval` extra).
    """
    from ..evaluation import accuracy_by, caption_scores, exact_match, vqa_accuracy

    predictions = generate_answers(model, processor, samples, batch_size=batch_size)
    if metric == "captions":
        references = {s.id: s.meta["captions"] for s in samples}
        scores = caption_scores({s.id: p for s, p in zip(samples, predictions, strict=True)}, references)
        return {"captions": scores, "num_samples": len(samples), "predictions": predictions}
    if metric == "vqa":
        scores = [vqa_accuracy(p, s.meta["answers"]) for p, s in zip(predictions, samples, strict=True)]
        groups = [s.meta.get("answer_type", "all") for s in samples]
    elif metric == "exact_match":
        scores = [exact_match(p, _reference_answer(s)) for p, s in zip(predictions, samples, strict=True)]
        groups = [s.meta["qa"][0].get("question_type", "all") if "qa" in s.meta else "all" for s in samples]
    else:
        raise ValueError(f"metric={metric!r}; use 'exact_match', 'vqa' or 'captions'.")
    return {"accuracy": accuracy_by(scores, groups), "num_samples": len(samples), "predictions": predictions}


def _reference_answer(sample: VLMSample) -> str:
    if "qa" in sample.meta:
        return sample.meta["qa"][0]["answer"]
    return next(m["content"] for m in sample.messages if m["role"] == "assistant")


def vqa_exact_match(model, processor, samples: list[VLMSample], batch_size: int = 256) -> dict:
    """Exact-match accuracy (normalised) of greedy answers, overall and by question type (`meta["qa"][0]`)."""
    return evaluate_samples(model, processor, samples, "exact_match", batch_size=batch_size)


def seeded_subset(samples: list, size: int | None, seed: int) -> list:
    if size is None or size >= len(samples):
        return samples
    return random.Random(seed).sample(samples, size)


def save_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def stage_summary(stage: VLMStage) -> dict:
    return {k: v for k, v in asdict(stage).items() if v is not None}


__all__ = [
    "STAGE_DATA_KEYS",
    "STAGE_KINDS",
    "VLM_PARTS",
    "EncodedCollator",
    "EncodedConversations",
    "VLMStage",
    "WithAuxiliaryClassifier",
    "evaluate_samples",
    "generate_answers",
    "set_trainable",
    "split_questions",
    "stage_optimizer",
    "vlm_loss",
    "vqa_exact_match",
]
