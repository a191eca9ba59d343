"""`vlm-vision convert` (and `vlm-vision-convert`): the command line over `convert`."""

from __future__ import annotations

import logging

from .converter import convert
from .engine import SOURCE_FORMATS

logger = logging.getLogger(__name__)


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
