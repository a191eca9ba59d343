"""The shipped recipes and accelerate configs, installed as `vlm_vision.recipes` (package data of the wheel).

`configs/` in a checkout and `vlm_vision/recipes/` in an installed wheel are the same files, so `vlm-vision train`
finds the built-in default either way. A recipe is named by its file path or by its shipped name
(`llava_1_5`, `llava_1_5.json` or `vlm/llava_1_5.json`).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

KINDS = ("vlm", "classifier", "accelerate")
SUFFIXES = (".json", ".yaml")


def root() -> Path:
    """The folder holding the shipped files (`configs/` in a checkout)."""
    return Path(str(files(__name__)))


def names(kind: str | None = None) -> list[str]:
    """The shipped files as `kind/file` names, e.g. `vlm/easy_vqa.json`; only those of `kind` if given."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: the shipped kinds are {', '.join(KINDS)}.")
    kinds = [kind] if kind else KINDS
    return sorted(f"{k}/{p.name}" for k in kinds for p in (root() / k).iterdir() if p.suffix in SUFFIXES)


def path(name: str) -> Path:
    """The shipped file `name` (`vlm/easy_vqa.json`)."""
    found = root() / name
    if name not in names():
        raise ValueError(f"No shipped file {name!r}; the shipped ones are: {', '.join(names())}.")
    return found


def resolve(spec: str | os.PathLike, kind: str) -> Path:
    """A recipe given as a file path, or as the name of a shipped one of `kind` (`llava_1_5`, `vlm/llava_1_5.json`).

    Raises:
        ValueError: neither an existing file nor a shipped name; the shipped names are listed.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"A recipe is a file path or a shipped name, got {spec!r}.")
    given = Path(spec)
    if given.is_file():
        return given
    shipped = names(kind)
    stem = given.name.removesuffix(given.suffix) if given.suffix in SUFFIXES else given.name
    for name in shipped:
        if Path(name).stem == stem and (given.parent == Path(".") or given.parent.name == kind):
            return root() / name
    raise ValueError(
        f"{str(spec)!r} is neither a file nor a shipped {kind} recipe. Give a path to a recipe file, or one of: "
        + ", ".join(Path(name).stem for name in shipped)
        + f" (files under {root() / kind})."
    )
