"""transformers pipelines on our folders give what they give on transformers' own ViT: a ViT converted into ours and
the original, side by side, on real image files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel, pipeline

import vlm_vision  # noqa: F401  registers our classes, as a user does
from tests.image_files import write_mode_files
from tests.test_conversion import TINY, randomised
from vlm_vision import VisionTransformerForImageClassification, VisionTransformerModel
from vlm_vision.conversion import convert


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files of several modes. Not the palette image with a transparent colour: the pipeline's `load_image` keeps
    that colour in `info` after converting to RGB, and our processor (`do_convert_rgb`, as CLIP's) then paints it
    white, where transformers' ViT processor keeps whatever colour the palette holds."""
    files = write_mode_files(tmp_path_factory.mktemp("images"))
    return [str(files[name]) for name in ("rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "gray16.png")]


def folders(model, tmp_path):
    """transformers' folder (its model + ViT processor) and ours converted from it."""
    theirs = tmp_path / "transformers"
    model.save_pretrained(theirs)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(theirs)
    return theirs, convert("hf", theirs, tmp_path / "ours")


def test_image_feature_extraction(tmp_path, images):
    theirs, ours = folders(randomised(ViTModel(ViTConfig(**TINY))), tmp_path)
    expected_pipe = pipeline("image-feature-extraction", model=str(theirs))
    ours_pipe = pipeline("image-feature-extraction", model=str(ours))
    assert type(ours_pipe.model) is VisionTransformerModel
    assert type(ours_pipe.image_processor) is type(expected_pipe.image_processor) is ViTImageProcessorPil
    for pool in (False, True):
        got, expected = np.array(ours_pipe(images, pool=pool)), np.array(expected_pipe(images, pool=pool))
        assert got.shape == expected.shape == ((5, 1, 65, 32) if not pool else (5, 1, 32))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    tensors = ours_pipe(images[0], return_tensors=True)
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (1, 65, 32)


def test_image_classification(tmp_path, images):
    config = ViTConfig(**TINY, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"})
    theirs, ours = folders(randomised(ViTForImageClassification(config)), tmp_path)
    expected_pipe = pipeline("image-classification", model=str(theirs))
    ours_pipe = pipeline("image-classification", model=str(ours))
    assert type(ours_pipe.model) is VisionTransformerForImageClassification
    assert type(ours_pipe.image_processor) is ViTImageProcessorPil
    for got, expected in zip(ours_pipe(images, top_k=3), expected_pipe(images, top_k=3), strict=True):
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-5)
    assert {d["label"] for d in ours_pipe(images[0])} <= {"cat", "dog", "fish"}
