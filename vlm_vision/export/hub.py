"""Push a saved folder (an encoder checkpoint, a VLM, a LoRA adapter) to the Hugging Face Hub, exactly as saved.

The folder is uploaded as is, in one commit (`HfApi.create_commit`, what `upload_folder` and transformers'
`push_to_hub` both end in), rather than loaded and pushed again with `model.push_to_hub`: a folder we wrote is
already complete (the model card written from the real config, `auto_map` with the code files it names, the image
processor, processor and tokenizer files), and re-saving would drop or rewrite what the loaded classes don't know
about (the card, files beside the model) and load every weight into memory for nothing. The folder is checked first:
its config must load and its weights must all be there. A folder without a model card (a bare `save_pretrained`)
gets a minimal one with Hub metadata in the same commit; the folder itself is never modified.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers import AutoConfig

from .model_card import model_card

logger = logging.getLogger(__name__)

# Never uploaded: editor, OS and Python leftovers, and hidden files (`.git`, the staging folders of the atomic saves in
# `export/folders.py`).
IGNORED = (".*", "__pycache__", "*.pyc")
PIPELINE_TAGS = {"vlm_vision": "image-text-to-text", "vlm_vit": "image-feature-extraction"}


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but `owner/name` with the Hub's characters."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Bad repo id {repo_id!r}: {error} Use OWNER/NAME, e.g. my-user/vit-b16.") from error
    if repo_id.count("/") != 1:
        raise ValueError(f"Bad repo id {repo_id!r}: use OWNER/NAME (your user or organisation), e.g. my-user/vit-b16.")


def folder_files(folder: Path) -> list[str]:
    """The folder's files to upload, as sorted POSIX paths relative to it (hidden files and caches left out)."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(fnmatch.fnmatch(part, p) for part in relative.parts for p in IGNORED):
            files.append(relative.as_posix())
    return files


def check_folder(folder: str | os.PathLike) -> dict:
    """Refuse a folder that is not a complete saved model; return what it holds: `kind` ("model" or "peft"),
    `files`, and the loaded `config` (None for a peft adapter)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or pathlib.Path), got {type(folder).__name__}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass the folder written by save_pretrained / create_checkpoint.")
    files = folder_files(folder)
    if "config.json" in files:
        kind, config = "model", AutoConfig.from_pretrained(folder)  # a config our registry can't read fails here
    elif "adapter_config.json" in files:
        kind, config = "peft", None
    else:
        raise ValueError(
            f"{folder} has no config.json (files: {', '.join(files) or 'none'}): it is not a saved model. Save it "
            "with save_pretrained or vlm_vision.export.encoder_folder.create_checkpoint first."
        )
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights:
        raise ValueError(
            f"{folder} has a config but no .safetensors weights (files: {', '.join(files)}): the save did not finish. "
            "Save the model again."
        )
    for index in (name for name in files if name.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{folder / index} is not a valid shard index ({error}): save the model again.") from error
        if missing := sorted(shards - set(files)):
            raise ValueError(f"{folder}: {index} lists shards that are missing: {', '.join(missing)}.")
    for name in weights:  # a truncated file would upload as is: read every header
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError
            raise ValueError(
                f"{folder / name} is not a readable safetensors file ({error}): it is truncated or corrupt. Save the "
                "model again before pushing."
            ) from error
    return {"kind": kind, "files": files, "config": config}


def default_model_card(config, kind: str) -> ModelCard:
    """A minimal card with Hub metadata, for a folder saved without one."""
    model_type = getattr(config, "model_type", None)
    pipeline_tag = PIPELINE_TAGS.get(model_type)
    if any("ImageClassification" in name for name in getattr(config, "architectures", None) or []):
        pipeline_tag = "image-classification"
    usage = (
        "`pip install vlm-vision`, then `import vlm_vision` before loading with transformers' Auto classes "
        "(`AutoModelForImageTextToText` for the VLM, `AutoModel` for the encoder)."
    )
    return model_card(
        f"# {model_type or 'Adapter'} (vlm-vision)\n\n{usage}\n",
        library_name="peft" if kind == "peft" else "transformers",
        pipeline_tag=pipeline_tag,
        tags=["vlm-vision", *([model_type] if model_type else [])],
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Upload `folder` to the model repo `repo_id` (created if missing) in one commit.

    Args:
        folder: a saved folder (`config.json` + safetensors weights, or a peft adapter folder).
        repo_id: `owner/name`.
        commit_message: default "Upload <folder name> with vlm-vision".
        private: visibility of a repo created here (an existing repo keeps its own).
        revision: the branch to commit to (created from main if missing), or the PR's base with `create_pr`.
        create_pr: open a pull request instead of committing to the branch.
        token: a write token; default the logged-in one (`hf auth login`) or `HF_TOKEN`.
        api: the Hub client (tests pass a recorder).

    Returns:
        The `CommitInfo` (`commit_url`, `pr_url`).
    """
    check_repo_id(repo_id)
    for name, value, kinds in (
        ("commit_message", commit_message, (str, type(None))),
        ("private", private, (bool, type(None))),
        ("revision", revision, (str, type(None))),
        ("create_pr", create_pr, (bool,)),
        ("token", token, (str, type(None))),
    ):
        if not isinstance(value, kinds):
            raise TypeError(f"{name}={value!r} must be {' or '.join(k.__name__ for k in kinds)}.")
    contents = check_folder(folder)
    folder = Path(folder)
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: log in with `hf auth login`, or set HF_TOKEN to a write token from "
            "https://huggingface.co/settings/tokens."
        )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in contents["files"]
    ]
    if "README.md" not in contents["files"]:
        logger.warning("%s has no README.md: uploading a minimal model card with Hub metadata", folder)
        card = default_model_card(contents["config"], contents["kind"])
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    logger.info("uploading %d files from %s to %s", len(operations), folder, url)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {folder.resolve().name} with vlm-vision",
        token=token,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )


__all__ = ["check_folder", "check_repo_id", "push_folder"]
