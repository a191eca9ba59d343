"""Saving, loading through the Auto classes (registered and remote code), and loading at another resolution."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from tests.conftest import tiny_config
from vlm_vision import VisionTransformerForImageClassification, VisionTransformerModel, resample_position_embeddings
from vlm_vision.export.encoder_folder import create_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformerModel(tiny_config(num_register_tokens=1)).eval()
    path = save_checkpoint(model, tmp_path / "tiny", title="tiny", summary="A tiny test model.")
    return model, path


def test_round_trip_through_auto_model(saved, pixel_values):
    model, path = saved
    loaded = AutoModel.from_pretrained(path)
    assert type(loaded) is VisionTransformerModel
    assert type(AutoConfig.from_pretrained(path)).__name__ == "VisionTransformerConfig"
    torch.testing.assert_close(loaded(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)
    for name, tensor in load_file(path / "model.safetensors").items():
        torch.testing.assert_close(tensor, model.state_dict()[name])


def test_folder_is_complete(saved):
    _, path = saved
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_vit.py",
        "modeling_vit.py",
        "position_embeddings.py",
        "README.md",
    }
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vit.VisionTransformerConfig",
        "AutoModel": "modeling_vit.VisionTransformerModel",
    }
    # the copied code imports only torch, transformers and its siblings
    for name in ("configuration_vit.py", "modeling_vit.py", "position_embeddings.py"):
        source = (path / name).read_text()
        assert "vlm_vision" not in source.replace("vlm_vit", ""), name


def test_remote_code_without_the_package_gives_identical_outputs(saved, pixel_values, tmp_path):
    model, path = saved
    torch.save(pixel_values, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vlm_vision"] = None  # the package cannot be imported in this process
        try:
            import vlm_vision
        except ImportError:
            pass
        else:
            raise SystemExit("vlm_vision was importable")
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(model(x).last_hidden_state, {str(tmp_path / "y.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_image_processor_and_model_on_a_real_photo(saved):
    from skimage import data

    _, path = saved
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    photo = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    inputs = processor(images=[photo, photo.convert("L").convert("RGB")], return_tensors="pt")
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    # ViT normalisation: mean 0.5, std 0.5 maps [0, 1] to [-1, 1]
    assert inputs.pixel_values.min() >= -1.0 and inputs.pixel_values.max() <= 1.0
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (2, 1 + 1 + 64, 32)  # [CLS] + 1 register + 8x8 patches
    assert out.pooler_output.shape == (2, 32)


def test_loading_at_another_image_size_resamples_the_position_embeddings(saved, pixel_values):
    model, path = saved
    bigger = AutoModel.from_pretrained(path, image_size=48)
    assert bigger.config.grid_size == (12, 12)
    expected = resample_position_embeddings(model.embeddings.position_embeddings, (12, 12), old_grid=(8, 8))
    torch.testing.assert_close(bigger.embeddings.position_embeddings, expected)
    torch.testing.assert_close(bigger.layers[0].mlp.fc1.weight, model.layers[0].mlp.fc1.weight)
    # and it equals running the original model with run-time interpolation
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            bigger(x).last_hidden_state, model(x, interpolate_pos_encoding=True).last_hidden_state
        )


def test_loading_a_non_square_checkpoint_reads_its_grid(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformerModel(tiny_config(image_size=[32, 48]))
    model.save_pretrained(tmp_path)
    square = VisionTransformerModel.from_pretrained(tmp_path, image_size=40)
    expected = resample_position_embeddings(model.embeddings.position_embeddings, (10, 10), old_grid=(8, 12))
    torch.testing.assert_close(square.embeddings.position_embeddings, expected)


def test_a_base_checkpoint_loads_into_a_classifier_at_another_size(saved):
    model, path = saved
    classifier = AutoModelForImageClassification.from_pretrained(path, num_labels=3, image_size=16)
    assert type(classifier) is VisionTransformerForImageClassification
    assert classifier.vit.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(
        classifier.vit.layers[1].attention.q_proj.weight, model.layers[1].attention.q_proj.weight
    )
    assert torch.count_nonzero(classifier.classifier.weight) == 0  # fresh zero-initialised head


def test_a_checkpoint_of_another_shape_is_refused(saved):
    _, path = saved
    with pytest.raises(ValueError, match=r"width 32 but the model's hidden_size is 64: .*another architecture"):
        AutoModel.from_pretrained(path, hidden_size=64, num_attention_heads=4)
    with pytest.raises(
        ValueError, match=r"(?s)layers.0.mlp.fc1.weight: checkpoint \(48, 32\) vs model \(64, 32\).*ignore"
    ):
        AutoModel.from_pretrained(path, intermediate_size=64)


def test_corrupt_weights_file_is_refused(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ|invalid"):
        AutoModel.from_pretrained(path)


def test_create_checkpoint_refuses_to_overwrite_and_replaces_when_asked(tmp_path):
    out = create_checkpoint("vit-ti16", tmp_path / "ti", image_size=32)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        create_checkpoint("vit-ti16", out, image_size=32)
    create_checkpoint("vit-ti16", out, image_size=32, seed=1, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["ti"]  # no staging folders left behind


def test_create_checkpoint_script_writes_a_loadable_classifier_with_a_model_card(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "create_checkpoint.py")
    out = tmp_path / "ti16"
    cmd = [
        sys.executable,
        script,
        "--preset",
        "vit-ti16",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--num-labels",
        "10",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 10 and model.config.hidden_size == 192 and model.config.image_size == 64
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-classification" in card
    assert f"{model.num_parameters():,} parameters" in card
    assert "| hidden size (D) | 192 |" in card and "| patch grid | 4x4 = 16 tokens |" in card
    processor = AutoImageProcessor.from_pretrained(out)
    pixel_values = processor(images=Image.fromarray(np.zeros((100, 80, 3), np.uint8)), return_tensors="pt")
    assert pixel_values.pixel_values.shape == (1, 3, 64, 64)


def test_the_saved_image_processor_takes_every_pillow_mode_from_real_files(saved, tmp_path):
    """transformers' ViT processor does not convert to RGB by default: a grayscale file used to fail with "mean must
    have 1 elements". Saved folders convert (do_convert_rgb), like CLIP's and SigLIP's processors."""
    from tests.image_files import write_mode_files

    _, path = saved
    assert json.loads((path / "preprocessor_config.json").read_text())["do_convert_rgb"] is True
    processor = AutoImageProcessor.from_pretrained(path)
    files = write_mode_files(tmp_path / "images")
    for name, file in files.items():
        with Image.open(file) as image:
            pixel_values = processor(images=image, return_tensors="pt").pixel_values
        assert pixel_values.shape == (1, 3, 32, 32), name
    with Image.open(files["gray.png"]) as gray:
        pixels = processor(images=gray, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(pixels[0], pixels[1])  # grey: R = G = B
    with Image.open(files["rgba.png"]) as rgba:  # the left half is fully transparent: white, 1.0 after normalising
        left = processor(images=rgba, return_tensors="pt").pixel_values[0, :, :, :8]
    torch.testing.assert_close(left, torch.ones_like(left))


def test_old_folders_without_rgb_conversion_are_upgraded_or_loaded_with_it(saved, tmp_path, caplog):
    from vlm_vision.export.encoder_folder import load_image_processor, main, upgrade_checkpoint

    _, path = saved
    config_file = path / "preprocessor_config.json"
    old = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "do_convert_rgb"}
    config_file.write_text(json.dumps(old))  # as every folder written before
    gray = Image.new("L", (40, 30), 128)
    with pytest.raises(ValueError, match="mean must have 1 elements"):  # transformers' own processor, as loaded
        AutoImageProcessor.from_pretrained(path)(images=gray)
    with caplog.at_level("WARNING"):
        AutoModel.from_pretrained(path)
    assert "does not convert images to RGB" in caplog.text and "--upgrade" in caplog.text
    # without touching the folder
    assert load_image_processor(path)(images=gray, return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)
    assert load_image_processor(path, do_convert_rgb=False).do_convert_rgb is False  # an explicit choice is kept
    # or fixed in place, once
    main(["--upgrade", str(path)])
    assert json.loads(config_file.read_text()) == {**old, "do_convert_rgb": True}
    assert AutoImageProcessor.from_pretrained(path)(images=gray, return_tensors="pt").pixel_values.shape[1] == 3
    assert upgrade_checkpoint(path) == []  # already up to date
    names = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "position_embeddings.py"}
    assert {p.name for p in path.iterdir()} == names | {"configuration_vit.py", "modeling_vit.py"}
    with pytest.raises(SystemExit):
        main(["--upgrade", str(tmp_path / "nowhere")])


def test_image_processor_for_other_channel_counts():
    from vlm_vision.export.encoder_folder import image_processor_for

    gray_model = tiny_config(num_channels=1)
    processor = image_processor_for(gray_model)
    assert not processor.do_convert_rgb and list(processor.image_mean) == [0.5]
    assert processor(images=Image.new("L", (40, 30)), return_tensors="pt").pixel_values.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"image_mean=\[0.1, 0.2\] has 2 values but the model has num_channels=3"):
        image_processor_for(tiny_config(), image_mean=[0.1, 0.2])


def test_create_checkpoint_and_save_checkpoint_check_their_arguments(tmp_path, capsys):
    from vlm_vision.export.encoder_folder import main

    with pytest.raises(ValueError, match=r"num_labels=0 must be a positive int.*leave it None"):
        create_checkpoint("vit-ti16", tmp_path / "a", num_labels=0, image_size=32)
    with pytest.raises(ValueError, match=r"seed must be an int, got 'a'"):
        create_checkpoint("vit-ti16", tmp_path / "a", seed="a", image_size=32)
    with pytest.raises(TypeError, match=r"has no field 'image_sise'"):
        create_checkpoint("vit-ti16", tmp_path / "a", image_sise=32)
    with pytest.raises(TypeError, match=r"save_checkpoint writes VisionTransformerModel.*got Linear"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "a", title="t", summary="s")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"file exists and is not a folder"):
        create_checkpoint("vit-ti16", tmp_path / "file", image_size=32, overwrite=True)
    for argv, message in (
        (["--preset", "vit-x16"], "Unknown preset 'vit-x16'"),
        (["--preset", "vit-ti16", "--image-size", "30"], "image_size=30 is not divisible by patch_size=16"),
        (["--preset", "vit-ti16", "--num-labels", "0"], "num_labels=0 must be a positive int"),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "cli")])
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written
