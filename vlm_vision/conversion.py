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
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
    SizeDict,
)
from transformers.utils import IMAGE_PROCESSOR_NAME

from .configuration_vlm_vit import VisionTransformerConfig
from .modeling_vlm_vit import VisionTransformerForImageClassification, VisionTransformerModel, resample_for_config
from .position_embeddings import infer_square_grid

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("hf", "clip", "siglip", "siglip2", "dinov2", "timm", "npz")

# A rule maps a source key (regex, full match) to one target key (template with \1 ...) or several (a tuple, when
# the transform splits the tensor, e.g. a fused qkv). Keys are relative to the encoder (`VisionTransformerModel`);
# a classifier's keys get the `vit.` prefix later.
Rule = tuple[str, "str | tuple[str, ...]", "Callable[[torch.Tensor], object] | None"]


# The image processor of each source whose folder has no preprocessor_config.json, at the model's (H, W) `size`: the
# family's transformers class with its published defaults (openai/clip-*, google/siglip-*, facebook/dinov2-*: resize
# the shortest edge to 256 and crop 224, ImageNet mean/std), scaled to other sizes like timm's crop_pct (224 / 256).
def _clip_processor(size: tuple[int, int]):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": max(size)}, crop_size={"height": size[0], "width": size[1]})


def _siglip_processor(size: tuple[int, int]):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size[0], "width": size[1]})


def _dinov2_processor(size: tuple[int, int]):
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": math.floor(max(size) * 256 / 224)},
        crop_size={"height": size[0], "width": size[1]},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def _vit_processor(size: tuple[int, int]):  # transformers' ViT, and the JAX reference: resize, x / 127.5 - 1
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size[0], "width": size[1]}, do_convert_rgb=True)


DEFAULT_IMAGE_PROCESSORS = {
    "hf": _vit_processor,
    "clip": _clip_processor,
    "siglip": _siglip_processor,
    "dinov2": _dinov2_processor,
    "npz": _vit_processor,
}
# timm's vision_transformer `_cfg`, for a state dict without a pretrained_cfg
TIMM_DEFAULT_CFG = {
    "mean": IMAGENET_STANDARD_MEAN,
    "std": IMAGENET_STANDARD_STD,
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
}
# transformers sources whose own image processor the converted folder keeps
PROCESSOR_SOURCES = ("hf", "clip", "siglip", "dinov2")
FAMILY_IMAGE_PROCESSORS = {
    "hf": "ViTImageProcessorPil",
    "clip": "CLIPImageProcessorPil",
    "siglip": "SiglipImageProcessorPil",
    "dinov2": "BitImageProcessorPil",
}
PREPROCESSOR_CONFIG = IMAGE_PROCESSOR_NAME  # transformers' "preprocessor_config.json"

# How each source resamples position embeddings to another grid (run time and `image_size=`): (mode, antialias).
# transformers' ViT/CLIP/SigLIP/DINOv2 interpolate bicubic without antialias; timm's `resample_abs_pos_embed` uses
# bicubic with antialias; big_vision's `resample_posemb` uses `jax.image.resize(..., "bilinear")`, which antialiases
# when down-sampling. (The original DINOv2 repository interpolates with a +0.1 offset in the scale factor; at the
# native size nothing is interpolated, so parity is exact there, and at other sizes we follow transformers' DINOv2.)
INTERPOLATION = {
    "hf": ("bicubic", False),
    "clip": ("bicubic", False),
    "siglip": ("bicubic", False),
    # Siglip2VisionEmbeddings.resize_positional_embeddings: antialiased bilinear as explicit separable weights, for
    # every image (also at the table's own grid, where they are the identity). "triangle" is that computation;
    # F.interpolate(bilinear, antialias=True) has the same weights but was seen to go wrong on one-column grids.
    "siglip2": ("triangle", False),
    "dinov2": ("bicubic", False),
    "timm": ("bicubic", True),
    "npz": ("bilinear", True),
}


@dataclass
class ConvertedCheckpoint:
    """The result of a conversion: the loaded model, its image processor and what to say about the source.

    `image_mean`, `image_std` and `resample` repeat the processor's, for code that builds its own processor.
    """

    model: VisionTransformerModel | VisionTransformerForImageClassification
    image_processor: object
    source_format: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_std)

    @property
    def resample(self) -> PILImageResampling:
        return PILImageResampling(self.image_processor.resample)


# --------------------------------------------------------------------------------------------------------------------
# Reading files safely


def _find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: safetensors (possibly sharded) first, then PyTorch files, then .npz."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        indices = sorted(folder.glob(pattern))
        if indices:
            index = _read_json(folder, indices[0].name)
            if not isinstance(index.get("weight_map"), dict):
                raise ValueError(f"{indices[0]} has no weight_map: it is not a sharded-checkpoint index.")
            return [folder / name for name in sorted(set(index["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):  # the standard names win over any other file
        if (folder / name).is_file():
            return [folder / name]
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt", "*.npz"):
        files = sorted(folder.glob(pattern))
        if files:
            if len(files) > 1:
                raise ValueError(
                    f"{folder} holds several weight files {[f.name for f in files]} and no index: pass the file to "
                    "convert instead of the folder."
                )
            return files
    raise FileNotFoundError(
        f"No weights in {folder}: expected model.safetensors (or a sharded index), pytorch_model.bin, *.pth or *.npz."
    )


def _unwrap_torch_checkpoint(obj, path: Path) -> dict[str, torch.Tensor]:
    # training checkpoints nest the weights: {"model": ...} (DeiT, timm train scripts) or {"state_dict": ...}
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, dict) else sorted(obj)[:10]
        raise ValueError(f"{path} is not a state dict of tensors (found {found}).")
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the tensors of a weight file or folder without executing anything from it.

    safetensors are read directly, PyTorch pickles with `weights_only=True` (plain tensors and containers only), and
    `.npz` archives with `allow_pickle=False`; keys of an `.npz` keep their `/`-separated JAX names.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a local checkpoint folder or file (nothing is downloaded)."
        )
    files = _find_weight_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist (a shard the index names?): copy the whole checkpoint.")
        state.update(_read_weight_file(file))
    return state


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """One file's tensors; a file that cannot be read raises a ValueError naming it and the fix."""
    from safetensors.torch import load_file

    suffix = file.name.rsplit(".", 1)[-1]
    if suffix not in ("safetensors", "bin", "pt", "pth", "npz"):
        raise ValueError(f"Unknown weight file type {file.name}: use .safetensors, .bin/.pt/.pth or .npz.")
    try:
        if suffix == "safetensors":
            return load_file(str(file))
        if suffix == "npz":
            if not zipfile.is_zipfile(file):  # np.load would read anything else as a pickle
                raise zipfile.BadZipFile("not a zip archive (an .npz is one)")
            with np.load(file, allow_pickle=False) as archive:
                return {k: torch.from_numpy(np.array(archive[k])) for k in archive.files}
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ValueError(_unreadable(file, error)) from error
        raise ValueError(
            f"Refusing to load {file}: it pickles objects other than tensors, and unpickling them could run "
            f"arbitrary code ({str(error).splitlines()[0]}). Re-save its state dict with safetensors."
        ) from error
    except ValueError as error:
        if suffix != "npz" or "allow_pickle" not in str(error):
            raise ValueError(_unreadable(file, error)) from error
        raise ValueError(
            f"Refusing to load {file} ({error}): pickled objects are not loaded (allow_pickle=False); a JAX "
            "checkpoint holds only arrays."
        ) from error
    except Exception as error:  # SafetensorError, EOFError, BadZipFile, torch's RuntimeError/IndexError/KeyError...
        raise ValueError(_unreadable(file, error)) from error
    return _unwrap_torch_checkpoint(obj, file)


def _unreadable(file: Path, error: Exception) -> str:
    size = file.stat().st_size if file.exists() else 0
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"Cannot read {file} ({size} bytes; {reason}): it is truncated, empty or not a weight file, as after an "
        "interrupted download or copy. Download or copy the checkpoint again."
    )


def _read_json(folder: Path, name: str) -> dict | None:
    """`folder/name` as a dict, None when there is no such file; a file that is not a JSON object is named."""
    file = folder / name
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}): it is empty or truncated. Copy it again from the source checkpoint."
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object: it is not a checkpoint config.")
    return data


# --------------------------------------------------------------------------------------------------------------------
# The strict key-mapping engine


def map_keys(source: dict[str, torch.Tensor], rules: list[Rule], ignore: dict[str, str] | None = None):
    """Apply `rules` to every source key. Returns (target state dict, source keys no rule matched).

    `ignore` maps a regex to the reason the matching keys are not part of the vision tower (e.g. a text tower);
    they are dropped and logged, never silently.
    """
    target: dict[str, torch.Tensor] = {}
    unused, ignored = [], {}
    for key, value in source.items():
        reason = next((why for pattern, why in (ignore or {}).items() if re.fullmatch(pattern, key)), None)
        if reason is not None:
            ignored.setdefault(reason, []).append(key)
            continue
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            out = transform(value) if transform is not None else value
            names, values = (template, out) if isinstance(template, tuple) else ((template,), (out,))
            for name, tensor in zip(names, values, strict=True):
                name = match.expand(name)
                if name in target:
                    raise ValueError(f"Two source keys map to {name} (the second is {key}): ambiguous checkpoint.")
                target[name] = tensor
            break
        else:
            unused.append(key)
    for reason, keys in ignored.items():
        logger.info("Not converted (%s): %d keys, e.g. %s", reason, len(keys), keys[0])
    return target, unused


def load_strictly(model: torch.nn.Module, target: dict[str, torch.Tensor], unused: list[str], source: str) -> None:
    """Load `target` into `model` if it fills every parameter with the right shape and no source key is left over."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(target))
    unexpected = sorted(set(target) - set(expected))
    mismatched = sorted(
        f"{k}: source {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in target.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if unused:
        problems.append(f"source keys no rule uses ({len(unused)}): {sorted(unused)}")
    if unexpected:
        problems.append(f"converted keys the model does not have ({len(unexpected)}): {unexpected}")
    if missing:
        problems.append(f"model keys the source does not fill ({len(missing)}): {missing}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError(
            f"Cannot convert {source} exactly:\n  " + "\n  ".join(problems) + "\nCheck that --from names the right "
            "source layout and that the folder's config.json belongs to these weights."
        )
    model.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in target.items()}, strict=True)


def _block_rules(block: str, leaves: dict[str, str], params: str = r"(weight|bias)") -> list[Rule]:
    """Rules for the per-block leaves: `block` is a regex with one group for the block index."""
    return [(block + re.escape(src) + r"\." + params, rf"layers.\1.{dst}.\2", None) for src, dst in leaves.items()]


def _as_token(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, -1)  # (D,) -> (1, 1, D)


def _as_table(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)  # nn.Embedding (T, D) -> (1, T, D)


@dataclass
class _Plan:
    """What a loader decided: config fields, key rules, keys declared as not part of the tower, notes, the source."""

    fields: dict
    rules: list[Rule]
    ignore: dict[str, str]
    notes: list[str]
    source: dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# transformers sources: hf (ViT), clip, siglip, dinov2


def _detect(source: dict[str, torch.Tensor], layouts: dict[str, str], source_format: str) -> str:
    """The name of the first layout whose marker regex matches a key, or a ValueError saying what was found."""
    for name, marker in layouts.items():
        if any(re.fullmatch(marker, k) for k in source):
            return name
    sample = sorted(source)[:8]
    raise ValueError(
        f"The weights do not look like a --from {source_format} checkpoint (layouts tried: {sorted(layouts)}). "
        f"Found keys such as {sample}. Pick the --from that matches the source ({', '.join(SOURCE_FORMATS)})."
    )


def _transformers_vision_config(folder: Path | None, config_class, composite_class, source_format: str):
    """The source's transformers config (the vision part of a composite CLIP/SigLIP config)."""
    raw = _read_json(folder, "config.json") if folder is not None else None
    if raw is None:
        raise FileNotFoundError(
            f"--from {source_format} needs the source folder's config.json (hyper-parameters such as the number of "
            "heads, eps and the activation are not in the weights). Pass the folder, not the weight file."
        )
    if "vision_config" in raw and composite_class is not None:
        return composite_class.from_dict(raw).vision_config
    return config_class.from_dict(raw)


def _transformer_fields(cfg) -> dict:
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
    }


def _common_fields(cfg) -> dict:
    return {
        **_transformer_fields(cfg),
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
    }


# v4-era (and on-disk v5) names of ViT blocks, and the v5 in-memory names, which are ours.
HF_VIT_V4_LEAVES = {
    "layernorm_before": "layernorm_before",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "layernorm_after": "layernorm_after",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
HF_VIT_V5_LEAVES = {name: name for name in HF_VIT_V4_LEAVES.values()}
HF_VIT_STEM = [
    (r"(?:vit\.)?embeddings\.(cls_token|position_embeddings)", r"embeddings.\1", None),
    (
        r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)",
        r"embeddings.patch_embeddings.projection.\1",
        None,
    ),
    (r"(?:vit\.)?layernorm\.(weight|bias)", r"layernorm.\1", None),
    (r"(?:vit\.)?pooler\.dense\.(weight|bias)", r"pooler.dense.\1", None),
    (r"classifier\.(weight|bias)", r"classifier.\1", None),
]
HF_VIT_LAYOUTS = {
    "v4": r"(?:vit\.)?encoder\.layer\.\d+\.attention\.attention\.query\.weight",
    "v5": r"(?:vit\.)?layers\.\d+\.attention\.q_proj\.weight",
}
# ViTForMaskedImageModeling's [MASK] embedding: an input for masked pre-training, not used on images.
MASK_TOKEN = {r"(?:vit\.)?embeddings\.mask_token": "masked-image-modelling [MASK] token, unused on real images"}


def _convert_hf(source, folder, overrides):
    from transformers import ViTConfig

    cfg = _transformers_vision_config(folder, ViTConfig, None, "hf")
    layout = _detect(source, HF_VIT_LAYOUTS, "hf")
    block = r"(?:vit\.)?encoder\.layer\.(\d+)\." if layout == "v4" else r"(?:vit\.)?layers\.(\d+)\."
    rules = HF_VIT_STEM + _block_rules(block, HF_VIT_V4_LEAVES if layout == "v4" else HF_VIT_V5_LEAVES)
    fields = {**_common_fields(cfg), "qkv_bias": cfg.qkv_bias}
    if any(k.endswith("pooler.dense.weight") for k in source):
        if getattr(cfg, "pooler_output_size", cfg.hidden_size) != cfg.hidden_size:
            raise ValueError(
                f"The source pooler projects to pooler_output_size={cfg.pooler_output_size} != hidden_size="
                f"{cfg.hidden_size}; only a D x D pooler converts exactly."
            )
        fields["pooler_act"] = getattr(cfg, "pooler_act", "tanh")
    if "classifier.weight" in source:
        fields.update(num_labels=source["classifier.weight"].shape[0], id2label=cfg.id2label)
    return _Plan(fields, rules, MASK_TOKEN, [f"transformers ViT checkpoint ({layout} parameter names)."], source)


CLIP_LEAVES = {
    "layer_norm1": "layernorm_before",
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.o_proj",
    "layer_norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VM = r"(?:vision_model\.)?"
CLIP_RULES = [
    (_VM + r"embeddings\.class_embedding", "embeddings.cls_token", _as_token),
    (_VM + r"embeddings\.position_embedding\.weight", "embeddings.position_embeddings", _as_table),
    (_VM + r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (_VM + r"pre_layrnorm\.(weight|bias)", r"pre_layernorm.\1", None),
    (_VM + r"post_layernorm\.(weight|bias)", r"layernorm.\1", None),
    # SigLIP's attention-pooling head has our head's names already
    (_VM + r"head\.(probe|attention\.in_proj_(?:weight|bias))", r"head.\1", None),
    (_VM + r"head\.(attention\.out_proj|layernorm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"head.\1.\2", None),
    *_block_rules(_VM + r"encoder\.layers\.(\d+)\.", CLIP_LEAVES),
]
# A full CLIPModel / SiglipModel folder also holds the text tower and the contrastive projections.
NOT_THE_VISION_TOWER = {
    r"text_model\..*": "text tower",
    r"(visual_projection|text_projection)\.weight": "contrastive projection (not part of the vision tower)",
    r"logit_(scale|bias)": "contrastive temperature / bias",
    # checkpoints written before transformers 4.31 saved this arange buffer
    _VM + r"embeddings\.position_ids": "position-index buffer (an arange), not a weight",
}
CLIP_LAYOUTS = {"clip": _VM + r"encoder\.layers\.\d+\.self_attn\.q_proj\.weight"}


def _convert_clip(source, folder, overrides):
    from transformers import CLIPConfig, CLIPVisionConfig

    cfg = _transformers_vision_config(folder, CLIPVisionConfig, CLIPConfig, "clip")
    _detect(source, {**CLIP_LAYOUTS, "clip [CLS]": _VM + r"embeddings\.class_embedding"}, "clip")
    if not any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have no class_embedding: a SigLIP tower? Use --from siglip.")
    # CLIP: pre-LN on the embeddings; `post_layernorm` only on the pooled [CLS], last_hidden_state is un-normalised;
    # the patch projection has no bias.
    fields = {
        **_common_fields(cfg),
        "pre_norm": True,
        "final_norm": "pooled",
        "patch_embedding_bias": False,
    }
    return _Plan(
        fields, CLIP_RULES, NOT_THE_VISION_TOWER, ["CLIP vision tower (transformers CLIPVisionModel)."], source
    )


def _convert_siglip(source, folder, overrides):
    from transformers import SiglipConfig, SiglipVisionConfig

    cfg = _transformers_vision_config(folder, SiglipVisionConfig, SiglipConfig, "siglip")
    _detect(source, CLIP_LAYOUTS, "siglip")
    if any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have a class_embedding: a CLIP tower? Use --from clip.")
    if any(k.endswith("embeddings.patch_embedding.weight") and v.dim() == 2 for k, v in source.items()):
        raise ValueError("These weights embed patches with a linear layer: a SigLIP2 NaFlex tower? Use --from siglip2.")
    has_head = any(k.endswith("head.probe") for k in source)
    # SigLIP: no [CLS] (num_prefix_tokens = 0: a VLM keeps every token), post_layernorm on every token, then the
    # attention-pooling head. Without the head (vision_use_head=False) pooler_output is the mean of the tokens,
    # which has no weights and which the source does not define.
    fields = {**_common_fields(cfg), "use_class_token": False, "pooling": "map" if has_head else "mean"}
    notes = ["SigLIP vision tower (transformers SiglipVisionModel); no [CLS] token."]
    return _Plan(fields, CLIP_RULES, NOT_THE_VISION_TOWER, notes, source)


def _convert_siglip2(source, folder, overrides):
    from transformers import Siglip2Config, Siglip2VisionConfig

    cfg = _transformers_vision_config(folder, Siglip2VisionConfig, Siglip2Config, "siglip2")
    _detect(source, CLIP_LAYOUTS, "siglip2")
    if any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have a class_embedding: a CLIP tower? Use --from clip.")
    patch = next((v for k, v in source.items() if k.endswith("embeddings.patch_embedding.weight")), None)
    if patch is not None and patch.dim() != 2:
        raise ValueError("These weights embed patches with a convolution: a SigLIP tower? Use --from siglip.")
    side = math.isqrt(cfg.num_patches)
    if side * side != cfg.num_patches:
        raise ValueError(
            f"The source config's num_patches={cfg.num_patches} is not a square: Siglip2VisionModel reshapes its "
            "position table to a square grid, so this config.json does not belong to a Siglip2 tower."
        )
    size, channels, dim = cfg.patch_size, cfg.num_channels, cfg.hidden_size

    def patch_kernel(t: torch.Tensor) -> torch.Tensor:
        # nn.Linear over a patch flattened (P, P, C) -> the same map as a Conv2d kernel (D, C, P, P)
        return t.reshape(dim, size, size, channels).permute(0, 3, 1, 2)

    rules = [
        (_VM + r"embeddings\.patch_embedding\.weight", "embeddings.patch_embeddings.projection.weight", patch_kernel),
        *CLIP_RULES,
    ]
    has_head = any(k.endswith("head.probe") for k in source)
    fields = {
        **_transformer_fields(cfg),
        "image_size": side * size,  # the table's grid, side x side
        "patch_size": size,
        "num_channels": channels,
        "use_class_token": False,
        "pooling": "map" if has_head else "mean",
    }
    notes = [
        f"SigLIP2 NaFlex vision tower (transformers Siglip2VisionModel); no [CLS] token; a {side}x{side} position "
        "table resized to each image's grid (antialiased bilinear, `interpolation_mode='triangle'`). It takes the "
        "native-resolution form: pixel_values (B, N, C*P*P), pixel_attention_mask, spatial_shapes."
    ]
    return _Plan(fields, rules, NOT_THE_VISION_TOWER, notes, source)


def _siglip2_image_processor(folder: Path | None, config: VisionTransformerConfig):
    """Our processor in native-resolution mode with the source's settings (its preprocessor_config.json, else
    Siglip2ImageProcessor's defaults: bilinear, mean = std = 0.5, max_num_patches = the table's size)."""
    from .image_processing_vlm_vit import VisionTransformerImageProcessor

    settings = {
        "patch_size": config.patch_size_hw[0],
        "max_num_patches": config.num_patches,
        "resample": PILImageResampling.BILINEAR,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    saved = (_read_json(folder, PREPROCESSOR_CONFIG) if folder is not None else None) or {}
    keys = ("patch_size", "max_num_patches", "resample", "image_mean", "image_std", "rescale_factor")
    keys += ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
    settings.update({k: saved[k] for k in keys if saved.get(k) is not None})
    if settings["patch_size"] != config.patch_size_hw[0]:
        raise ValueError(
            f"The source's {PREPROCESSOR_CONFIG} cuts patches of {settings['patch_size']} pixels but its model's "
            f"patch_size is {config.patch_size}: fix that file (or remove it for Siglip2's defaults)."
        )
    return VisionTransformerImageProcessor(**settings)


DINOV2_LEAVES = {
    "norm1": "layernorm_before",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "attention.q_proj": "attention.q_proj",
    "attention.k_proj": "attention.k_proj",
    "attention.v_proj": "attention.v_proj",
    "attention.o_proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
DINOV2_RULES = [
    (r"embeddings\.(cls_token|position_embeddings|register_tokens)", r"embeddings.\1", None),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (r"layernorm\.(weight|bias)", r"layernorm.\1", None),
    *_block_rules(r"encoder\.layer\.(\d+)\.", DINOV2_LEAVES),
    *_block_rules(
        r"encoder\.layer\.(\d+)\.", {"layer_scale1": "layer_scale1", "layer_scale2": "layer_scale2"}, r"(lambda1)"
    ),
]
DINOV2_LAYOUTS = {"dinov2": r"encoder\.layer\.\d+\.norm1\.weight"}


def _convert_dinov2(source, folder, overrides):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    raw = _read_json(folder, "config.json") if folder is not None else None
    registers = raw is not None and raw.get("model_type") == "dinov2_with_registers"
    cfg = _transformers_vision_config(folder, Dinov2WithRegistersConfig if registers else Dinov2Config, None, "dinov2")
    _detect(source, DINOV2_LAYOUTS, "dinov2")
    if getattr(cfg, "use_swiglu_ffn", False):
        raise ValueError("use_swiglu_ffn=True (DINOv2 giant) has a SwiGLU MLP, which this model does not implement.")
    fields = {
        **_common_fields(cfg),
        "qkv_bias": cfg.qkv_bias,
        # transformers' DINOv2 sizes its MLP by mlp_ratio and ignores intermediate_size
        "intermediate_size": int(cfg.hidden_size * cfg.mlp_ratio),
        "layer_scale_init_value": float(cfg.layerscale_value),
        "num_register_tokens": getattr(cfg, "num_register_tokens", 0),
    }
    variant = "WithRegisters" if registers else ""
    notes = [f"DINOv2{' with registers' if registers else ''} (transformers Dinov2{variant}Model)."]
    return _Plan(fields, DINOV2_RULES, MASK_TOKEN, notes, source)


# --------------------------------------------------------------------------------------------------------------------
# timm VisionTransformer state dicts

TIMM_LEAVES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
TIMM_RULES = [
    (r"cls_token", "embeddings.cls_token", None),
    (r"reg_token", "embeddings.register_tokens", None),
    (r"pos_embed", "embeddings.position_embeddings", None),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (r"norm_pre\.(weight|bias)", r"pre_layernorm.\1", None),
    # timm has one of `norm` (every token) and `fc_norm` (the pooled vector, final_norm="pooled")
    (r"(?:norm|fc_norm)\.(weight|bias)", r"layernorm.\1", None),
    # the fused projection holds [q; k; v] along the output dimension
    (
        r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        (r"layers.\1.attention.q_proj.\2", r"layers.\1.attention.k_proj.\2", r"layers.\1.attention.v_proj.\2"),
        lambda t: t.chunk(3, dim=0),
    ),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"layers.\1.layer_scale\2.lambda1", None),
    *_block_rules(r"blocks\.(\d+)\.", TIMM_LEAVES),
    # AttentionPoolLatent ("map"): its q and kv projections are fused into in_proj_* beforehand (_fold_timm)
    (r"attn_pool\.latent", "head.probe", None),
    (r"attn_pool\.(in_proj_weight|in_proj_bias)", r"head.attention.\1", None),
    (r"attn_pool\.proj\.(weight|bias)", r"head.attention.out_proj.\1", None),
    (r"attn_pool\.norm\.(weight|bias)", r"head.layernorm.\1", None),
    (r"attn_pool\.mlp\.(fc1|fc2)\.(weight|bias)", r"head.mlp.\1.\2", None),
    (r"head\.(weight|bias)", r"classifier.\1", None),
]
# timm model names decode to a width; the head count is not in the weights.
TIMM_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}


def _timm_heads(config_json: dict | None, overrides: dict) -> int:
    if "num_attention_heads" in overrides:
        return overrides["num_attention_heads"]
    model_args = (config_json or {}).get("model_args") or {}
    if "num_heads" in model_args:
        return int(model_args["num_heads"])
    architecture = (config_json or {}).get("architecture", "")
    size = re.match(r"vit_([a-z]+)_", architecture)
    if size and size[1] in TIMM_HEADS:
        return TIMM_HEADS[size[1]]
    raise ValueError(
        "The number of attention heads of a timm checkpoint is not in its weights and could not be read from a "
        f"config.json (architecture={architecture!r}). Pass it: num_attention_heads=... (--num-heads on the CLI)."
    )


def _fold_timm(source: dict[str, torch.Tensor], grid: tuple[int, int] | None) -> tuple[dict, tuple[int, int], str]:
    """Bring timm's position-embedding conventions to ours (which are exact re-parameterisations).

    Ours: [CLS] + E_pos[0], registers without E_pos, patches + E_pos[1:]. timm either adds `pos_embed` to
    [CLS], registers and patches (the default), or only to the patches (`no_embed_class=True`, DINOv2/`reg` models).
    A register's position embedding is a constant added to a constant, so it is folded into the register token; a
    missing [CLS] row becomes a zero row. Returns the source in our convention, the patch grid and a note.
    """
    source = dict(source)
    pos = source["pos_embed"]
    has_cls = "cls_token" in source
    num_reg = source["reg_token"].shape[1] if "reg_token" in source else 0
    prefix = int(has_cls) + num_reg
    rows = pos.shape[1]
    if grid is not None:
        with_prefix = rows == grid[0] * grid[1] + prefix
    else:  # no image size given: the square reading wins
        with_prefix = prefix > 0 and _is_square(rows - prefix)
        grid = infer_square_grid(rows - prefix if with_prefix else rows)
    if rows - (prefix if with_prefix else 0) != grid[0] * grid[1]:
        raise ValueError(
            f"pos_embed has {rows} rows, which fits neither {grid} patches nor them plus {prefix} prefix rows."
        )
    note = (
        "timm `pos_embed` covers the prefix tokens"
        if with_prefix
        else "timm `no_embed_class`: no E_pos on prefix tokens"
    )
    patches = pos[:, prefix:] if with_prefix else pos
    cls_row = pos[:, :1] if with_prefix and has_cls else torch.zeros_like(pos[:, :1])
    if num_reg and with_prefix:
        source["reg_token"] = source["reg_token"] + pos[:, int(has_cls) : prefix]
    source["pos_embed"] = torch.cat([cls_row, patches], dim=1) if has_cls else patches
    if "attn_pool.q.weight" in source:  # nn.MultiheadAttention packs [q; k; v]; timm's kv is [k; v]
        for kind in ("weight", "bias"):
            q, kv = source.pop(f"attn_pool.q.{kind}"), source.pop(f"attn_pool.kv.{kind}")
            source[f"attn_pool.in_proj_{kind}"] = torch.cat([q, kv], dim=0)
    return source, grid, note


def _size(height: int, width: int) -> int | list[int]:
    return int(height) if height == width else [int(height), int(width)]


def _is_square(n: int) -> bool:
    try:
        infer_square_grid(n)
    except ValueError:
        return False
    return n > 0


def _convert_timm(source, folder, overrides):
    _detect(source, {"timm": r"blocks\.\d+\.attn\.qkv\.weight"}, "timm")
    config_json = _read_json(folder, "config.json") if folder is not None else None
    if config_json is not None and "architecture" not in config_json:
        config_json = None  # a config.json of another library
    pretrained = (config_json or {}).get("pretrained_cfg") or {}
    patch_weight = source["patch_embed.proj.weight"]  # (D, C, P, P)
    size = overrides.get("image_size") or (pretrained.get("input_size") or [None, None, None])[1:]
    grid = None
    if size and size[0]:
        size = (size, size) if isinstance(size, int) else tuple(size)
        grid = (size[0] // patch_weight.shape[2], size[1] // patch_weight.shape[3])
    source, grid, note = _fold_timm(source, grid)
    depth = 1 + max(int(k.split(".")[1]) for k in source if k.startswith("blocks."))
    model_args = (config_json or {}).get("model_args") or {}
    global_pool = model_args.get("global_pool", (config_json or {}).get("global_pool"))
    if "fc_norm.weight" in source:
        pooling, final_norm = "mean", "pooled"
    elif "attn_pool.latent" in source:
        pooling, final_norm = "map", "all"
    elif global_pool == "avg" or "cls_token" not in source:
        pooling, final_norm = "mean", "all"
    else:
        pooling, final_norm = "cls", "all"
    num_prefix = int("cls_token" in source) + (source["reg_token"].shape[1] if "reg_token" in source else 0)
    include_prefix = bool(model_args.get("pool_include_prefix", False))
    if num_prefix and pooling != "cls" and include_prefix != (pooling == "map"):
        # ours: the MAP head reads every token, the mean skips the prefix tokens
        raise ValueError(
            f"This timm model pools {pooling!r} with pool_include_prefix={include_prefix} over {num_prefix} prefix "
            "tokens; only a MAP head over all tokens or a mean over the patch tokens converts exactly."
        )
    fields = {
        "hidden_size": patch_weight.shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": _timm_heads(config_json, overrides),
        "intermediate_size": source["blocks.0.mlp.fc1.weight"].shape[0],
        "hidden_act": TIMM_ACTIVATIONS.get(model_args.get("act_layer", "gelu"), model_args.get("act_layer")),
        "layer_norm_eps": 1e-6,  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
        "image_size": _size(grid[0] * patch_weight.shape[2], grid[1] * patch_weight.shape[3]),
        "patch_size": _size(*patch_weight.shape[2:]),
        "num_channels": patch_weight.shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in source,
        "use_class_token": "cls_token" in source,
        "num_register_tokens": source["reg_token"].shape[1] if "reg_token" in source else 0,
        "pre_norm": "norm_pre.weight" in source,
        "layer_scale_init_value": 1.0 if "blocks.0.ls1.gamma" in source else None,
        "pooling": pooling,
        "final_norm": final_norm,
        "patch_embedding_bias": "patch_embed.proj.bias" in source,
    }
    if "head.weight" in source:
        fields["num_labels"] = source["head.weight"].shape[0]
    return _Plan(fields, TIMM_RULES, {}, [f"timm VisionTransformer state dict; {note}."], source)


# --------------------------------------------------------------------------------------------------------------------
# JAX .npz: google-research/vision_transformer (vit_jax) and big_vision
#
# Checkpoint history, as big_vision's `vit.fix_old_checkpoints` tells it:
# - the paper's checkpoints (vit_jax) keep the position embedding in `Transformer/posembed_input/pos_embedding`, with
#   a row for [CLS]: [CLS] is concatenated first, then E_pos added. That is our convention, so it maps as is.
# - "widely used before 2022": `Transformer/pos_embedding`, same content.
# - big_vision since 2022: a top-level `pos_embedding` added to the patches only, then [CLS] concatenated: [CLS]
#   has no E_pos, which is a zero row in ours.
# - blocks are `encoderblock_N`, or one `encoderblock` with a leading depth axis (lax.scan); we unstack.
# - pre-linen names count modules of all types (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
#   MlpBlock_3`), linen ones count per type (`LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`).
# - MAP-head variants of the ViT-G era had the head's parameters inlined at the top level.
# Flax's `nn.gelu` is the tanh approximation, so these towers use hidden_act="gelu_pytorch_tanh".


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.T  # flax (in, out) -> torch (out, in)


def _qkv_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).T  # DenseGeneral (D, heads, head_dim) -> (heads * head_dim, D)


def _out_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).T  # (heads, head_dim, D) -> (D, heads * head_dim)


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)  # (heads, head_dim) -> (D,)


_BLOCK = r"Transformer/encoderblock_(\d+)/"
_QKV = (("query", "q"), ("key", "k"), ("value", "v"))
_MHA = r"MultiHeadDotProductAttention_\d"
NPZ_RULES = [
    (r"cls", "embeddings.cls_token", None),
    (r"pos_embedding", "embeddings.position_embeddings", None),
    (r"embedding/kernel", "embeddings.patch_embeddings.projection.weight", lambda t: t.permute(3, 2, 0, 1)),  # HWIO
    (r"embedding/bias", "embeddings.patch_embeddings.projection.bias", None),
    (r"Transformer/encoder_norm/scale", "layernorm.weight", None),
    (r"Transformer/encoder_norm/bias", "layernorm.bias", None),
    (_BLOCK + r"LayerNorm_0/scale", r"layers.\1.layernorm_before.weight", None),
    (_BLOCK + r"LayerNorm_0/bias", r"layers.\1.layernorm_before.bias", None),
    (_BLOCK + r"LayerNorm_[12]/scale", r"layers.\1.layernorm_after.weight", None),
    (_BLOCK + r"LayerNorm_[12]/bias", r"layers.\1.layernorm_after.bias", None),
    *[(_BLOCK + _MHA + f"/{name}/kernel", rf"layers.\1.attention.{x}_proj.weight", _qkv_kernel) for name, x in _QKV],
    *[(_BLOCK + _MHA + f"/{name}/bias", rf"layers.\1.attention.{x}_proj.bias", _flatten) for name, x in _QKV],
    (_BLOCK + _MHA + r"/out/kernel", r"layers.\1.attention.o_proj.weight", _out_kernel),
    (_BLOCK + _MHA + r"/out/bias", r"layers.\1.attention.o_proj.bias", None),
    *[(_BLOCK + rf"MlpBlock_\d/Dense_{i}/kernel", rf"layers.\1.mlp.fc{i + 1}.weight", _dense) for i in (0, 1)],
    *[(_BLOCK + rf"MlpBlock_\d/Dense_{i}/bias", rf"layers.\1.mlp.fc{i + 1}.bias", None) for i in (0, 1)],
    (r"MAPHead_0/probe", "head.probe", None),
    (r"MAPHead_0/in_proj_(weight|bias)", r"head.attention.in_proj_\1", None),
    (r"MAPHead_0/" + _MHA + r"/out/kernel", "head.attention.out_proj.weight", _out_kernel),
    (r"MAPHead_0/" + _MHA + r"/out/bias", "head.attention.out_proj.bias", None),
    (r"MAPHead_0/LayerNorm_0/scale", "head.layernorm.weight", None),
    (r"MAPHead_0/LayerNorm_0/bias", "head.layernorm.bias", None),
    *[(rf"MAPHead_0/MlpBlock_0/Dense_{i}/kernel", f"head.mlp.fc{i + 1}.weight", _dense) for i in (0, 1)],
    *[(rf"MAPHead_0/MlpBlock_0/Dense_{i}/bias", f"head.mlp.fc{i + 1}.bias", None) for i in (0, 1)],
    (r"pre_logits/kernel", "pre_logits.0.weight", _dense),
    (r"pre_logits/bias", "pre_logits.0.bias", None),
    (r"head/kernel", "classifier.weight", _dense),
    (r"head/bias", "classifier.bias", None),
]


# The hybrids (Sec. 3.1: R50+ViT-B/16, R26+ViT-B/32, R50+ViT-L/32, and R+ViT-Ti/16, the root alone) run the ResNet of
# vit_jax/models_resnet.py before the patch embedding. It is transformers' BiT backbone with layer_type="bottleneck"
# (conv1x1-GN-ReLU, conv3x3 with the stride-GN-ReLU, conv1x1-GN, ReLU(shortcut + y); a projection conv1x1-GN on the
# first unit of each stage), global_padding="SAME" and a dynamically padded 3x3/2 max-pool after the 7x7/2 root conv,
# GN and ReLU. Two things differ, and both are made exact here:
# - weight standardisation: JAX's `StdConv` uses (w - mean) / (std + 1e-5), BiT's `WeightStandardizedConv2d`
#   (w - mean) / sqrt(var + 1e-8); it is a fixed function of the stored weight, so it is folded into the weight
#   (`fold_weight_standardization`);
# - GroupNorm epsilon: flax's `nn.GroupNorm` 1e-6, BiT's 1e-5: the config's `backbone_norm_eps`.
# The max-pool pads with 0 in BiT and with -inf in flax; it follows a ReLU, so every window's maximum is the same.
JAX_WS_EPS = 1e-5  # vit_jax models_resnet.StdConv: weight_standardize(kernel, axis=[0, 1, 2], eps=1e-5)
BIT_WS_EPS = 1e-8  # transformers' BiT builds every WeightStandardizedConv2d of the hybrid with eps=1e-8
JAX_GROUP_NORM_EPS = 1e-6  # flax nn.GroupNorm's default epsilon (32 groups, as BiT's num_groups)


def fold_weight_standardization(kernel: torch.Tensor) -> torch.Tensor:
    """A flax `StdConv` kernel (H, W, I, O) as the torch weight (O, I, H, W) whose BiT standardisation is JAX's.

    Per output channel, JAX uses J(w) = (w - mean) / (std + 1e-5), whose std is r = std / (std + 1e-5) < 1; BiT
    computes (v - mean) / sqrt(var + 1e-8) of its stored v. Storing v = k J(w) with k = sqrt(1e-8 / (1 - r^2))
    gives var(v) = k^2 r^2 and k / sqrt(k^2 r^2 + 1e-8) = 1, so BiT's standardised filter is J(w) exactly (up to
    the float32 rounding of v). A constant filter (std 0) has J = 0 and gives v = 0, which BiT also maps to 0. In
    float64, with 1 - r = 1e-5 / (std + 1e-5) formed directly so nothing cancels. Training the converted model
    further differentiates BiT's standardisation, not JAX's: only the function at conversion is the same.
    """
    weight = kernel.permute(3, 2, 0, 1).to(torch.float64)  # HWIO -> OIHW
    if not torch.isfinite(weight).all():
        raise ValueError(f"A ResNet kernel of shape {tuple(kernel.shape)} holds NaN or inf: a corrupt checkpoint.")
    flat = weight.reshape(weight.shape[0], -1)  # (O, H * W * I): JAX reduces over axes (0, 1, 2)
    std = flat.std(dim=1, unbiased=False, keepdim=True)  # jnp.std: the population std
    standardized = (flat - flat.mean(dim=1, keepdim=True)) / (std + JAX_WS_EPS)
    r, one_minus_r = std / (std + JAX_WS_EPS), JAX_WS_EPS / (std + JAX_WS_EPS)
    scale = torch.sqrt(BIT_WS_EPS / (one_minus_r * (1 + r)))  # k = sqrt(eps_bit / (1 - r^2))
    return (scale * standardized).reshape(weight.shape)


_BIT = "embeddings.patch_embeddings.backbone.bit."
_UNIT = r"ResNet/stages\.(\d+)\.layers\.(\d+)/"  # block{i}/unit{j} after `_normalise_npz`: 0-based
_GN = (("scale", "weight"), ("bias", "bias"))
NPZ_HYBRID_RULES = [
    (r"conv_root/kernel", _BIT + "embedder.convolution.weight", fold_weight_standardization),
    *[(rf"gn_root/{src}", _BIT + f"embedder.norm.{dst}", None) for src, dst in _GN],
    (_UNIT + r"conv([123])/kernel", _BIT + r"encoder.stages.\1.layers.\2.conv\3.weight", fold_weight_standardization),
    *[(_UNIT + rf"gn([123])/{src}", _BIT + rf"encoder.stages.\1.layers.\2.norm\3.{dst}", None) for src, dst in _GN],
    (
        _UNIT + r"conv_proj/kernel",
        _BIT + r"encoder.stages.\1.layers.\2.downsample.conv.weight",
        fold_weight_standardization,
    ),
    *[
        (_UNIT + rf"gn_proj/{src}", _BIT + rf"encoder.stages.\1.layers.\2.downsample.norm.{dst}", None)
        for src, dst in _GN
    ],
]


def _hybrid_backbone(source: dict[str, torch.Tensor]) -> dict:
    """The BiT backbone config of a hybrid `.npz` (keys normalised): units per stage and widths, from the weights."""
    units: dict[int, int] = {}
    for key in source:
        if match := re.match(_UNIT, key):
            stage, unit = int(match[1]), int(match[2])
            units[stage] = max(units.get(stage, 0), unit + 1)
    if sorted(units) != list(range(len(units))):
        raise ValueError(f"The ResNet stages of this hybrid .npz are not block1..blockN (found {sorted(units)}).")
    stages = range(len(units))
    return {
        "layer_type": "bottleneck",
        "depths": [units[i] for i in stages],
        "hidden_sizes": [int(_first(source, rf"ResNet/stages\.{i}\.layers\.0/conv3/kernel").shape[-1]) for i in stages],
        "embedding_size": int(source["conv_root/kernel"].shape[-1]),
        "global_padding": "SAME",
        "embedding_dynamic_padding": True,
        "out_features": [f"stage{len(units)}" if units else "stem"],
    }


def _check_bit_standardization(model: torch.nn.Module) -> None:
    """The fold assumes BiT's eps; refuse rather than convert inexactly if transformers ever changes it."""
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    eps = {m.eps for m in model.modules() if isinstance(m, WeightStandardizedConv2d)}
    if eps != {BIT_WS_EPS}:
        raise ValueError(
            f"transformers' BiT standardises with eps {sorted(eps)}, but the hybrid conversion folds JAX's weight "
            f"standardisation for eps={BIT_WS_EPS}: update BIT_WS_EPS in vlm_vision/conversion.py."
        )


def _normalise_npz(source: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint in the vit_jax naming with a top-level `pos_embedding`; see the history above."""
    source = {k.removeprefix("params/"): v for k, v in source.items()}
    for key in [k for k in source if re.match(r"block\d+/unit\d+/", k)]:  # the hybrid's ResNet stages, 0-based
        block, unit, rest = re.match(r"block(\d+)/unit(\d+)/(.*)", key).groups()
        source[f"ResNet/stages.{int(block) - 1}.layers.{int(unit) - 1}/{rest}"] = source.pop(key)
    layout = "big_vision"
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in source:
            source["pos_embedding"], layout = source.pop(old), "vision_transformer"
    if "pos_embedding" not in source:
        raise ValueError(
            f"No position embedding in this .npz (found keys such as {sorted(source)[:8]}): not a ViT checkpoint of "
            "the google-research/vision_transformer or big_vision layouts."
        )
    stacked = [k for k in source if k.startswith("Transformer/encoderblock/")]
    for key in stacked:  # lax.scan: one block with a leading depth axis
        value = source.pop(key)
        for depth in range(value.shape[0]):
            source[key.replace("encoderblock/", f"encoderblock_{depth}/")] = value[depth]
    if "probe" in source:  # ViT-G era: MAP head inlined
        for name in [k for k in source if k.split("/")[0] in ("probe", "MlpBlock_0", _MHA_0, "LayerNorm_0")]:
            source[f"MAPHead_0/{name}"] = source.pop(name)
    if "MAPHead_0/probe" in source:  # the head's q, k, v as nn.MultiheadAttention's packed in_proj
        mha = next(k.rsplit("/", 2)[0] for k in source if re.fullmatch(r"MAPHead_0/" + _MHA + r"/query/kernel", k))
        for kind, fn in (("kernel", _qkv_kernel), ("bias", _flatten)):
            parts = [fn(source.pop(f"{mha}/{name}/{kind}")) for name in ("query", "key", "value")]
            source[f"MAPHead_0/in_proj_{'weight' if kind == 'kernel' else 'bias'}"] = torch.cat(parts, dim=0)
    return source, layout


_MHA_0 = "MultiHeadDotProductAttention_0"


def _first(source: dict[str, torch.Tensor], pattern: str) -> torch.Tensor:
    key = next((k for k in source if re.fullmatch(pattern, k)), None)
    if key is None:
        raise ValueError(f"No key matching {pattern!r} in this .npz (found keys such as {sorted(source)[:8]}).")
    return source[key]


def _convert_npz(source, folder, overrides):
    source, layout = _normalise_npz(source)
    if "embedding/kernel" not in source:
        raise ValueError(f"No patch embedding `embedding/kernel` in this .npz (found {sorted(source)[:8]}).")
    kernel = source["embedding/kernel"]  # (P, P, C, D); for a hybrid, on the ResNet's feature map
    backbone = _hybrid_backbone(source) if "conv_root/kernel" in source else None
    # the pixel stride of one feature-map cell: the root is /4, each stage after the first /2
    stride = 4 * 2 ** max(len(backbone["depths"]) - 1, 0) if backbone is not None else 1
    patch = (kernel.shape[0] * stride, kernel.shape[1] * stride)
    query = _first(source, r"Transformer/encoderblock_0/" + _MHA + r"/query/kernel")  # (D, heads, head_dim)
    has_cls = "cls" in source
    pos = source["pos_embedding"]
    size = overrides.get("image_size")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        grid = (size[0] // patch[0], size[1] // patch[1])
        cls_row = has_cls and pos.shape[1] == grid[0] * grid[1] + 1
    else:
        cls_row = has_cls and _is_square(pos.shape[1] - 1) and not _is_square(pos.shape[1])
        grid = infer_square_grid(pos.shape[1] - int(cls_row))
    if has_cls and not cls_row:  # big_vision: [CLS] without position embedding
        source["pos_embedding"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    depth = 1 + max(int(m[1]) for k in source if (m := re.match(_BLOCK, k)))
    fields = {
        "hidden_size": kernel.shape[3],
        "num_hidden_layers": depth,
        "num_attention_heads": query.shape[1],
        "intermediate_size": _first(source, r"Transformer/encoderblock_0/MlpBlock_\d/Dense_0/bias").shape[0],
        "hidden_act": "gelu_pytorch_tanh",  # flax nn.gelu(approximate=True)
        "layer_norm_eps": 1e-6,  # flax nn.LayerNorm
        "image_size": _size(grid[0] * patch[0], grid[1] * patch[1]),
        "patch_size": _size(*patch),
        "num_channels": kernel.shape[2] if backbone is None else source["conv_root/kernel"].shape[2],
        "use_class_token": has_cls,
        "pooling": "map" if "MAPHead_0/probe" in source else ("cls" if has_cls else "mean"),
    }
    rules, notes = NPZ_RULES, []
    if backbone is not None:
        fields.update(backbone_config=backbone, backbone_norm_eps=JAX_GROUP_NORM_EPS)
        rules = NPZ_RULES + NPZ_HYBRID_RULES
        notes.append(
            f"Hybrid: the JAX ResNet (root + stages {backbone['depths']}) as transformers' BiT backbone, its weight "
            f"standardisation folded into the weights and GroupNorm eps {JAX_GROUP_NORM_EPS} (backbone_norm_eps)."
        )
    if "head/kernel" in source and source["head/kernel"].shape[-1] > 0:
        fields["num_labels"] = source["head/kernel"].shape[-1]
        if "pre_logits/kernel" in source:
            fields.update(classifier_head="mlp", representation_size=source["pre_logits/kernel"].shape[-1])
    elif "head/kernel" in source:  # a 0-class head: an empty array, nothing to convert
        source = {k: v for k, v in source.items() if not k.startswith("head/")}
    convention = "[CLS] with its E_pos row" if cls_row else ("[CLS] without E_pos" if has_cls else "no [CLS]")
    notes.insert(0, f"JAX .npz checkpoint, {layout} layout ({convention}).")
    return _Plan(fields, rules, {}, notes, source)


# --------------------------------------------------------------------------------------------------------------------
# Entry points


LOADERS = {
    "hf": _convert_hf,
    "clip": _convert_clip,
    "siglip": _convert_siglip,
    "siglip2": _convert_siglip2,
    "dinov2": _convert_dinov2,
    "timm": _convert_timm,
    "npz": _convert_npz,
}


def _source_image_processor(source_format: str, folder: Path | None):
    """The source folder's own image processor (transformers sources with a preprocessor_config.json), or None."""
    if source_format not in PROCESSOR_SOURCES or folder is None or not (folder / PREPROCESSOR_CONFIG).is_file():
        return None
    import transformers

    saved = _read_json(folder, PREPROCESSOR_CONFIG)  # an empty or truncated file is named
    try:
        if saved.get("image_processor_type") or saved.get("feature_extractor_type"):
            return transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
        # no class named (transformers' vision-only towers have no image processor mapping): the family's
        return getattr(transformers, FAMILY_IMAGE_PROCESSORS[source_format]).from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Cannot load the source's image processor {folder / PREPROCESSOR_CONFIG} ({str(error)[:300]}): fix that "
            f"file, or remove it to use the {source_format} family's default preprocessing."
        ) from error


def _timm_image_processor(folder: Path | None, size: tuple[int, int]):
    """timm's eval transform from the folder's `pretrained_cfg` (else its ViT `_cfg`): resize to size / crop_pct
    (the shortest edge, or both sides with crop_mode 'squash'), centre-crop `size`, normalise."""
    from transformers import ViTImageProcessorPil

    config_json = (_read_json(folder, "config.json") if folder is not None else None) or {}
    pretrained = config_json.get("pretrained_cfg") or {} if "architecture" in config_json else {}
    cfg = {**TIMM_DEFAULT_CFG, **{k: v for k, v in pretrained.items() if v is not None}}
    crop_pct = float(cfg["crop_pct"])
    interpolation = str(cfg["interpolation"]).upper()
    resample = PILImageResampling[interpolation] if interpolation in PILImageResampling.__members__ else None
    if cfg["crop_mode"] == "squash":
        resize = {"height": math.floor(size[0] / crop_pct), "width": math.floor(size[1] / crop_pct)}
    else:  # "center" (timm's default); "border" pads instead of cropping, which this processor does not do
        resize = {"shortest_edge": math.floor(max(size) / crop_pct)}
    return ViTImageProcessorPil(
        size=resize,
        do_center_crop=True,
        crop_size={"height": size[0], "width": size[1]},
        resample=resample or PILImageResampling.BICUBIC,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
        do_convert_rgb=True,
    )


def _processor_output_size(processor) -> tuple[int, int] | None:
    """(H, W) of what `processor` produces: its crop, else a fixed resize; None when it depends on the image."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None and crop.height and crop.width:
        return crop.height, crop.width
    size = getattr(processor, "size", None)
    if size is not None and size.height and size.width:
        return size.height, size.width
    return None


def _fit_image_processor(processor, size: tuple[int, int]) -> None:
    """Make `processor` produce `size`, scaling its resize by the same factor as its crop."""
    old = _processor_output_size(processor)
    resize = processor.size
    if getattr(processor, "do_center_crop", False) and old is not None:
        if resize.shortest_edge:
            processor.size = SizeDict(shortest_edge=round(resize.shortest_edge * max(size) / max(old)))
        elif resize.height and resize.width:
            processor.size = SizeDict(
                height=round(resize.height * size[0] / old[0]), width=round(resize.width * size[1] / old[1])
            )
        processor.crop_size = SizeDict(height=size[0], width=size[1])
    else:
        processor.size = SizeDict(height=size[0], width=size[1])


def _describe(processor) -> str:
    if getattr(processor, "max_num_patches", None) is not None:
        resample = PILImageResampling(processor.resample).name.lower()
        return (
            f"`{type(processor).__name__}` in native-resolution mode: aspect-preserving resize ({resample}) to at most "
            f"{processor.max_num_patches} patches of {processor.patch_size} pixels, mean "
            f"{[round(v, 4) for v in processor.image_mean]}, std {[round(v, 4) for v in processor.image_std]}"
        )
    size = {k: v for k, v in dict(processor.size).items() if v is not None}
    crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    resample = PILImageResampling(processor.resample).name.lower()
    return (
        f"`{type(processor).__name__}`: resize to {size} ({resample})"
        + (f", centre crop { ({k: v for k, v in crop.items() if v is not None}) }" if crop else "")
        + f", mean {[round(v, 4) for v in processor.image_mean]}, std {[round(v, 4) for v in processor.image_std]}"
    )


def _at_image_size(model, image_size):
    """The model at another input size: the position embedding resampled (Sec. 3.2), every other weight as is."""
    config = model.config.__class__.from_dict({**model.config.to_dict(), "image_size": image_size})
    if config.grid_size == model.config.grid_size:
        return model
    resized = type(model)(config).eval()
    state = model.state_dict()
    for key in [k for k in state if k.endswith("embeddings.position_embeddings")]:
        state[key] = resample_for_config(state[key], config, new_grid=config.grid_size, old_grid=model.config.grid_size)
    resized.load_state_dict(state, strict=True)
    return resized


def convert_checkpoint(
    source_format: str, src: str | os.PathLike, *, image_size: int | list[int] | None = None, **overrides
) -> ConvertedCheckpoint:
    """Load a checkpoint of `source_format` from the local folder or file `src` into our model, strictly.

    Args:
        source_format: one of `SOURCE_FORMATS`.
        src: a folder (with config.json for the transformers sources) or a weight file.
        image_size: convert to this input size by resampling the position embedding (Sec. 3.2 of the paper).
        overrides: config fields the weights cannot tell (timm: `num_attention_heads`, `hidden_act`, `image_size` of
            the weights if not square); for every source they take precedence over what was read.

    Returns:
        A `ConvertedCheckpoint` with the model (`VisionTransformerForImageClassification` when the source has a
        classifier head, else `VisionTransformerModel`) in eval mode and the source's image processor (see the
        module docstring), sized for the model's image size. A DINOv2 source whose processor crops to another
        size than its config's `image_size` (facebook/dinov2-*: 224 and 518) is converted at the crop's size.
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"Unknown source format {source_format!r}; use one of {SOURCE_FORMATS}.")
    path = Path(src)
    source = read_state_dict(path)
    folder = path if path.is_dir() else path.parent
    plan = LOADERS[source_format](source, folder, overrides)
    mode, antialias = INTERPOLATION[source_format]
    fields = {"interpolation_mode": mode, "interpolation_antialias": antialias, **plan.fields, **overrides}
    config = VisionTransformerConfig(**fields)
    target, unused = map_keys(plan.source, plan.rules, plan.ignore)
    if "classifier.weight" in target:
        model = VisionTransformerForImageClassification(config)
        target = {k if k.startswith(("classifier.", "pre_logits.")) else f"vit.{k}": v for k, v in target.items()}
    else:
        model = VisionTransformerModel(config)
    if config.backbone_config is not None:
        _check_bit_standardization(model)
    load_strictly(model, target, unused, f"{path} (--from {source_format})")
    model = model.eval()
    notes = list(plan.notes)
    processor = _source_image_processor(source_format, folder)
    crop = _processor_output_size(processor) if processor is not None else None
    if image_size is None and source_format == "dinov2" and crop is not None and crop != config.image_size_hw:
        # transformers' Dinov2Model interpolates its table to every input; its processor crops to less than its
        # config's image_size (224 against 518): convert at the size the processor gives, so both agree.
        image_size = _size(*crop)
        notes.append(
            f"Position embeddings resampled from the source config's image size {config.image_size} to {image_size}, "
            "the size its image processor crops to (transformers' Dinov2Model interpolates them at every call); "
            "pass image_size= (--image-size) for another."
        )
    if image_size is not None:
        model = _at_image_size(model, image_size)
    size = model.config.image_size_hw
    if source_format == "siglip2":
        origin = "the source's settings" if (folder / PREPROCESSOR_CONFIG).is_file() else "Siglip2's defaults"
        processor = _siglip2_image_processor(folder, model.config)
    elif processor is None:
        origin = f"the {source_format} defaults"
        make = DEFAULT_IMAGE_PROCESSORS.get(source_format)
        processor = make(size) if make is not None else _timm_image_processor(folder, size)
    else:
        origin = f"the source's {PREPROCESSOR_CONFIG}"
        if crop != size:
            _fit_image_processor(processor, size)
            if crop is not None:
                origin += f", resized from {crop[0]}x{crop[1]} to the model's {size[0]}x{size[1]}"
    if model.config.num_channels == 3 and getattr(processor, "do_convert_rgb", None) is None:
        processor.do_convert_rgb = True
    notes.append(f"Preprocessing ({origin}): {_describe(processor)}.")
    return ConvertedCheckpoint(model, processor, source_format, str(path), notes)


def convert(
    source_format: str,
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int | list[int] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Convert and write a complete checkpoint folder (config, safetensors, preprocessing, code, model card).

    `base_model` is the Hub id of the source (e.g. "openai/clip-vit-base-patch16") for the card's metadata.
    """
    from .checkpoint import save_checkpoint

    converted = convert_checkpoint(source_format, src, image_size=image_size, **overrides)
    model, config = converted.model, converted.model.config
    source_name = base_model or Path(src).name
    conversion = "\n".join(
        [
            f"Converted from `{source_name}` (`--from {source_format}`) by `vlm_vision.conversion`.",
            "",
            *(f"- {note}" for note in converted.notes),
            f"- Prefix tokens: {config.num_prefix_tokens} ({int(config.use_class_token)} [CLS] + "
            f"{config.num_register_tokens} registers); `model.patch_tokens(...)` drops them"
            + (" (this tower has none: a VLM keeps every token)." if config.num_prefix_tokens == 0 else "."),
            f"- `final_norm={config.final_norm!r}`, `pooling={config.pooling!r}`, `hidden_act={config.hidden_act!r}`.",
            *(
                [f"- Resampled to image size {image_size} ({config.interpolation_mode} E_pos interpolation)."]
                if image_size is not None
                else []
            ),
        ]
    )
    return save_checkpoint(
        model,
        out_dir,
        image_processor=converted.image_processor,
        title=f"{source_name} (vlm-vision)",
        summary=f"The vision tower of `{source_name}` converted into vlm-vision's `VisionTransformerModel` with exact "
        "numerical parity.",
        sections={"Conversion": conversion},
        base_model=base_model,
        overwrite=overwrite,
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert a local ViT/CLIP/SigLIP/DINOv2/timm/JAX checkpoint into a vlm-vision checkpoint folder."
    )
    parser.add_argument("--from", dest="source_format", required=True, choices=SOURCE_FORMATS, help="source layout")
    parser.add_argument("src", help="local source folder or weight file (nothing is downloaded)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, help="convert to this size: H or H W")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads, when the source cannot tell")
    parser.add_argument("--hidden-act", default=None, help="override the activation (e.g. quick_gelu for timm CLIP)")
    parser.add_argument("--base-model", default=None, help="Hub id of the source, for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {}
    if args.num_heads is not None:
        overrides["num_attention_heads"] = args.num_heads
    if args.hidden_act is not None:
        overrides["hidden_act"] = args.hidden_act
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        parser.error(f"--image-size takes H or H W, got {len(args.image_size)} values.")
    image_size = (
        None if args.image_size is None else (args.image_size[0] if len(args.image_size) == 1 else args.image_size)
    )
    try:
        out = convert(
            args.source_format,
            args.src,
            args.out,
            image_size=image_size,
            base_model=args.base_model,
            overwrite=args.overwrite,
            **overrides,
        )
    except (ValueError, TypeError) as error:  # a wrong option or a bad source file: the message says what to do
        parser.error(str(error))
    logger.info("wrote %s: %s", out, ", ".join(sorted(p.name for p in out.iterdir())))


__all__ = ["SOURCE_FORMATS", "ConvertedCheckpoint", "convert", "convert_checkpoint", "main", "read_state_dict"]
