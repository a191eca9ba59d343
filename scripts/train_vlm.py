"""Train and evaluate a vision-language model from a recipe (the README's main job).

    python scripts/train_vlm.py                                   # the built-in default: configs/vlm/easy_vqa.json
    python scripts/train_vlm.py --recipe configs/vlm/llava_1_5.json --vision ./clip-vit-large-patch14-336 \\
        --lm ./Qwen2.5-0.5B-Instruct --set stages.pretrain.data.train=blip_laion_cc_sbu_558k.json \\
        stages.pretrain.data.image_folder=LLaVA-Pretrain/images stages.finetune.data.train=llava_v1_5_mix665k.json \\
        stages.finetune.data.image_folder=data/
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_vlm.py --recipe ...
    python scripts/train_vlm.py --resume                          # continue a stopped run exactly

Everything is in `vlm_vision.training.vlm_recipe`; this script parses flags, sets up the logs and prints results.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transformers.utils import logging as transformers_logging

from vlm_vision import recipes
from vlm_vision.training.loop import end_processes, process_state
from vlm_vision.training.vlm_recipe import VLMRecipe, run_vlm_recipe

DEFAULT_RECIPE = "easy_vqa"
EPILOG = """\
A recipe is a JSON file: the parts (vision, language_model, adapter), the data and the stages. Every field is
documented in docs/recipes.md; any of them can be set here with --set dotted.key=value (a stage by its name:
--set stages.finetune.batch_size=64 stages.finetune.optimizer.learning_rate=2e-5). Unknown keys are refused with
the valid ones listed. Shipped recipes, by name or as configs/vlm/<name>.json: easy_vqa (the built-in default),
llava_1_5 and llava_1_5_lora (LLaVA-1.5's two stages on your tower, LM and LLaVA data).
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help="a recipe file, or a shipped recipe's name (default: easy_vqa)"
    )
    parser.add_argument("--output-dir", default=None, help="default: outputs/<recipe file name>")
    parser.add_argument(
        "--vision", default=None, help="a vision tower folder (CLIP, SigLIP, SigLIP2, DINOv2, ViT or ours)"
    )
    parser.add_argument("--image-processor", default=None, help="a folder with the tower's preprocessor_config.json")
    parser.add_argument("--lm", default=None, help="a causal LM folder (with its tokenizer) instead of the recipe's")
    parser.add_argument(
        "--chat-template", default=None, help="the LM's chat template: 'model', 'user_assistant', a Jinja file"
    )
    parser.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--save-every-steps", type=int, default=200)
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop each stage early (tests, budgets)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--report-to", nargs="*", default=[], help="accelerate trackers, e.g. tensorboard")
    parser.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.recipe = str(recipes.resolve(args.recipe, "vlm"))
    except ValueError as error:
        parser.error(str(error))
    return args


def load_recipe(args: argparse.Namespace) -> VLMRecipe:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.image_processor is not None:
        overrides.append(f"vision.image_processor={args.image_processor}")
    if args.chat_template is not None:
        overrides.append(f"language_model.chat_template={args.chat_template}")
    return VLMRecipe.from_json(args.recipe, overrides, vision=args.vision, language_model=args.lm)


def set_up_logging(output_dir: Path, main_process: bool) -> Path:
    """Everything (INFO and up) into `<output_dir>/train.log`; on the console, this package's stage-level lines
    and warnings only (accelerate's per-checkpoint lines and its tied-weights notice stay in the file, and
    transformers' loading/saving bars are off)."""
    log_file = output_dir / "train.log"
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    console.addFilter(_on_console)
    root.addHandler(console)
    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" at every checkpoint
    return log_file


STAGE_LOGGERS = ("vlm_vision.training.vlm_recipe", "vlm_vision.training.vlm_parts", "vlm_vision.training.loop")
# harmless notices repeated at every checkpoint: kept in the log file, not on the console
FILE_ONLY = (("accelerate.utils.other", "Removed shared tensor"),)


def _on_console(record: logging.LogRecord) -> bool:
    if any(record.name == name and text in record.getMessage() for name, text in FILE_ONLY):  # "[RANK 0] Removed..."
        return False
    return record.levelno >= logging.WARNING or record.name in STAGE_LOGGERS


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args)
    output_dir = Path(args.output_dir or Path("outputs") / Path(args.recipe).stem)
    main_process = process_state().is_main_process
    log_file = set_up_logging(output_dir, main_process)
    results = run_vlm_recipe(
        recipe,
        str(output_dir),
        resume=args.resume,
        save_every_steps=args.save_every_steps,
        stop_after_steps=args.stop_after_steps,
        progress_bar=not args.no_progress_bar,
        mixed_precision=args.mixed_precision,
        report_to=args.report_to,
        evaluate=not args.no_eval,
    )
    end_processes()
    if not main_process:
        return
    for row in results["stages"]:
        print(json.dumps(row))
    evaluation = results.get("evaluation")
    if evaluation:
        what = "easy-VQA test" if evaluation["data"] == "easy-vqa" else evaluation["data"]
        metric = (recipe.eval_metric or "exact_match").replace("_", " ")
        print(f"{what} ({evaluation['num_samples']} questions, {metric}; seed {recipe.seed}, recipe {args.recipe}):")
        for name, value in evaluation.get("accuracy", evaluation.get("captions", {})).items():
            print(f"  {name:<8} {value:.4f}")
    if "stopped_in" in results:
        print(f"stopped in stage {results['stopped_in']}; continue with --resume")
    else:
        print(f"total {results['total_seconds']:.0f} s; model in {output_dir / 'vlm'}; log in {log_file}")


if __name__ == "__main__":
    main()
