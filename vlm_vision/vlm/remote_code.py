"""The code a saved VLM folder carries, so that it loads with `trust_remote_code=True` where vlm-vision isn't installed.

transformers' remote-code loader (`transformers.dynamic_module_utils`) imports a folder's files as one flat package:
it follows `from .sibling import X` and nothing else (no sub-packages, no `..parent`). The VLM's code spans
`vlm_vision/vlm/`, `vlm_vision/encoder/`, `vlm_vision/adapters/` and `vlm_vision/data/`, so `write_code_files` copies
exactly the files it needs side by side (`CODE_FILES`) and rewrites the imports that cross a package boundary
(`REWRITES`: `from ..encoder.modeling_vit import` becomes `from .modeling_vit import`); the adapters package's
`__init__.py` becomes `adapters.py`. The copies import only torch, transformers, numpy, PIL and each other (the save
checks it).

The encoder's folders get their code from transformers (`register_for_auto_class`): its files already are siblings.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from importlib.util import find_spec
from pathlib import Path

# file in the saved folder -> its module, relative to the top package (vlm_vision)
CODE_FILES = {
    "configuration_vlm.py": "vlm.configuration_vlm",
    "modeling_vlm.py": "vlm.modeling_vlm",
    "packed_attention.py": "vlm.packed_attention",
    "processing_vlm.py": "vlm.processing_vlm",
    "remote_code.py": "vlm.remote_code",
    "configuration_vit.py": "encoder.configuration_vit",
    "modeling_vit.py": "encoder.modeling_vit",
    "image_processing_vit.py": "encoder.image_processing_vit",
    "position_embeddings.py": "encoder.position_embeddings",
    "adapters.py": "adapters",
    "base.py": "adapters.base",
    "linear.py": "adapters.linear",
    "mlp.py": "adapters.mlp",
    "pixel_shuffle.py": "adapters.pixel_shuffle",
    "resampler.py": "adapters.resampler",
    "images.py": "data.images",
}
_ADAPTERS = ("from ..adapters import", "from .adapters import")
_VIT_CONFIG = ("from ..encoder.configuration_vit import", "from .configuration_vit import")
_IMAGES = ("from ..data.images import", "from .images import")
# the imports that leave a flat folder, and what they become there
REWRITES = {
    "configuration_vlm.py": [_ADAPTERS, _VIT_CONFIG],
    "modeling_vlm.py": [_ADAPTERS, _VIT_CONFIG, ("from ..encoder.modeling_vit import", "from .modeling_vit import")],
    "processing_vlm.py": [_IMAGES],
    "remote_code.py": [
        ("from ..encoder.image_processing_vit import", "from .image_processing_vit import"),
        _IMAGES,
    ],
    "base.py": [
        (
            "from ..export.folders import replace_directory_atomically",
            'raise ImportError("Adapter.save_pretrained needs the vlm-vision package (pip install vlm-vision): this '
            'copy of the adapter code came with a saved VLM folder, which loads and runs without it.")',
        )
    ],
}
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_vlm.VisionLanguageConfig",
    "AutoModelForImageTextToText": "modeling_vlm.VisionLanguageForConditionalGeneration",
    "AutoProcessor": "processing_vlm.VisionLanguageProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_vlm.VisionLanguageProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_vit.VisionTransformerImageProcessor"}
_PACKAGE = (__package__ or "").rpartition(".")[0]  # vlm_vision (unused in a flat copy)
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+(\.+)(\S*)\s+import|import\s+(\.+)(\S*))", re.MULTILINE)


def _import_closure() -> None:
    """Never called: transformers copies a remote module and the files its relative imports name (read as text) into
    its module cache, and a model loaded from there re-saves from its own cache folder (`code_sources`, flat). These
    imports put every file of `CODE_FILES` into that folder, not only those `modeling_vlm` needs to run."""
    from ..data.images import to_rgb  # noqa: F401
    from ..encoder.image_processing_vit import VisionTransformerImageProcessor  # noqa: F401
    from .processing_vlm import VisionLanguageProcessor  # noqa: F401


def _flat() -> bool:
    # this file is itself a copy in a saved folder (loaded by transformers as remote code)
    return (Path(__file__).parent / "adapters.py").is_file()


def code_sources() -> dict[str, str]:
    """The text of each file in `CODE_FILES`, imports rewritten for a flat folder."""
    here = Path(__file__).parent
    sources = {}
    for name, module in CODE_FILES.items():
        if _flat():
            sources[name] = (here / name).read_text(encoding="utf-8")
            continue
        text = Path(find_spec(f"{_PACKAGE}.{module}").origin).read_text(encoding="utf-8")
        for old, new in REWRITES.get(name, []):
            if old not in text:
                raise RuntimeError(f"{name}: the import {old!r} is gone; update remote_code.REWRITES to match.")
            text = text.replace(old, new)
        sources[name] = text
    for name, text in sources.items():
        for dots, module, import_dots, import_module in _RELATIVE_IMPORT.findall(text):
            dots, module = dots or import_dots, module or import_module
            if dots != "." or f"{module}.py" not in sources:
                raise RuntimeError(
                    f"{name} imports {dots}{module}, which a flat VLM folder doesn't hold: add the file to "
                    "remote_code.CODE_FILES or the import to remote_code.REWRITES."
                )
    return sources


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling renamed over it: the old file or the new one, never half of one."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_code_files(folder: str | os.PathLike) -> None:
    """Write the VLM's code files into `folder` (each atomically)."""
    folder = Path(folder)
    for name, text in code_sources().items():
        write_text_atomically(folder / name, text)


def add_model_auto_map(folder: str | os.PathLike) -> None:
    """`auto_map` in `folder/config.json`: the config, the model and the processor by their copied files."""
    _add_auto_map(Path(folder) / "config.json", MODEL_AUTO_MAP)


def add_processor_auto_map(folder: str | os.PathLike, image_processor_is_ours: bool) -> None:
    """`auto_map` in `folder/processor_config.json` (and its nested image processor's, when that is our class)."""
    path = Path(folder) / "processor_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
    nested = config.get("image_processor")
    if image_processor_is_ours and isinstance(nested, dict):
        nested["auto_map"] = {**nested.get("auto_map", {}), **IMAGE_PROCESSOR_AUTO_MAP}
    write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
