"""vlm-vision: the Vision Transformer as a Hugging Face model, projection adapters and a vision-language model.

Importing the package registers the encoder with transformers' Auto classes, so that
`AutoModel.from_pretrained("./vit-b16")` works without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.utils import is_torchvision_available

from .configuration_vlm import VisionLanguageConfig
from .configuration_vlm_vit import PRESET_NAMES, PRESET_SIZES, VisionTransformerConfig
from .image_processing_vlm_vit import VisionTransformerImageProcessor
from .modeling_vlm import VisionLanguageForConditionalGeneration
from .modeling_vlm_vit import (
    VisionTransformerForImageClassification,
    VisionTransformerModel,
    VisionTransformerPreTrainedModel,
)
from .position_embeddings import resample_position_embeddings
from .processing_vlm import VisionLanguageProcessor

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
