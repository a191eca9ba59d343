"""Write a complete, loadable checkpoint folder for a preset: the `create_checkpoint` library function and its CLI.

A folder holds `config.json` (with `auto_map`), `model.safetensors`, `preprocessor_config.json`, the configuration
and modeling source files (for `trust_remote_code=True`), and a model card (`README.md`). It is written into a
temporary sibling folder and moved into place at the end, so an interrupted run never leaves a folder that looks
complete but is not.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import ViTImageProcessorPil
from transformers.image_utils import PILImageResampling

from .configuration_vlm_vit import PRESET_NAMES, VisionTransformerConfig
from .model_card import write_model_card
from .modeling_vlm_vit import VisionTransformerForImageClassification, VisionTransformerModel

logger = logging.getLogger(__name__)

# The reference ViT preprocessing: resize to the model's size (bilinear), scale to [0, 1], normalise to [-1, 1].
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def image_processor_for(
    config: VisionTransformerConfig,
    image_mean=IMAGE_MEAN,
    image_std=IMAGE_STD,
    resample: PILImageResampling = PILImageResampling.BILINEAR,
) -> ViTImageProcessorPil:
    """transformers' ViT image processor (PIL backend) sized for `config`."""
    height, width = config.image_size_hw
    return ViTImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=list(image_mean),
        image_std=list(image_std),
        resample=resample,
    )


def replace_directory_atomically(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a fully written `staging` folder to `out_dir` (same file system), replacing it only when `overwrite`."""
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists: pass --overwrite (overwrite=True) to replace it.")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(trash)
    else:
        os.replace(staging, out_dir)


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
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
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
        replace_directory_atomically(staging, out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
        overrides["num_labels"] = num_labels
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {"image_size": args.image_size} if args.image_size else {}
    out = create_checkpoint(
        args.preset,
        args.out or f"./{args.preset}",
        num_labels=args.num_labels,
        seed=args.seed,
        overwrite=args.overwrite,
        **overrides,
    )
    logger.info("wrote %s: %s", out, ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    main()
