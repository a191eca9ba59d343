"""Training the vision-language model: the loss of a VLM stage and the auxiliary classification loss.

A recipe (`configs/vlm/*.json`, :mod:`.vlm_recipe`) names the parts, the data and a list of stages
(:mod:`.stages`: what each kind trains); each stage runs the shared accelerate loop (:func:`.loop.train`: the same
run on 1 CPU or N processes, exact resume, atomic checkpoints) with the loss here:

- :class:`VLMLoss`: the LM loss normalised by the supervised-token count over all processes (so N processes compute
  the gradients of one), with the samples the data set had to skip collected from each batch for the stage's report;
- :class:`WithAuxiliaryClassifier`: with `aux_classification_weight > 0` (and a classifier from `vision_pretrain`),
  the classification loss on the images of each batch is added, so the tower keeps what it learned. The label of
  each image travels in the batch (sample -> `VLMDataset` -> `VLMCollator` -> `batch["image_labels"]`) and the
  wrapper reads it with the [CLS] of the tower features it computes once for the VLM.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.conversations import SkippedSample
from ..vlm.processing_vlm import IGNORE_INDEX
from .stages import STAGE_DATA_KEYS, STAGE_KINDS, VLM_PARTS, VLMStage, set_trainable, stage_optimizer, stage_summary

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# The auxiliary classification loss
# ---------------------------------------------------------------------------------------------------------------------


class WithAuxiliaryClassifier(nn.Module):
    """The VLM plus the tower's classification head from `vision_pretrain`: loss = LM loss + w * CE(head(y), label).

    y = LN(z^0) of the deepest tower layer the VLM uses. The tower runs once, here: its features (`vision_features`,
    the selected layers concatenated on channels) go to the VLM in place of the pixels, and y is read off their
    deepest layer's [CLS]. The labels come in the batch (`image_labels`, one per image, -100: none, from
    :class:`~vlm_vision.data.dataset.VLMDataset`'s `image_label`); a batch without pixels or labels is the VLM's alone.
    """

    def __init__(self, vlm: nn.Module, head: nn.Module, weight: float):
        super().__init__()
        self.vlm, self.aux_head, self.weight = vlm, head, weight
        config, tower = self._base.config, self._base.vision_tower
        depths = [i % (tower.config.num_hidden_layers + 1) for i in config.feature_layers]
        width = tower.config.hidden_size
        start = depths.index(max(depths)) * width  # the deepest layer's channels in the concatenated features
        self._deepest = slice(start, start + width)
        self._norm = tower.layernorm

    @property
    def _base(self) -> nn.Module:
        """The VLM under its LoRA wrapper (peft), if any."""
        return self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm

    def forward(self, image_labels=None, pixel_values=None, **batch):
        # batch may carry num_items_in_batch (see `vlm_loss`)
        if pixel_values is None or image_labels is None or not (image_labels >= 0).any():
            return self.vlm(pixel_values=pixel_values, **batch)
        dtype = next(self._base.vision_tower.parameters()).dtype
        features = self._base.vision_features(pixel_values.to(dtype))  # (I, T, D_v * len(feature_layers))
        outputs = self.vlm(vision_features=features, **batch)
        pooled = self._norm(features[:, 0, self._deepest])  # (I, D_v)
        logits = self.aux_head(pooled)
        outputs.loss = outputs.loss + self.weight * F.cross_entropy(logits, image_labels, ignore_index=-100)
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
    dropped = ("skipped",) if isinstance(model_module(model), WithAuxiliaryClassifier) else ("skipped", "image_labels")
    batch = {k: v for k, v in batch.items() if k not in dropped}
    if "num_items_in_batch" not in batch:  # set by the loop over a whole optimizer step (see `count_supervised`)
        batch["num_items_in_batch"] = supervised_tokens(batch["labels"])
    return model(**batch).loss


def count_supervised(batch: dict) -> int:
    """The loop's `count_items` for VLM stages: the tokens that carry loss (labels shifted by one, as the LM's)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class VLMLoss:
    """:func:`vlm_loss` that also keeps the samples each batch reports as skipped (`batch["skipped"]`, from
    :class:`~vlm_vision.data.dataset.VLMDataset`), once per sample id, for the end-of-stage report."""

    def __init__(self):
        self.skipped: dict[str, SkippedSample] = {}

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        for sample in batch.get("skipped", ()):
            self.skipped.setdefault(sample.id, sample)
        return vlm_loss(model, batch)

    def all_skipped(self) -> list[SkippedSample]:
        """The skipped samples of every process (call on all of them), by id."""
        records = list(self.skipped.values())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return sorted({r.id: r for r in records}.values(), key=lambda r: r.id)


def model_module(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


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


__all__ = [
    "STAGE_DATA_KEYS",
    "STAGE_KINDS",
    "VLM_PARTS",
    "VLMLoss",
    "VLMStage",
    "WithAuxiliaryClassifier",
    "count_supervised",
    "set_trainable",
    "stage_optimizer",
    "stage_summary",
    "vlm_loss",
]
