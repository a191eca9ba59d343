"""Evaluate a saved VLM folder with batched greedy generation on its device.

python scripts/evaluate_vlm.py outputs/easy-vqa-vlm/vlm                          # easy-VQA test, exact match
python scripts/evaluate_vlm.py outputs/easy-vqa-vlm/match/model --breakdown       # + the yes/no answers by kind
python scripts/evaluate_vlm.py VLM --llava EVAL.json --images IMAGES/ --max-new-tokens 64   # first answers, exact match
python scripts/evaluate_vlm.py VLM --vqav2 QUESTIONS.json ANNOTATIONS.json --images val2014/
python scripts/evaluate_vlm.py VLM --coco-captions captions_val2017.json --images val2017/   # needs [eval]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_vision  # noqa: F401  registers the Auto classes
from vlm_vision.cli import require_vlm_folder
from vlm_vision.data.conversations import read_coco_captions, read_easy_vqa, read_llava, read_vqav2
from vlm_vision.data.easy_vqa import yes_no_breakdown
from vlm_vision.evaluation.generation import evaluate_samples
from vlm_vision.training.vlm import save_json, seeded_subset
from vlm_vision.vlm.towers import resolve_dtype


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a VLM folder (model, processor, tokenizer)")
    parser.add_argument("--llava", metavar="JSON", help="a LLaVA conversation file: each first answer, exact match")
    parser.add_argument("--vqav2", nargs=2, metavar=("QUESTIONS", "ANNOTATIONS"), help="VQAv2 JSON files")
    parser.add_argument("--coco-captions", metavar="ANNOTATIONS", help="COCO captions JSON")
    parser.add_argument("--images", help="the image folder of --llava / --vqav2 / --coco-captions")
    parser.add_argument("--split", default="val", help="VQAv2 split name in the image file names")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of this size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the longest answer generated")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default=None, help="write the metrics and the predictions to this JSON file")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--breakdown", action="store_true", help="easy-VQA: the yes/no answers by attribute, negation and match"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_vlm_folder(parser, args.model)
    if (args.llava or args.vqav2 or args.coco_captions) and not args.images:
        parser.error("--images is required with --llava, --vqav2 and --coco-captions")
    if args.breakdown and (args.llava or args.vqav2 or args.coco_captions):
        parser.error("--breakdown is for easy-VQA (the default data): drop --llava / --vqav2 / --coco-captions")

    if args.llava:
        samples, report = read_llava(args.llava, args.images)
        metric = "exact_match"
    elif args.vqav2:
        samples, report = read_vqav2(*args.vqav2, args.images, split=args.split)
        metric = "vqa"
    elif args.coco_captions:
        samples, report = read_coco_captions(args.coco_captions, args.images)
        metric = "captions"
    else:
        samples, report = read_easy_vqa("test")
        metric = "exact_match"
    report.log()
    samples = seeded_subset(samples, args.limit, 0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, "--dtype") or torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(args.model)
    results = evaluate_samples(
        model,
        processor,
        samples,
        metric,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress_bar=not args.no_progress_bar,
    )
    predictions = results.pop("predictions")
    breakdown = []
    if args.breakdown:
        qa = [s.meta["qa"][0] for s in samples]
        breakdown = yes_no_breakdown([q["question"] for q in qa], [q["answer"] for q in qa], predictions)
    print(json.dumps(results, indent=2))
    for row in breakdown:
        kind = f"{row['attribute']}, {'negated' if row['negated'] else 'not negated'}, "
        kind += "names what is shown" if row["shown"] else "names what is absent"
        print(f"  {kind:<48} {row['questions']:>5} questions  right {row['right']:.3f}  answered yes {row['yes']:.3f}")
    if args.output:
        extra = {"yes_no_breakdown": breakdown} if args.breakdown else {}
        predicted = dict(zip([s.id for s in samples], predictions, strict=True))
        save_json(args.output, {**results, **extra, "predictions": predicted})


if __name__ == "__main__":
    main()
