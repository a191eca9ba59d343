"""Pre-train a small ViT with the MLP head, then fine-tune it at twice the resolution with a fresh zero-initialised
linear head (Sec. 3.2 of the ViT paper). Thin: the work is in `vlm_vision.training.classifier`.

    python scripts/train_classifier.py                                   # the built-in easy-VQA recipe
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/train_classifier.py
    python scripts/train_classifier.py --data path/to/images             # one sub-folder per class
    python scripts/train_classifier.py --resume                          # continue a killed run exactly
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from vlm_vision import recipes
from vlm_vision.training import process_state
from vlm_vision.training.classifier import ClassifierRecipe, run_recipe
from vlm_vision.training.loop import end_processes

DEFAULT_CONFIG = "easy_vqa"
COLUMNS = (
    "stage",
    "task",
    "image_size",
    "head",
    "train_images",
    "steps",
    "train_seconds",
    "samples_per_second",
    "accuracy_before",
    "accuracy_after",
    "accuracy_from_scratch",
)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="a recipe file, or a shipped recipe's name (default: easy_vqa)"
    )
    parser.add_argument("--output-dir", default="outputs/classifier", help="run folder: one sub-folder per stage")
    parser.add_argument("--data", default=None, help="train every stage on this image folder instead of the recipe's")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--save-every", type=int, default=None, help="save a resumable checkpoint every N steps")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop each stage after N steps")
    parser.add_argument("--report-to", nargs="*", default=[], help="accelerate trackers, e.g. tensorboard")
    parser.add_argument("--on-bad-image", choices=("raise", "skip"), default="raise")
    parser.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 on a GPU that supports it, fp32 on CPU",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        args.config = str(recipes.resolve(args.config, "classifier"))
    except ValueError as error:
        parser.error(str(error))

    process = process_state()
    logging.basicConfig(
        level=logging.INFO if process.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    recipe = ClassifierRecipe.from_json(args.config)
    if args.data is not None:
        recipe.stages = [dataclasses.replace(stage, data=args.data) for stage in recipe.stages]
    if args.seed is not None:
        recipe.seed = args.seed
    rows = run_recipe(
        recipe,
        args.output_dir,
        resume=args.resume,
        save_every_steps=args.save_every,
        stop_after_steps=args.stop_after_steps,
        report_to=args.report_to,
        progress_bar=not args.no_progress,
        on_bad_image=args.on_bad_image,
        mixed_precision=args.mixed_precision,
    )
    end_processes()
    if process.is_main_process and rows:
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        print("\n" + " | ".join(columns))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in columns))
    return rows


if __name__ == "__main__":
    main()
