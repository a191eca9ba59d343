"""Recipes are data with a schema: strict construction from dicts, and `--set dotted.key=value` overrides.

- :func:`from_dict` builds a dataclass from a dict, refusing keys it doesn't have (naming the closest valid one and
  listing them all) and building nested dataclass fields (a stage's `optimizer`) the same way.
- :func:`check_keys` does the same for the free-form sections whose valid keys are a set (`vision`, `data`, ...).
- :func:`read_recipe` reads a recipe file (VLM or classifier) into a dict, naming a missing file, broken JSON or a
  JSON value that is not an object.
- :func:`apply_overrides` sets values in the raw recipe before it is built: `stages.finetune.batch_size=64`
  (a stage by name or index), `language_model.dtype=bfloat16`, `stages.0.optimizer.learning_rate=2e-5`. Values
  are read as JSON when they parse (numbers, true/false/null, lists, objects), else as strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(data: dict, valid: Iterable[str], where: str) -> None:
    """Refuse keys of `data` that are not in `valid`, naming the closest valid key and listing them all."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a JSON object (a dict), got {type(data).__name__}: {data!r}.")
    valid = sorted(set(valid))
    unknown = [key for key in data if key not in valid]
    if unknown:
        details = ", ".join(f"{key!r}{_suggest(key, valid)}" for key in unknown)
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {details}; valid keys: {valid}.")


def from_dict(cls, data: dict, where: str):
    """`cls(**data)` for a dataclass `cls`, with unknown keys refused, in nested dataclass-typed fields too (a
    stage's `optimizer`: its dict is checked here and converted by the class itself)."""
    if isinstance(data, cls):
        return data
    check_fields(cls, data, where)
    try:
        return cls(**data)
    except TypeError as error:  # a missing required field
        raise ValueError(f"{where}: {error}") from None


def check_fields(cls, data: dict, where: str) -> None:
    """Refuse keys of `data` that are not init fields of the dataclass `cls`, recursively."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        kind = _dataclass_in(hints.get(key))
        if kind is not None and isinstance(value, dict):
            check_fields(kind, value, f"{where}.{key}")


def _dataclass_in(hint) -> type | None:
    """The dataclass in a type hint such as `OptimizerConfig` or `OptimizerConfig | None`."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)


def read_recipe(path) -> dict:
    """The JSON object of the recipe file `path`, before any checking of its keys."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"Recipe {path} does not exist: check the path (configs/*/*.json).") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Recipe {path} is not valid JSON ({error}): check the file is complete.") from error
    if not isinstance(raw, dict):
        raise ValueError(f"Recipe {path} holds a JSON {type(raw).__name__}; a recipe is an object (its sections).")
    return raw


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (`3`, `2e-5`, `true`, `null`, `[1, 2]`), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict, assignments: Sequence[str]) -> dict:
    """Set `dotted.key=value` assignments in the raw recipe dict (in place; returned for convenience).

    In `stages`, the next part names a stage (`stages.finetune.batch_size=64`) or its index (`stages.1...`).
    Intermediate objects are created when missing (`data.eval=...` on a recipe without `data.eval`); whether a key
    exists is checked when the recipe is built, with the valid keys listed.
    """
    for assignment in assignments:
        path, sep, text = assignment.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {assignment!r}: write dotted.key=value, e.g. stages.finetune.batch_size=64.")
        keys = path.split(".")
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]), create=True)
        last = keys[-1]
        if isinstance(node, list):
            node[_list_position(node, last, path)] = parse_value(text)
        elif isinstance(node, dict):
            node[last] = parse_value(text)
        else:
            raise ValueError(f"--set {assignment!r}: {'.'.join(keys[:-1])} is {node!r}, not an object.")
    return raw


def _child(node: Any, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_position(node, key, where)]
    if not isinstance(node, dict):
        raise ValueError(f"--set {where}: {where.rsplit('.', 1)[0]} is {node!r}, not an object.")
    if node.get(key) is None and create:
        node[key] = {}
    return node[key]


def _list_position(items: list, key: str, where: str) -> int:
    """A list element by index, or (stages) by its `name`."""
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if key in names:
        return names.index(key)
    if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
        return int(key)
    raise ValueError(f"--set {where}: no element {key!r}; name one of {names} or an index below {len(items)}.")


__all__ = ["apply_overrides", "check_fields", "check_keys", "from_dict", "parse_value", "read_recipe"]
