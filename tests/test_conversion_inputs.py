"""Converted folders carry the source's own preprocessing (checked against transformers' processors on real image
files), and truncated, empty or foreign source files are named with the fix, leaving nothing behind."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tests.image_files import write_mode_files
from tests.test_conversion import TINY, randomised, saved
from vlm_vision.conversion import convert, convert_checkpoint, main, read_state_dict

ATOL = RTOL = 1e-5
# image size 224 with 32 px patches: the published processors' own sizes on a model that stays tiny (7x7 grid)
AT_224 = {**TINY, "image_size": 224, "patch_size": 32, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_mode_files(tmp_path_factory.mktemp("images"))


def processed(processor, files, names=("rgb.jpg", "gray.png", "rgba.png", "palette.png", "cmyk.jpg")):
    images = [Image.open(files[name]) for name in names]
    return processor(images=images, return_tensors="pt").pixel_values


def test_the_source_processor_is_kept_and_gives_transformers_own_output(tmp_path, files):
    reference = randomised(CLIPVisionModel(CLIPVisionConfig(**TINY)))
    source = saved(reference, tmp_path)
    source_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    source_processor.save_pretrained(source)
    out = convert("clip", source, tmp_path / "converted")
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor) is CLIPImageProcessorPil  # the source's class, not a ViT squash
    expected = processed(source_processor, files)
    torch.testing.assert_close(processed(processor, files), expected, rtol=0, atol=0)
    from transformers import AutoModel

    with torch.no_grad():  # and the converted tower on it is transformers' tower on its own preprocessing
        got = AutoModel.from_pretrained(out)(expected).pooler_output
        torch.testing.assert_close(got, reference(expected).pooler_output, atol=ATOL, rtol=RTOL)
    assert "Preprocessing (the source's preprocessor_config.json)" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("family", "make", "published"),
    [
        ("clip", lambda: CLIPVisionModel(CLIPVisionConfig(**AT_224)), lambda: CLIPImageProcessorPil()),
        ("siglip", lambda: SiglipVisionModel(SiglipVisionConfig(**AT_224)), lambda: SiglipImageProcessorPil()),
        (
            "dinov2",
            lambda: Dinov2Model(Dinov2Config(**AT_224)),
            lambda: BitImageProcessorPil(  # facebook/dinov2-*'s preprocessor_config.json
                size={"shortest_edge": 256}, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD
            ),
        ),
        # ViT's defaults, plus RGB conversion (transformers' ViT processor fails on grayscale without it)
        ("hf", lambda: ViTModel(ViTConfig(**AT_224)), lambda: ViTImageProcessorPil(do_convert_rgb=True)),
    ],
)
def test_without_a_processor_file_the_family_defaults_are_used(tmp_path, files, family, make, published):
    converted = convert_checkpoint(family, saved(randomised(make()), tmp_path))
    processor = converted.image_processor
    assert type(processor) is type(published())
    torch.testing.assert_close(processed(processor, files), processed(published(), files), rtol=0, atol=0)


def test_defaults_scale_to_other_sizes_and_image_size_resizes_the_source_processor(tmp_path):
    dinov2 = convert_checkpoint("dinov2", saved(randomised(Dinov2Model(Dinov2Config(**TINY))), tmp_path / "d"))
    assert dict(dinov2.image_processor.size) == {"shortest_edge": math.floor(32 * 256 / 224)}
    assert (dinov2.image_processor.crop_size.height, dinov2.image_processor.crop_size.width) == (32, 32)
    source = saved(randomised(CLIPVisionModel(CLIPVisionConfig(**TINY))), tmp_path / "c")
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size=32).save_pretrained(source)
    bigger = convert_checkpoint("clip", source, image_size=48).image_processor
    assert bigger.size.shortest_edge == 54 and (bigger.crop_size.height, bigger.crop_size.width) == (48, 48)
    assert bigger(images=Image.new("RGB", (70, 50)), return_tensors="pt").pixel_values.shape == (1, 3, 48, 48)


def test_timm_preprocessing_comes_from_its_pretrained_cfg():
    from pathlib import Path

    converted = convert_checkpoint("timm", Path(__file__).parent / "fixtures" / "timm" / "vit_cls")
    processor = converted.image_processor  # crop_pct 0.9, bicubic, mean = std = 0.5 at 16 px
    assert processor.size.shortest_edge == math.floor(16 / 0.9) and processor.crop_size.height == 16
    assert processor.do_center_crop and processor.do_convert_rgb and converted.resample.name == "BICUBIC"


def test_dinov2_converts_at_the_size_its_processor_crops_to(tmp_path, files):
    """facebook/dinov2-*: config image_size 518, processor crop 224; transformers' Dinov2Model interpolates at every
    call. The converted folder works with its own processor as transformers' does."""
    reference = randomised(Dinov2Model(Dinov2Config(**{**TINY, "image_size": 64})))
    source = saved(reference, tmp_path)
    source_processor = BitImageProcessorPil(size={"shortest_edge": 36}, crop_size=32)
    source_processor.save_pretrained(source)
    converted = convert_checkpoint("dinov2", source)
    assert converted.model.config.image_size == 32 and any("crops to" in note for note in converted.notes)
    pixel_values = processed(converted.image_processor, files)
    torch.testing.assert_close(pixel_values, processed(source_processor, files), rtol=0, atol=0)
    with torch.no_grad():
        expected = reference(pixel_values).last_hidden_state
        torch.testing.assert_close(converted.model(pixel_values).last_hidden_state, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------------------------
# Bad source files: named, with the fix; nothing written


def _clip_source(tmp_path):
    return saved(randomised(CLIPVisionModel(CLIPVisionConfig(**TINY))), tmp_path, "source")


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("keep", [0, 5, 200, -20])
def test_truncated_safetensors_are_named(tmp_path, keep):
    source = _clip_source(tmp_path)
    _cut(source / "model.safetensors", keep)
    with pytest.raises(ValueError, match=r"Cannot read .*model\.safetensors \(\d+ bytes; .*truncated.*again"):
        convert("clip", source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no output folder, no staging folder


@pytest.mark.parametrize(("name", "keep"), [("ckpt.bin", 0), ("ckpt.pth", 30), ("ckpt.npz", 0), ("ckpt.npz", 40)])
def test_truncated_pytorch_and_npz_files_are_named(tmp_path, name, keep):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **{"embedding/kernel": np.ones((4, 4, 3, 8), np.float32)})
    else:
        torch.save({"pos_embed": torch.ones(1, 5, 8)}, path)
    _cut(path, keep)
    with pytest.raises(ValueError, match=rf"Cannot read .*{name} .*truncated, empty or not a weight file"):
        read_state_dict(path)
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match=rf"Cannot read .*{name}"):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("text", ["", '{"hidden_size": 3'])
def test_empty_or_truncated_json_files_are_named(tmp_path, name, text):
    source = _clip_source(tmp_path)
    if name == "model.safetensors.index.json":  # a sharded checkpoint whose index was cut
        state = read_state_dict(source)
        (source / "model.safetensors").unlink()
        save_file(state, str(source / "model-00001-of-00001.safetensors"))
    (source / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(name) + r" is not valid JSON .*empty or truncated"):
        convert("clip", source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_json_array_and_an_index_without_weight_map_are_refused(tmp_path):
    source = _clip_source(tmp_path)
    (source / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json holds a JSON list, not an object"):
        convert_checkpoint("clip", source)
    (source / "preprocessor_config.json").unlink()
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"has no weight_map"):
        convert_checkpoint("clip", source)


def test_cli_reports_bad_values_as_usage_errors(tmp_path, capsys):
    source = _clip_source(tmp_path)
    with pytest.raises(SystemExit):
        main(["--from", "clip", str(source), "--out", str(tmp_path / "out"), "--image-size", "30"])
    assert "image_size=30 is not divisible by patch_size=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--from", "clip", str(source), "--out", str(tmp_path / "out"), "--image-size", "32", "32", "32"])
    assert "--image-size takes H or H W" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
