"""Evaluate a saved VLM folder with batched greedy generation.

python scripts/evaluate_vlm.py outputs/easy-vqa-vlm/vlm                          # easy-VQA test, exact match
python scripts/evaluate_vlm.py VLM --vqav2 QUESTIONS.json ANNOTATIONS.json --images val2014/
python scripts/evaluate_vlm.py VLM --coco-captions captions_val2017.json --images val2017/   # needs [eval]
"""

from __future__ import annotations

import argparse
import json
import logging

from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_vision  # noqa: F401  registers the Auto classes
from vlm_vision.data.conversations import read_coco_captions, read_easy_vqa, read_vqav2
from vlm_vision.training.vlm import evaluate_samples, seeded_subset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a VLM folder (model, processor, tokenizer)")
    parser.add_argument("--vqav2", nargs=2, metavar=("QUESTIONS", "ANNOTATIONS"), help="VQAv2 JSON files")
    parser.add_argument("--coco-captions", metavar="ANNOTATIONS", help="COCO captions JSON")
    parser.add_argument("--images", help="the image folder of --vqav2 / --coco-captions")
    parser.add_argument("--split", default="val", help="VQAv2 split name in the image file names")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of this size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default=None, help="write the metrics and predictions to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.vqav2 or args.coco_captions) and not args.images:
        parser.error("--images is required with --vqav2 and --coco-captions")

    if args.vqav2:
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
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    results = evaluate_samples(model, processor, samples, metric, batch_size=args.batch_size)
    predictions = results.pop("predictions")
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({**results, "predictions": dict(zip([s.id for s in samples], predictions, strict=True))}, f)


if __name__ == "__main__":
    main()
