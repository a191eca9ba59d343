"""Writing result folders: one atomic folder save for every output.

:func:`save_folder_atomically` writes a folder into a temporary sibling and renames it into place, so a run killed
while saving leaves the previous folder (or none), never a half-written one that looks complete. Encoder checkpoints
(`encoder_folder.save_checkpoint`) and the recipes' outputs go through it; the adapter's pair, which keeps the other
files of its folder, goes through its last step, :func:`replace_directory_atomically`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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


__all__ = ["check_out_dir", "replace_directory_atomically", "save_folder_atomically"]
