"""A recipe's data: the index of a stage's training samples and the evaluation samples, for the built-in
easy-VQA or LLaVA-format files."""

from __future__ import annotations

import logging

from ..data.conversations import read_easy_vqa
from ..data.index import SampleList, SubsetIndex, open_llava_index
from .vlm_schema import required_data_path

logger = logging.getLogger(__name__)


def open_training_data(data: dict, seed: int, stage: str = "train"):
    """The index of a stage's training samples (`data` merged already), with its seeded `train_subset`."""
    if data["name"] == "easy-vqa":
        samples, _ = read_easy_vqa(
            "train",
            questions_per_sample=data.get("questions_per_sample", 1),
            shown_fraction=data.get("shown_fraction"),
            rewrite_shown_fraction=data.get("rewrite_shown_fraction"),
            negated_questions=data.get("negated_questions", True),
            seed=seed,
        )
        index = SampleList(samples, source="easy-vqa train")
    else:
        train, images = required_data_path(data, "train", stage), required_data_path(data, "image_folder", stage)
        index = open_llava_index(train, images)
    return SubsetIndex.seeded(index, data.get("train_subset"), seed)


def load_eval_samples(data: dict, seed: int) -> list:
    """The evaluation samples of the recipe's `data` (easy-VQA's test split, or LLaVA `eval`), in memory."""
    if data["name"] == "easy-vqa":
        samples, _ = read_easy_vqa("test", questions_per_sample=1)
        index = SampleList(samples, source="easy-vqa test")
    elif data.get("eval"):
        folder = data.get("eval_image_folder") or data.get("image_folder")
        if not folder:
            raise ValueError("data.eval needs data.eval_image_folder (or data.image_folder) for its images.")
        index = open_llava_index(data["eval"], folder)
    else:
        return []
    index = SubsetIndex.seeded(index, data.get("eval_subset"), seed)
    samples = []
    for i in range(len(index)):
        try:
            samples.append(index.sample(i))
        except ValueError as problem:
            logger.warning("evaluation leaves out entry %d of %s: %s", i, index.source, problem)
    return samples
