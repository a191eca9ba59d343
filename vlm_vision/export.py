"""Writing result folders: one atomic folder save for every output, and the VLM's model card.

:func:`save_folder_atomically` writes a folder into a temporary sibling and renames it into place, so a run killed
while saving leaves the previous folder (or none), never a half-written one that looks complete. Encoder checkpoints
(`checkpoint.save_checkpoint`) and the recipes' outputs go through it; the adapter's pair, which keeps the other files
of its folder, goes through its last step, :func:`replace_directory_atomically`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .model_card import model_card


def check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether `out_dir` exists (to be replaced); refuses a file in the way, and an existing folder unless
    `overwrite`."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return False
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder: choose another output folder.")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists: pass --overwrite (overwrite=True) to replace it.")
    return True


def replace_directory_atomically(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a fully written `staging` folder to `out_dir` (same file system), replacing it only when `overwrite`."""
    if check_out_dir(out_dir, overwrite):
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        try:
            os.replace(staging, out_dir)
        except BaseException:  # put the previous folder back rather than leave none
            os.replace(trash / out_dir.name, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash)
    else:
        os.replace(staging, out_dir)


def save_folder_atomically(folder: str | Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call `write(staging)` on a fresh temporary sibling of `folder`, then move it to `folder` (replacing it only
    when `overwrite`). Nothing is left behind when `write` fails."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        write(staging)
        replace_directory_atomically(staging, folder, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_vlm_card(folder: Path, recipe: dict, rows: list[dict], evaluation: dict | None, model) -> None:
    """The model card of a trained VLM: metadata, the evaluation, the stages and the recipe."""
    data_name = recipe.get("data", {}).get("name")
    accuracy = ""
    if evaluation and "accuracy" in evaluation:
        lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in evaluation["accuracy"].items())
        header = f"Greedy answers, exact match, {evaluation['num_samples']} questions of {evaluation.get('data')}:"
        accuracy = f"{header}\n\n| | accuracy |\n|---|---|\n{lines}"
    stages = "\n".join(
        f"| {r['stage']} | {r['kind']} | {r.get('steps', '')} | {r.get('train_seconds', '')} |" for r in rows
    )
    body = (
        f"# A vision-language model trained with vlm-vision\n\n"
        f"{model.num_parameters():,} parameters: a `{model.config.vision_config.model_type}` vision tower, a "
        f"`{model.config.adapter_config['adapter_type']}` adapter and a `{model.config.text_config.model_type}` "
        "causal LM. Load with `import vlm_vision` then `AutoModelForImageTextToText.from_pretrained(path)` and "
        f"`AutoProcessor.from_pretrained(path)`.\n\n## Evaluation\n\n{accuracy or 'not evaluated'}\n\n"
        f"## Training\n\n| stage | kind | steps | seconds |\n|---|---|---|---|\n{stages}\n\n"
        f"## Recipe\n\n```json\n{json.dumps(recipe, indent=2, default=str)}\n```\n"
    )
    card = model_card(
        body,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["vision", "vlm-vision", "vision-language-model"],
        datasets=["easy-vqa"] if data_name == "easy-vqa" else None,
    )
    card.save(folder / "README.md")


__all__ = ["check_out_dir", "replace_directory_atomically", "save_folder_atomically", "write_vlm_card"]
