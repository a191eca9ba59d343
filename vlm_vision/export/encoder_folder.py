"""Write a complete, loadable checkpoint folder for a preset: the `create_checkpoint` library function and its CLI.

A folder holds `config.json` (with `auto_map`), `model.safetensors`, `preprocessor_config.json`, the configuration
and modeling source files (for `trust_remote_code=True`), and a model card (`README.md`). It is written into a
temporary sibling folder and moved into place at the end, so an interrupted run never leaves a folder that looks
complete but is not.

The image processor converts every image to RGB (`do_convert_rgb`), so grayscale, RGBA and palette images work.
Folders written before that (their `preprocessor_config.json` has no `do_convert_rgb`) load with
`load_image_processor`, or are fixed once with `upgrade_checkpoint` (`vlm-vision-create-checkpoint --upgrade DIR`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoImageProcessor, ViTImageProcessorPil
from transformers.image_utils import PILImageResampling
from transformers.utils import IMAGE_PROCESSOR_NAME

from ..encoder.configuration_vit import PRESET_NAMES, VisionTransformerConfig
from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel
from ..vlm.remote_code import write_text_atomically
from .folders import check_out_dir, replace_directory_atomically, save_folder_atomically  # noqa: F401 (its old home)
from .model_card import write_model_card

logger = logging.getLogger(__name__)

# The reference ViT preprocessing: resize to the model's size (bilinear), scale to [0, 1], normalise to [-1, 1].
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_CONFIG = IMAGE_PROCESSOR_NAME  # transformers' "preprocessor_config.json"


def image_processor_for(
    config: VisionTransformerConfig,
    image_mean=None,
    image_std=None,
    resample: PILImageResampling = PILImageResampling.BILINEAR,
) -> ViTImageProcessorPil:
    """transformers' ViT image processor (PIL backend) sized for `config`.

    For a 3-channel model it converts every image to RGB first (`do_convert_rgb=True`: grayscale, palette, CMYK,
    16-bit; transparency composited on white), as CLIP's and SigLIP's processors do; transformers' ViT processor
    does not by default, and a grayscale image then fails in the normalisation. A model of other `num_channels`
    gets no conversion and a mean/std of that length (a single value is repeated). The default mean and std are 0.5
    per channel (the reference ViT preprocessing).
    """
    height, width = config.image_size_hw
    channels = config.num_channels
    image_mean = list(IMAGE_MEAN[:1] if image_mean is None else image_mean)
    image_std = list(IMAGE_STD[:1] if image_std is None else image_std)
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"{name}={values} has {len(values)} values but the model has num_channels={channels}: give one value "
                f"per channel (or a single value for all)."
            )
    return ViTImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=image_mean * channels if len(image_mean) == 1 else image_mean,
        image_std=image_std * channels if len(image_std) == 1 else image_std,
        resample=resample,
        do_convert_rgb=channels == 3,
    )


def _saved_processor_converts_rgb(folder: Path) -> bool | None:
    """What `folder/preprocessor_config.json` says about RGB conversion: True/False, None when it says nothing."""
    try:
        saved = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return saved.get("do_convert_rgb") if isinstance(saved, dict) else None


def load_image_processor(folder: str | os.PathLike, **kwargs):
    """`AutoImageProcessor.from_pretrained(folder, **kwargs)` (PIL backend unless `backend=` is given), with RGB
    conversion switched on for folders written before it was saved (`do_convert_rgb` absent), so that grayscale and
    RGBA images work there too. An explicit `do_convert_rgb` in the file or in `kwargs` is kept."""
    folder = Path(folder)
    kwargs.setdefault("backend", "pil")
    processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    unset = "do_convert_rgb" not in kwargs and getattr(processor, "do_convert_rgb", None) is None
    if unset and _saved_processor_converts_rgb(folder) is None:
        logger.info("%s: its image processor predates do_convert_rgb; converting images to RGB.", folder)
        processor.do_convert_rgb = True
    return processor


def upgrade_checkpoint(folder: str | os.PathLike) -> list[str]:
    """Bring a folder written by an earlier vlm-vision up to date in place; returns what was changed.

    Today one thing: `preprocessor_config.json` without `do_convert_rgb` gets `"do_convert_rgb": true` (for a
    3-channel model), so that `AutoImageProcessor.from_pretrained(folder)` accepts grayscale, RGBA and palette images.
    The file is rewritten atomically (a temporary file renamed over it).
    """
    folder = Path(folder)
    file = folder / PREPROCESSOR_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: pass a checkpoint folder written by save_checkpoint.")
    try:
        saved = json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}): write the folder again (create_checkpoint).") from error
    config_file = folder / "config.json"
    channels = json.loads(config_file.read_text()).get("num_channels", 3) if config_file.is_file() else 3
    changes = []
    if saved.get("do_convert_rgb") is None and channels == 3:
        saved["do_convert_rgb"] = True
        changes.append(f"{PREPROCESSOR_CONFIG}: do_convert_rgb = true (grayscale, RGBA and palette images work)")
        write_text_atomically(file, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    for change in changes:
        logger.info("%s: %s", folder, change)
    return changes


def save_checkpoint(
    model: VisionTransformerModel | VisionTransformerForImageClassification,
    out_dir: str | os.PathLike,
    *,
    image_processor=None,
    title: str,
    summary: str,
    sections: dict[str, str] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model`, its image processor, code files and model card into `out_dir`, atomically."""
    if not isinstance(model, (VisionTransformerModel, VisionTransformerForImageClassification)):
        raise TypeError(
            f"save_checkpoint writes VisionTransformerModel / VisionTransformerForImageClassification folders, got "
            f"{type(model).__name__}: use its own save_pretrained."
        )
    out_dir = Path(out_dir).resolve()
    check_out_dir(out_dir, overwrite)  # before the work, not after it

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        (image_processor or image_processor_for(model.config)).save_pretrained(staging)
        is_classifier = isinstance(model, VisionTransformerForImageClassification)
        write_model_card(
            staging,
            model.config,
            title=title,
            summary=summary,
            num_parameters=model.num_parameters(),
            pipeline_tag="image-classification" if is_classifier else "image-feature-extraction",
            sections=sections,
            base_model=base_model,
        )

    save_folder_atomically(out_dir, write, overwrite=overwrite)
    return out_dir


def create_checkpoint(
    preset: str = "vit-b16",
    out_dir: str | os.PathLike = "./vit-b16",
    *,
    num_labels: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Write a randomly initialised checkpoint of `preset` (see `VisionTransformerConfig.from_preset`).

    Args:
        preset: e.g. "vit-b16", "vit-l32", "r50-vit-b16".
        out_dir: the folder to write.
        num_labels: when given, an image classifier with that many classes (`AutoModelForImageClassification`);
            otherwise the encoder alone (`AutoModel`).
        seed: the torch seed of the initialisation.
        overrides: config fields, e.g. `image_size=384`.
    """
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(
                f"num_labels={num_labels!r} must be a positive int (the number of classes); leave it None (no "
                "--num-labels) for an encoder without a classifier."
            )
        overrides["num_labels"] = num_labels
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    config = VisionTransformerConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model_class = VisionTransformerForImageClassification if num_labels is not None else VisionTransformerModel
    model = model_class(config).eval()
    summary = (
        f"A `{preset}` Vision Transformer (Dosovitskiy et al., 2020) with **randomly initialised** weights "
        f"(seed {seed}), written by `vlm-vision`. Train it, or convert pretrained weights into this layout."
    )
    return save_checkpoint(model, out_dir, title=f"{preset} (vlm-vision)", summary=summary, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-b16", help=f"one of {', '.join(PRESET_NAMES)} (any vit-SIZEPATCH)")
    parser.add_argument("--out", default=None, help="output folder (default: ./PRESET)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the preset's 224)")
    parser.add_argument("--num-labels", type=int, default=None, help="write an image classifier with K classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--upgrade",
        metavar="FOLDER",
        default=None,
        help="instead of writing a folder, bring FOLDER (written by an earlier vlm-vision) up to date in place",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.upgrade is not None:
            changes = upgrade_checkpoint(args.upgrade)
            logger.info("%s: %s", args.upgrade, "; ".join(changes) if changes else "already up to date")
            return
        overrides = {"image_size": args.image_size} if args.image_size is not None else {}
        out = create_checkpoint(
            args.preset,
            args.out or f"./{args.preset}",
            num_labels=args.num_labels,
            seed=args.seed,
            overwrite=args.overwrite,
            **overrides,
        )
    except (ValueError, OSError) as error:  # a wrong option or folder: the message says what to change
        parser.error(str(error))
    logger.info("wrote %s: %s", out, ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    main()
