"""Image decoding, labelled image sets, the image-folder reader and easy-VQA's image labels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_vision.data import (
    EASY_VQA_SHAPES,
    ImageClassificationDataset,
    ImageLoadError,
    LabelledImages,
    load_easy_vqa,
    load_image,
    load_image_folder,
)
from vlm_vision.data.easy_vqa import easy_vqa_image_labels


def write_folder(root, sizes=((8, 8), (12, 6))):
    """root/red/*.png and root/blue/*.png: solid colours, a left-half marker to see flips, various sizes/modes."""
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            image = Image.new("RGB", size, colour)
            image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
            image.save(root / name / f"{i}.png")
    return root


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    Image.new("L", (4, 3), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 3), (255, 0, 0, 0)).save(tmp_path / "transparent.png")
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    gray, transparent, pal, cmyk = (
        load_image(tmp_path / n) for n in ("gray.png", "transparent.png", "palette.png", "cmyk.jpg")
    )
    assert all(i.mode == "RGB" and i.size == (4, 3) for i in (gray, transparent, pal, cmyk))
    assert gray.getpixel((0, 0)) == (200, 200, 200)
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: the white background
    assert pal.getpixel((0, 0)) == (0, 255, 0)
    assert cmyk.getpixel((0, 0))[0] > 200 and cmyk.getpixel((0, 0))[1] < 50  # CMYK (0, 255, 255, 0) is red


def test_bad_files_raise_with_the_file_named_or_are_skipped(tmp_path, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    with pytest.raises(ImageLoadError, match=r"corrupt\.png.*on_error='skip'") as error:
        load_image(tmp_path / "corrupt.png")
    assert error.value.path.endswith("corrupt.png")
    with pytest.raises(ImageLoadError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png")

    images = LabelledImages(
        [tmp_path / "good.png", tmp_path / "corrupt.png", tmp_path / "missing.png"], [0, 1, 0], ["a", "b"]
    )
    strict = ImageClassificationDataset(images, 4)
    assert strict[0]["pixel_values"].shape == (3, 4, 4)
    with pytest.raises(ImageLoadError, match=r"corrupt\.png"):
        strict[1]
    with caplog.at_level(logging.WARNING):
        lenient = ImageClassificationDataset(images, 4, on_error="skip")
    assert len(lenient) == 1 and lenient.images.paths[0].endswith("good.png")
    assert "Skipped 2 of 3" in caplog.text and "corrupt.png" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        ImageClassificationDataset(images, 4, on_error="ignore")


def test_labelled_images_validate_and_subset():
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        LabelledImages(["a", "b"], [0], ["x"])
    with pytest.raises(ValueError, match="outside range"):
        LabelledImages(["a"], [3], ["x", "y"])
    images = LabelledImages([f"{i}.png" for i in range(10)], [i % 2 for i in range(10)], ["even", "odd"])
    subset = images.subset(4, seed=1)
    assert len(subset) == 4 and subset == images.subset(4, seed=1) and subset != images.subset(4, seed=2)
    assert all(int(p[:-4]) % 2 == label for p, label in zip(subset.paths, subset.labels, strict=True))
    rest, held = images.split(0.2, seed=0)
    assert len(held) == 2 and sorted(rest.paths + held.paths) == sorted(images.paths)
    with pytest.raises(ValueError, match="num_images=11"):
        images.subset(11)


def test_dataset_pixels_flips_and_options(tmp_path):
    images = load_image_folder(write_folder(tmp_path / "folder"))
    dataset = ImageClassificationDataset(images, 8, horizontal_flip=True, seed=0)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].item() == 0  # blue sorts first
    plain = dataset.with_options(horizontal_flip=False)
    left_white = plain[0]["pixel_values"][:, :, 0]
    assert torch.allclose(left_white, torch.ones_like(left_white))  # white (1.0 after (x - 0.5) / 0.5) on the left
    flips = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        flips.append([not torch.equal(dataset[i]["pixel_values"], plain[i]["pixel_values"]) for i in range(4)])
    assert any(any(f) for f in flips) and not all(all(f) for f in flips)  # a coin, not a constant
    dataset.set_epoch(3)
    again = [not torch.equal(dataset[i]["pixel_values"], plain[i]["pixel_values"]) for i in range(4)]
    assert again == flips[3]  # a function of (seed, epoch, index) only
    assert plain.with_options(image_size=(6, 10))[1]["pixel_values"].shape == (3, 6, 10)
    with pytest.raises(ValueError, match="image_size"):
        ImageClassificationDataset(images, 0)


def test_image_folder_classes_and_errors(tmp_path):
    root = write_folder(tmp_path / "train")
    (root / "red" / "notes.txt").write_text("not an image")
    images = load_image_folder(root)
    assert images.class_names == ("blue", "red") and len(images) == 4 and images.labels == (0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"classes \['red'\] that are not among"):
        load_image_folder(root, class_names=("blue",))
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no sub-folders"):
        load_image_folder(tmp_path / "flat")


def test_easy_vqa_labels_come_from_the_questions():
    labels = easy_vqa_image_labels("train")
    assert len(labels) == 4000
    # image 0's questions: "what is the blue shape?" -> rectangle, "what color is the shape?" -> blue
    assert labels[0]["shape"] == "rectangle" and labels[0]["color"] == "blue"
    joint = load_easy_vqa("train", "shape_color")
    assert joint.num_classes == 24 and joint.class_names[joint.labels[0]] == "blue rectangle"
    assert len(joint) > 3400 and set(joint.labels) == set(range(24))
    shape = load_easy_vqa("test", "shape")
    assert shape.class_names == EASY_VQA_SHAPES and len(shape) > 900
    with pytest.raises(ValueError, match="easy-VQA image tasks"):
        load_easy_vqa("train", "size")
    with pytest.raises(ValueError, match="split"):
        easy_vqa_image_labels("val")


def test_load_image_scales_high_bit_depths_instead_of_clipping(tmp_path):
    from tests.image_files import write_mode_files

    files = write_mode_files(tmp_path)
    reference = np.asarray(load_image(files["gray.png"]))  # the same photo, 8-bit grayscale
    for name in ("gray16.png", "float.tif"):  # 16-bit and float [0, 1] grayscale: the same 8-bit image
        pixels = np.asarray(load_image(files[name]))
        assert pixels.shape == reference.shape and np.abs(pixels.astype(int) - reference).max() <= 1, name
        assert len(np.unique(pixels)) > 200, name  # not clipped to 0/255
    # a 32-bit image whose values exceed 16 bits is stretched from its minimum to its maximum
    stretched = np.asarray(load_image(files["int32.tif"]))
    assert stretched.min() == 0 and stretched.max() == 255 and len(np.unique(stretched)) > 200
    # a 32-bit ("I") image holding 16-bit values (how older Pillow opens 16-bit PNGs) scales by 65535
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(tmp_path / "i16_as_i.tif")
    assert np.asarray(load_image(tmp_path / "i16_as_i.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_applies_the_exif_orientation_and_refuses_non_paths(tmp_path):
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored 6x2 pixels are shown as 2x6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (2, 6)
    with pytest.raises(ImageLoadError, match="it is a folder"):
        load_image(tmp_path)
    with pytest.raises(TypeError, match=r"load_image takes a file path .*got Image"):
        load_image(image)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: LabelledImages("a.png", [0], ["x"]), TypeError, r"paths must be a sequence .*single value 'a.png'"),
        (lambda: LabelledImages(["a"], [0], "cat"), TypeError, r"class_names must be a sequence .*'cat'"),
        (lambda: LabelledImages(["a"], [0.5], ["x"]), ValueError, r"labels must be integer class indices, got \[0.5\]"),
        (lambda: LabelledImages(["a"], ["x"], ["x"]), ValueError, r"labels must be integer class indices"),
        (lambda: LabelledImages(["a", "b"], [0, 1], ["x", "x"]), ValueError, r"class_names repeats \['x'\]"),
    ],
)
def test_labelled_images_refuse_what_would_be_misread(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_image_folder_and_dataset_arguments_are_checked(tmp_path):
    root = write_folder(tmp_path / "train")
    with pytest.raises(TypeError, match=r"root must be a folder path"):
        load_image_folder(3)
    with pytest.raises(TypeError, match=r"class_names must be a sequence of class names"):
        load_image_folder(root, class_names="blue")  # would be read as ('b', 'l', 'u', 'e')
    with pytest.raises(ValueError, match=r"repeats a name"):
        load_image_folder(root, class_names=("blue", "blue", "red"))
    images = load_image_folder(root)
    with pytest.raises(ValueError, match=r"image_size must be a positive int"):
        ImageClassificationDataset(images, True)
    dataset = ImageClassificationDataset(images, 4)
    with pytest.raises(IndexError, match=r"index 4 is out of range for 4 images"):
        dataset[4]
    assert torch.equal(dataset[-1]["pixel_values"], dataset[3]["pixel_values"])
    with pytest.raises(ValueError, match=r"num_images=0.5"):
        images.subset(0.5)


def test_the_yes_no_breakdown_groups_by_attribute_negation_and_match():
    from vlm_vision.data.easy_vqa import yes_no_breakdown

    questions = ["is there a red shape?", "is there not a red shape?", "is there a circle?", "what color is it?"]
    answers = ["yes", "no", "no", "red"]
    rows = yes_no_breakdown(questions, answers, ["yes", " Yes", None, "red"])
    assert rows == [
        {"attribute": "color", "negated": False, "shown": True, "questions": 1, "right": 1.0, "yes": 1.0},
        {"attribute": "color", "negated": True, "shown": True, "questions": 1, "right": 0.0, "yes": 1.0},
        {"attribute": "shape", "negated": False, "shown": False, "questions": 1, "right": 0.0, "yes": 0.0},
    ]
