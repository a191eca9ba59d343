"""Writing result folders: one atomic folder save for every output, and the VLM's model card.

:func:`save_folder_atomically` writes a folder into a temporary sibling and renames it into place, so a run killed
while saving leaves the previous folder (or none), never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import replace_directory_atomically


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
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["vision", "vlm-vision", "vision-language-model"],
        datasets=["easy-vqa"] if data_name == "easy-vqa" else None,
    )
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
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


__all__ = ["save_folder_atomically", "write_vlm_card"]
