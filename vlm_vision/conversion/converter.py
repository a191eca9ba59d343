"""Converting a checkpoint: `convert_checkpoint` (into our model in memory, strictly, with the source's image
processor) and `convert` (a complete encoder folder with a model card saying how it was converted)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers.image_utils import (
    PILImageResampling,
)

from ..encoder.configuration_vit import VisionTransformerConfig
from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel, resample_for_config
from .clip import _convert_clip
from .dinov2 import _convert_dinov2
from .engine import SOURCE_FORMATS, load_strictly, map_keys
from .npz import _check_bit_standardization, _convert_npz
from .preprocessing import (
    DEFAULT_IMAGE_PROCESSORS,
    INTERPOLATION,
    PREPROCESSOR_CONFIG,
    _describe,
    _fit_image_processor,
    _processor_output_size,
    _source_image_processor,
    _timm_image_processor,
)
from .reading import read_state_dict
from .siglip import _convert_siglip, _convert_siglip2, _siglip2_image_processor
from .timm import _convert_timm, _size
from .transformers_vit import _convert_hf


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


LOADERS = {
    "hf": _convert_hf,
    "clip": _convert_clip,
    "siglip": _convert_siglip,
    "siglip2": _convert_siglip2,
    "dinov2": _convert_dinov2,
    "timm": _convert_timm,
    "npz": _convert_npz,
}


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
    from ..export.encoder_folder import save_checkpoint

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
