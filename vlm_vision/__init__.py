"""vlm-vision: the Vision Transformer as a Hugging Face model, projection adapters and a vision-language model.

Importing the package registers the encoder with transformers' Auto classes, so that
`AutoModel.from_pretrained("./vit-b16")` works without `trust_remote_code`.

The layout, one sub-package per concern: `encoder/` (the ViT; its files are copied into checkpoints), `vlm/` (the
vision-language model around it; `adapters/` holds the projectors), and the tooling: `conversion/`, `data/`,
`training/`, `evaluation/`, `export/`, `analysis/`. Modules of the earlier flat layout (`vlm_vision.modeling_vlm_vit`,
...) still import, as the same module objects under their old names: see `MOVED_MODULES`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.utils import is_torchvision_available

from .encoder.configuration_vit import PRESET_NAMES, PRESET_SIZES, VisionTransformerConfig
from .encoder.image_processing_vit import VisionTransformerImageProcessor
from .encoder.modeling_vit import (
    VisionTransformerForImageClassification,
    VisionTransformerModel,
    VisionTransformerPreTrainedModel,
)
from .encoder.position_embeddings import resample_position_embeddings
from .vlm.configuration_vlm import VisionLanguageConfig
from .vlm.modeling_vlm import VisionLanguageForConditionalGeneration
from .vlm.processing_vlm import VisionLanguageProcessor

AutoConfig.register(VisionTransformerConfig.model_type, VisionTransformerConfig, exist_ok=True)
AutoModel.register(VisionTransformerConfig, VisionTransformerModel, exist_ok=True)
AutoModelForImageClassification.register(
    VisionTransformerConfig, VisionTransformerForImageClassification, exist_ok=True
)
# transformers' own ViT preprocessing (resize, rescale, normalise), with a native-resolution mode (max_num_patches).
# ViT's torchvision backend (classic mode only) is registered only where torchvision imports (not beside the CPU
# torch wheel this project pins). Folders saved with ViT's processor keep loading it (by its saved type name).
_image_processors = {"pil": VisionTransformerImageProcessor}
if is_torchvision_available():
    from transformers.models.vit import ViTImageProcessor

    _image_processors["torchvision"] = ViTImageProcessor
AutoImageProcessor.register(VisionTransformerConfig, image_processor_classes=_image_processors, exist_ok=True)
# The vision-language model: registered here; its saved folders also carry their code (`remote_code`).
AutoConfig.register(VisionLanguageConfig.model_type, VisionLanguageConfig, exist_ok=True)
AutoModelForImageTextToText.register(VisionLanguageConfig, VisionLanguageForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisionLanguageConfig, VisionLanguageProcessor, exist_ok=True)
# A saved folder carries `auto_map` and these classes' source files, for `trust_remote_code=True` users.
VisionTransformerConfig.register_for_auto_class()
VisionTransformerModel.register_for_auto_class("AutoModel")
VisionTransformerForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__version__ = "0.1.0"

# Old module path (the flat layout, before the sub-packages) -> where that module lives now.
MOVED_MODULES = {
    "configuration_vlm_vit": "encoder.configuration_vit",
    "modeling_vlm_vit": "encoder.modeling_vit",
    "image_processing_vlm_vit": "encoder.image_processing_vit",
    "position_embeddings": "encoder.position_embeddings",
    "configuration_vlm": "vlm.configuration_vlm",
    "modeling_vlm": "vlm.modeling_vlm",
    "processing_vlm": "vlm.processing_vlm",
    "remote_code": "vlm.remote_code",
    "lora": "vlm.lora",
    "llava": "vlm.llava",
    "towers": "vlm.towers",
    "smollm": "vlm.smollm",
    "feature_cache": "vlm.feature_cache",
    "tokenizer": "vlm.tokenizer",
    "generation": "evaluation.generation",
    "checkpoint": "export.encoder_folder",
    "model_card": "export.model_card",
    "hub": "export.hub",
    "plots": "analysis.plots",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `vlm_vision.<old name>` as the module it moved to (lazily: on first import, then `sys.modules`).

    `import vlm_vision.modeling_vlm_vit`, `from vlm_vision.modeling_vlm_vit import X` and `importlib.import_module`
    all give the one module object `vlm_vision.encoder.modeling_vit`; its own name and spec are unchanged.
    """

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has set the alias's spec on the module: give it back its own
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    # `vlm_vision.modeling_vlm_vit` as an attribute, as the flat layout's eager imports allowed
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESET_NAMES",
    "PRESET_SIZES",
    "VisionLanguageConfig",
    "VisionLanguageForConditionalGeneration",
    "VisionLanguageProcessor",
    "VisionTransformerConfig",
    "VisionTransformerForImageClassification",
    "VisionTransformerImageProcessor",
    "VisionTransformerModel",
    "VisionTransformerPreTrainedModel",
    "resample_position_embeddings",
]
