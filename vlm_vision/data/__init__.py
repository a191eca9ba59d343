"""Data for training: image decoding, labelled image sets and the built-in easy-VQA labels.

- :mod:`.images`: open any image file as RGB (grayscale, RGBA, palette...), errors that name the file; the
  :class:`ImageClassificationDataset` that the classifier training (and the VLM's vision pre-training stage) reads.
- :mod:`.easy_vqa`: the built-in default with no download: easy-VQA's 64x64 images labelled by shape and colour.
- :mod:`.image_folder`: a user's folder with one sub-folder per class.
"""

from .easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, EASY_VQA_TASKS, easy_vqa_image_labels, load_easy_vqa
from .image_folder import load_image_folder
from .images import (
    IMAGE_EXTENSIONS,
    ImageClassificationDataset,
    ImageLoadError,
    LabelledImages,
    load_image,
)

__all__ = [
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "EASY_VQA_TASKS",
    "IMAGE_EXTENSIONS",
    "ImageClassificationDataset",
    "ImageLoadError",
    "LabelledImages",
    "easy_vqa_image_labels",
    "load_easy_vqa",
    "load_image",
    "load_image_folder",
]
