"""A user's images in a folder with one sub-folder per class (`root/cat/1.jpg`, `root/dog/2.png`, ...)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .images import IMAGE_EXTENSIONS, LabelledImages

logger = logging.getLogger(__name__)


def load_image_folder(root: str | os.PathLike, class_names: tuple[str, ...] | None = None) -> LabelledImages:
    """The images under `root/<class name>/` (any depth below it), labelled by sub-folder, classes sorted by name.

    Args:
        root: the folder; its sub-folders are the classes. Files with other extensions than `IMAGE_EXTENSIONS` and
            hidden files are ignored.
        class_names: the classes in label order, e.g. the training split's when reading a validation split, so
            both use the same label numbers. Default: the sub-folders of `root`, sorted.

    Raises:
        ValueError: `root` is not a folder, has no class sub-folders or no images, or has a class that is not in
            `class_names`.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or pathlib.Path), got {type(root).__name__}.")
    if class_names is not None and (
        isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names)
    ):
        raise TypeError(f"class_names must be a sequence of class names (strings), got {class_names!r}.")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"Image folder {root} does not exist or is not a folder: pass a folder with one sub-folder "
            "of images per class."
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"{root} has no sub-folders: put the images of each class in root/<class name>/.")
    names = tuple(class_names) if class_names is not None else tuple(found)
    if len(set(names)) != len(names):
        raise ValueError(f"class_names {list(names)} repeats a name: each class needs its own.")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root} has classes {unknown} that are not among the training classes {list(names)}.")
    paths, labels = [], []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            logger.warning("Class %r (%s) has no image files.", name, folder)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/.")
    return LabelledImages(tuple(paths), tuple(labels), names)
