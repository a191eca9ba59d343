"""Convert the vision towers people already have into `VisionTransformerModel` checkpoints, with exact parity.

One loader per source layout; each is a key map (data) plus the few tensor transforms it needs:

    hf      transformers ViTModel / ViTForImageClassification, v5 names (`layers.N.attention.q_proj`) and the v4-era
            names on disk (`encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...)
    clip    transformers CLIPVisionModel, or the vision tower of a CLIPModel folder
    siglip  transformers SiglipVisionModel, or the vision tower of a SiglipModel folder (no [CLS]; MAP head); also
            the fixed-resolution SigLIP2 checkpoints, which transformers loads as SigLIP
    siglip2 transformers Siglip2VisionModel (NaFlex), or the vision tower of a Siglip2Model folder: a linear patch
            embedding over pre-cut patches, a square position table resized to every image's grid
    dinov2  transformers Dinov2Model and Dinov2WithRegistersModel (LayerScale, register tokens)
    timm    timm VisionTransformer state dicts (fused qkv split into q/k/v)
    npz     the original JAX checkpoints: google-research/vision_transformer (also the ResNet hybrids) and big_vision

Strict, like nanoGPT's loader: every source key is used (or explicitly declared as not part of the vision tower),
every parameter of the target model is filled, shapes agree; otherwise a ValueError lists the leftovers. A truncated,
empty or foreign file raises a ValueError naming it.

Preprocessing: the converted folder carries the source's own image processor (its `preprocessor_config.json`, loaded
with transformers' `AutoImageProcessor`, PIL backend): CLIP's shortest-edge resize and centre crop, SigLIP's resize,
DINOv2's resize-256/crop-224, each with its mean and std. A source without one gets its family's defaults in that
family's processor class (`DEFAULT_IMAGE_PROCESSORS`; timm's from its `pretrained_cfg`). Every one converts images to
RGB.
Safe with untrusted files: safetensors first, PyTorch files with `torch.load(weights_only=True)`, `.npz` with
`allow_pickle=False`. Nothing is downloaded: the source is a local folder or file. What is written is safetensors.

Prefix tokens: a converted tower keeps its own layout, so `config.num_prefix_tokens` is 1 for ViT/CLIP/DINOv2
([CLS]), 1 + R with R registers, and 0 for SigLIP (no [CLS]: a VLM keeps all its tokens).

The package: `reading` (safe reading of the source files), `engine` (the strict mapping engine), one module per
source family (`transformers_vit`, `clip`, `siglip`, `dinov2`, `timm`, `npz`), `preprocessing` (the converted
folder's image processor), `converter` (`convert_checkpoint`, `convert`) and `cli` (`vlm-vision convert`).
"""

from .cli import main
from .converter import LOADERS, ConvertedCheckpoint, convert, convert_checkpoint
from .engine import SOURCE_FORMATS, load_strictly, map_keys
from .npz import fold_weight_standardization
from .reading import read_state_dict

__all__ = [
    "LOADERS",
    "SOURCE_FORMATS",
    "ConvertedCheckpoint",
    "convert",
    "convert_checkpoint",
    "fold_weight_standardization",
    "load_strictly",
    "main",
    "map_keys",
    "read_state_dict",
]
