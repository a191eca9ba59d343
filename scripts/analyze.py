"""Figure 7 of the ViT paper and attention-rollout overlays for a checkpoint, as PNG files.

    python scripts/analyze.py outputs/classifier/pretrain/model --out docs/figures
    python scripts/analyze.py CHECKPOINT --images a.jpg b.png photos/ --out DIR --num-overlays 4

Without --images, scikit-image's photos (astronaut, chelsea, coffee, rocket) are used.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import vlm_vision  # noqa: F401  registers the model with the Auto classes
from vlm_vision.analysis.plots import write_analysis
from vlm_vision.data import IMAGE_EXTENSIONS, load_image

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def default_photos():
    try:
        from skimage import data
    except ImportError as error:
        raise SystemExit(
            "The default photos need scikit-image (pip install 'vlm-vision[demo]'); or pass --images."
        ) from error
    from PIL import Image

    return [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in DEFAULT_PHOTOS]


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (encoder or classifier)")
    parser.add_argument("--images", nargs="+", default=None, help="image files or folders (default: skimage photos)")
    parser.add_argument("--out", required=True, help="folder for the PNG files and analysis.json")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N image files")
    parser.add_argument("--num-overlays", type=int, default=None, help="rollout overlays for the first N images")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not Path(args.checkpoint, "config.json").is_file():
        raise SystemExit(f"{args.checkpoint} is not a checkpoint folder (no config.json).")
    architectures = AutoConfig.from_pretrained(args.checkpoint).architectures or []
    is_classifier = any(name.endswith("ForImageClassification") for name in architectures)
    model = (AutoModelForImageClassification if is_classifier else AutoModel).from_pretrained(args.checkpoint)
    processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    if args.images:
        files = image_files(args.images)[: args.max_images]
        if not files:
            raise SystemExit(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.images}.")
        images = [(f.stem, load_image(f)) for f in files]
    else:
        images = default_photos()
    result = write_analysis(
        model, processor, images, args.out, num_overlays=args.num_overlays, progress_bar=not args.no_progress
    )
    Path(args.out, "analysis.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    print("wrote", ", ".join(Path(f).name for f in result["files"]))
    return result


if __name__ == "__main__":
    main()
