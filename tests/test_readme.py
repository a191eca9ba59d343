"""The README and docs can't drift from the code: every shell command in their ```bash blocks is checked.

- The two set-up commands: the test command is exactly `.ci/run`'s.
- `vlm-vision SUB ARGS` (also under `accelerate launch --config_file C -m vlm_vision.cli`) and `python scripts/X.py
  ARGS`: ARGS parse with that command's own argument parser (its `main` is entered and stopped right after
  `parse_args`), and the repository files the command names exist.
- The fast ones run for real (`create_checkpoint.py` writes its folder, which then loads).
- Every ```python block compiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from vlm_vision import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def _blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(page.read_text()) if lang == language]


def _commands(page: Path) -> list[str]:
    """Shell commands of a page: `\\` continuations joined, comments dropped, `&&` chains split."""
    commands = []
    for body in _blocks(page, "bash"):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


ALL_COMMANDS = [(page.relative_to(ROOT).as_posix(), command) for page in PAGES for command in _commands(page)]


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def _load_script(script: Path):
    spec = importlib.util.spec_from_file_location(f"readme_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_only(main, args: list[str], monkeypatch) -> argparse.Namespace:
    """Enter `main(args)` and stop it right after its argument parser accepted `args`."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as parsed:
        main(args)
    return parsed.value.namespace


def _main_and_args(words: list[str]):
    """`(main, args)` of a command of ours, or None for set-up lines."""
    if words and words[0] == "accelerate":
        assert words[1] == "launch" and words[2] == "--config_file", words
        assert (ROOT / words[3]).is_file(), f"accelerate config {words[3]} does not exist"
        words = words[4:]
        if words[:2] == ["-m", "vlm_vision.cli"]:
            return cli.main, words[2:]
        words = ["python", *words]
    if words and Path(words[0]).name == "vlm-vision":
        return cli.main, words[1:]
    if len(words) >= 2 and Path(words[0]).name in ("python", "python3") and words[1].startswith("scripts/"):
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        return _load_script(script).main, words[2:]
    return None


def test_the_pages_have_commands_to_check():
    assert len(ALL_COMMANDS) > 20
    assert any(command.startswith("accelerate launch") for _, command in ALL_COMMANDS)


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first_block = _blocks(ROOT / "README.md", "bash")[0].strip().splitlines()
    assert len(first_block) == 2
    setup = 'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ".[dev]" && '
    assert first_block[0].startswith(setup) and first_block[1].startswith(setup)
    assert first_block[1].endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == first_block[1]


@pytest.mark.parametrize(("page", "command"), ALL_COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in ALL_COMMANDS])
def test_every_script_command_parses(page, command, monkeypatch):
    words = shlex.split(command)
    if words[0].endswith("/python") or words[0] == "python":
        words[0] = "python"
    found = _main_and_args(words)
    if found is None:
        # set-up lines (venv, pip) and the test runner: nothing of ours to parse
        assert re.match(r"(python3 -m venv|\.venv/bin/pip|python -m pytest)", " ".join(words)), (
            f"{page}: a command this test does not know how to check: {command}"
        )
        return
    main, args = found
    for arg in args:
        if re.match(r"(configs|scripts|docs)/", arg):
            assert (ROOT / arg).exists(), f"{page}: {arg} (in {command!r}) does not exist"
    if "..." in args:  # "the rest as above": parse what is given
        args = [a for a in args if a != "..."]
    _parse_only(main, args, monkeypatch)


def test_the_checkpoint_command_runs_and_its_folder_loads(tmp_path, monkeypatch):
    from transformers import AutoImageProcessor, AutoModel

    command = next(c for _, c in ALL_COMMANDS if "create --preset vit-s16" in c)
    main, args = _main_and_args(shlex.split(command))
    monkeypatch.chdir(tmp_path)
    main(args)
    out = tmp_path / args[args.index("--out") + 1]
    model = AutoModel.from_pretrained(out)
    assert model.config.image_size == 384 and model.config.hidden_size == 384
    assert AutoImageProcessor.from_pretrained(out).size["height"] == 384


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_compile(page):
    for index, body in enumerate(_blocks(page, "python")):
        compile(body, f"{page.name} python block {index}", "exec")
