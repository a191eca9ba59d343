"""The encoder: the Vision Transformer of Dosovitskiy et al. (2020) as a transformers model.

`configuration_vit` (config, validation, preset table), `modeling_vit` (the model, Eq. 1-4, heads, loading with
resampling), `image_processing_vit` (ViT preprocessing plus the native-resolution mode) and `position_embeddings`
(the pure 2-D resampling). A saved encoder folder carries copies of these files (transformers'
`register_for_auto_class`), so they import only torch, transformers and each other.
"""

from .configuration_vit import PRESET_NAMES, PRESET_SIZES, VisionTransformerConfig
from .image_processing_vit import VisionTransformerImageProcessor
from .modeling_vit import (
    VisionTransformerForImageClassification,
    VisionTransformerModel,
    VisionTransformerPreTrainedModel,
)
from .position_embeddings import resample_position_embeddings

__all__ = [
    "PRESET_NAMES",
    "PRESET_SIZES",
    "VisionTransformerConfig",
    "VisionTransformerForImageClassification",
    "VisionTransformerImageProcessor",
    "VisionTransformerModel",
    "VisionTransformerPreTrainedModel",
    "resample_position_embeddings",
]
