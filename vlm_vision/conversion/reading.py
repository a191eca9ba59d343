"""Reading source files safely: safetensors first, PyTorch files with `torch.load(weights_only=True)`, `.npz`
with `allow_pickle=False`; a truncated, empty or foreign file raises a ValueError naming it."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch


def _find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: safetensors (possibly sharded) first, then PyTorch files, then .npz."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        indices = sorted(folder.glob(pattern))
        if indices:
            index = _read_json(folder, indices[0].name)
            if not isinstance(index.get("weight_map"), dict):
                raise ValueError(f"{indices[0]} has no weight_map: it is not a sharded-checkpoint index.")
            return [folder / name for name in sorted(set(index["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):  # the standard names win over any other file
        if (folder / name).is_file():
            return [folder / name]
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt", "*.npz"):
        files = sorted(folder.glob(pattern))
        if files:
            if len(files) > 1:
                raise ValueError(
                    f"{folder} holds several weight files {[f.name for f in files]} and no index: pass the file to "
                    "convert instead of the folder."
                )
            return files
    raise FileNotFoundError(
        f"No weights in {folder}: expected model.safetensors (or a sharded index), pytorch_model.bin, *.pth or *.npz."
    )


def _unwrap_torch_checkpoint(obj, path: Path) -> dict[str, torch.Tensor]:
    # training checkpoints nest the weights: {"model": ...} (DeiT, timm train scripts) or {"state_dict": ...}
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, dict) else sorted(obj)[:10]
        raise ValueError(f"{path} is not a state dict of tensors (found {found}).")
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the tensors of a weight file or folder without executing anything from it.

    safetensors are read directly, PyTorch pickles with `weights_only=True` (plain tensors and containers only), and
    `.npz` archives with `allow_pickle=False`; keys of an `.npz` keep their `/`-separated JAX names.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a local checkpoint folder or file (nothing is downloaded)."
        )
    files = _find_weight_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist (a shard the index names?): copy the whole checkpoint.")
        state.update(_read_weight_file(file))
    return state


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """One file's tensors; a file that cannot be read raises a ValueError naming it and the fix."""
    from safetensors.torch import load_file

    suffix = file.name.rsplit(".", 1)[-1]
    if suffix not in ("safetensors", "bin", "pt", "pth", "npz"):
        raise ValueError(f"Unknown weight file type {file.name}: use .safetensors, .bin/.pt/.pth or .npz.")
    try:
        if suffix == "safetensors":
            return load_file(str(file))
        if suffix == "npz":
            if not zipfile.is_zipfile(file):  # np.load would read anything else as a pickle
                raise zipfile.BadZipFile("not a zip archive (an .npz is one)")
            with np.load(file, allow_pickle=False) as archive:
                return {k: torch.from_numpy(np.array(archive[k])) for k in archive.files}
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ValueError(_unreadable(file, error)) from error
        raise ValueError(
            f"Refusing to load {file}: it pickles objects other than tensors, and unpickling them could run "
            f"arbitrary code ({str(error).splitlines()[0]}). Re-save its state dict with safetensors."
        ) from error
    except ValueError as error:
        if suffix != "npz" or "allow_pickle" not in str(error):
            raise ValueError(_unreadable(file, error)) from error
        raise ValueError(
            f"Refusing to load {file} ({error}): pickled objects are not loaded (allow_pickle=False); a JAX "
            "checkpoint holds only arrays."
        ) from error
    except Exception as error:  # SafetensorError, EOFError, BadZipFile, torch's RuntimeError/IndexError/KeyError...
        raise ValueError(_unreadable(file, error)) from error
    return _unwrap_torch_checkpoint(obj, file)


def _unreadable(file: Path, error: Exception) -> str:
    size = file.stat().st_size if file.exists() else 0
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"Cannot read {file} ({size} bytes; {reason}): it is truncated, empty or not a weight file, as after an "
        "interrupted download or copy. Download or copy the checkpoint again."
    )


def _read_json(folder: Path, name: str) -> dict | None:
    """`folder/name` as a dict, None when there is no such file; a file that is not a JSON object is named."""
    file = folder / name
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}): it is empty or truncated. Copy it again from the source checkpoint."
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object: it is not a checkpoint config.")
    return data
