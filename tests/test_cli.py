"""`vlm-vision`, the one console script: subcommands, shipped recipes by name, `ask`, and a wheel that carries both."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.vlm_helpers import build_vlm, shapes_image, train_tokenizer
from vlm_vision import cli, recipes
from vlm_vision.data.conversations import VLMSample
from vlm_vision.evaluation.generation import generate_answers

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_shows_its_own_help(name, capsys):
    argv = [name, "vlm", "--help"] if name == "benchmark" else [name, "--help"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    prog = f"vlm-vision {name} vlm" if name == "benchmark" else f"vlm-vision {name}"
    assert f"usage: {prog}" in " ".join(capsys.readouterr().out.split())


def test_the_top_level_help_lists_every_subcommand(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_) in cli.SUBCOMMANDS.items():
        assert f"{name} " in out and help_ in out


def test_an_unknown_subcommand_or_benchmark_is_named_with_the_valid_ones():
    with pytest.raises(SystemExit, match=r"(?s)unknown subcommand 'trian'.*subcommands:.*  train "):
        cli.main(["trian"])
    with pytest.raises(SystemExit, match=r"unknown benchmark 'gpu'; choose one of encoder, vlm, data-memory"):
        cli.main(["benchmark", "gpu"])


def test_the_installed_console_script_runs():
    script = Path(sys.executable).parent / "vlm-vision"
    assert script.is_file(), "the package is installed without its console script: reinstall with pip install -e ."
    done = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: vlm-vision train" in done.stdout and "easy_vqa" in done.stdout


def test_recipes_by_name_or_path():
    assert recipes.resolve("easy_vqa", "vlm") == recipes.root() / "vlm" / "easy_vqa.json"
    assert recipes.resolve("llava_1_5.json", "vlm").samefile(ROOT / "configs" / "vlm" / "llava_1_5.json")
    # the README's relative paths work from any folder: a missing file under configs/vlm/ is the shipped one
    assert recipes.resolve("configs/vlm/llava_1_5_lora.json", "vlm").name == "llava_1_5_lora.json"
    assert recipes.resolve("easy_vqa", "classifier").parent.name == "classifier"
    given = ROOT / "configs" / "vlm" / "easy_vqa.json"
    assert recipes.resolve(given, "vlm") == given
    assert "vlm/easy_vqa.json" in recipes.names("vlm") and "accelerate/fsdp_cpu_2proc.yaml" in recipes.names()
    with pytest.raises(ValueError, match=r"'llava15' is neither a file nor a shipped vlm recipe.*llava_1_5, "):
        recipes.resolve("llava15", "vlm")
    with pytest.raises(ValueError, match="shipped kinds are vlm, classifier, accelerate"):
        recipes.names("vml")
    with pytest.raises(ValueError, match=r"No shipped file 'vlm/nope\.json'"):
        recipes.path("vlm/nope.json")


def test_train_refuses_an_unknown_recipe_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--recipe", "easy-vqa"])
    assert exit_.value.code == 2
    assert "'easy-vqa' is neither a file nor a shipped vlm recipe" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    model, processor = build_vlm(train_tokenizer())
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = folder.parent / "shape.png"
    shapes_image(3).save(image)
    return folder, image, model, processor


def test_the_script_exits_0_when_a_subcommand_returns_a_value(vlm_folder):
    # `ask` returns its answer to Python callers; the console script must not take it for an exit status
    folder, image, *_ = vlm_folder
    code = (
        "import sys; from vlm_vision.cli import console; sys.argv = ['vlm-vision', *sys.argv[1:]]; sys.exit(console())"
    )
    argv = ["ask", str(folder), str(image), "what is the blue shape?", "--max-new-tokens", "3"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() and done.stdout.strip() not in done.stderr


def test_ask_prints_the_greedy_answer_of_generate(vlm_folder, capsys):
    folder, image, model, processor = vlm_folder
    question = "what is the blue shape?"
    answer = cli.main(["ask", str(folder), str(image), question, "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == answer.strip()
    # the same as generate() on the processor's own prompt
    prompt = processor.expand_image_tokens(processor.prompt([{"role": "user", "content": f"<image>\n{question}"}]))
    inputs = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    pixel_values = processor.process_images([shapes_image(3)])
    with torch.inference_mode():
        output = model.eval().generate(
            **inputs, pixel_values=torch.stack(list(pixel_values)), max_new_tokens=6, do_sample=False
        )
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == expected.strip()
    sample = VLMSample(images=[str(image)], messages=[{"role": "user", "content": f"<image>\n{question}"}], id="x")
    assert generate_answers(model, processor, [sample], max_new_tokens=6, progress_bar=False) == [answer]


def test_ask_names_a_missing_folder_or_image(vlm_folder, tmp_path, capsys):
    folder, image, _, _ = vlm_folder
    for argv, message in [
        ([str(tmp_path), str(image), "q"], "is not a saved model folder (no config.json)"),
        ([str(folder), str(tmp_path / "none.png"), "q"], "none.png is not a file"),
        ([str(folder), str(image), "q", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["ask", *argv])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"broken\.png could not be read as an image"):
        cli.main(["ask", str(folder), str(broken), "q"])


def test_evaluate_names_a_folder_that_is_not_a_model(tmp_path, capsys):
    """A wrong path is named before any data is read (transformers would take it for a Hub repository id)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", str(tmp_path / "run" / "model")])
    assert exit_.value.code == 2
    assert "model is not a saved model folder (no config.json): give the `vlm/` folder" in capsys.readouterr().err


def test_a_wheel_carries_the_recipes_and_the_commands(tmp_path):
    """Built offline from a copy of this checkout (setuptools writes build/ into the tree it builds); the default
    recipe resolves from the unpacked wheel, not the checkout."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".*", "build", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("vlm_vision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in recipes.names():
        assert f"vlm_vision/recipes/{shipped}" in names
    for command in (
        "train_vlm",
        "train_classifier",
        "evaluate_vlm",
        "analyze",
        "push_to_hub",
        "benchmark_vlm",
        "benchmark_encoder",
    ):
        assert f"vlm_vision/commands/{command}.py" in names
    assert "vlm_vision/cli.py" in names and "vlm_vision/adapters/mlp.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vlm-vision = vlm_vision.cli:console" in zipfile.ZipFile(wheel).read(entry_points).decode()

    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from vlm_vision import recipes, cli;"
        "import vlm_vision.commands.train_vlm as t; print(recipes.resolve('easy_vqa', 'vlm')); print(t.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, unpacked], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recipe, module = done.stdout.split()
    assert Path(recipe) == unpacked / "vlm_vision" / "recipes" / "vlm" / "easy_vqa.json" and Path(recipe).is_file()
    assert Path(module) == unpacked / "vlm_vision" / "commands" / "train_vlm.py"
