"""Train and evaluate a vision-language model from a recipe (the README's main job).

    python scripts/train_vlm.py                                   # the built-in default: configs/vlm/easy_vqa.json
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_vlm.py --recipe ...
    python scripts/train_vlm.py --resume                          # continue a stopped run exactly

Everything is in `vlm_vision.training.vlm_recipe`; this script only parses flags and prints the results.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vlm_vision.training.loop import process_state
from vlm_vision.training.vlm_recipe import VLMRecipe, run_vlm_recipe

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "easy_vqa.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="a configs/vlm/*.json recipe")
    parser.add_argument("--output-dir", default="outputs/easy-vqa-vlm")
    parser.add_argument("--lm", default=None, help="a causal LM folder instead of the recipe's tiny LM")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--save-every-steps", type=int, default=200)
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop each stage early (tests, budgets)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--report-to", nargs="*", default=[], help="accelerate trackers, e.g. tensorboard")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    recipe = VLMRecipe.from_json(args.recipe)
    if args.lm:
        recipe.language_model = {"path": args.lm}
    results = run_vlm_recipe(
        recipe,
        args.output_dir,
        resume=args.resume,
        save_every_steps=args.save_every_steps,
        stop_after_steps=args.stop_after_steps,
        progress_bar=not args.no_progress_bar,
        mixed_precision=args.mixed_precision,
        report_to=args.report_to,
    )
    if not process_state().is_main_process:
        return
    for row in results["stages"]:
        print(json.dumps(row))
    evaluation = results.get("evaluation")
    if evaluation:
        print(f"easy-VQA test accuracy ({evaluation['num_samples']} questions, exact match):")
        for name, value in evaluation["accuracy"].items():
            print(f"  {name:<8} {value:.4f}")
    print(f"total {results['total_seconds']:.0f} s; model in {Path(args.output_dir) / 'vlm'}")


if __name__ == "__main__":
    main()
