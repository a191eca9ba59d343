"""The main job until VLM training lands: write a ViT-B/16 checkpoint folder and encode a real photo through it.

The photo is scikit-image's astronaut (Eileen Collins, public domain), which ships inside the package: no download.
Everything goes through the saved folder exactly as a user would load it: `AutoImageProcessor` + `AutoModel`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from .export.encoder_folder import create_checkpoint

logger = logging.getLogger(__name__)


def astronaut() -> Image.Image:
    """scikit-image's astronaut photo (512 x 512 RGB) as a PIL image."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("The demo photo comes from scikit-image: pip install 'vlm-vision[demo]'.") from err
    return Image.fromarray(data.astronaut())


@torch.inference_mode()
def encode_image(checkpoint: str | Path, image: Image.Image) -> dict[str, tuple[int, ...]]:
    """Encode `image` with the processor and model saved in `checkpoint`; return the name -> shape of each output."""
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    outputs = model(pixel_values=pixel_values)
    (penultimate,) = model.get_intermediate_layers(pixel_values, -2, drop_prefix_tokens=True)
    return {
        "pixel_values": tuple(pixel_values.shape),
        "last_hidden_state": tuple(outputs.last_hidden_state.shape),
        "pooler_output": tuple(outputs.pooler_output.shape),
        "patch_tokens": tuple(model.patch_tokens(outputs.last_hidden_state).shape),
        "penultimate_layer_patch_tokens": tuple(penultimate.shape),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-b16")
    parser.add_argument("--out", default="./vit-b16", help="checkpoint folder to write (replaced if present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import vlm_vision  # noqa: F401  registers the Auto classes

    out = create_checkpoint(args.preset, args.out, overwrite=True)
    logger.info("wrote %s", out)
    for name, shape in encode_image(out, astronaut()).items():
        logger.info("%-32s %s", name, shape)


if __name__ == "__main__":
    main()
