"""A synthetic task where aspect ratio matters: fine or coarse stripes along a 1:4 strip, squash against native.

Each image is a 128x32 strip of vertical stripes, fine (period 4 px, answer 1) or coarse (period 8 px, answer 0),
with a random phase and contrast and the same mean grey either way, generated from a seed (thin text-like strokes).
The question is one token, the answer one token. The same tiny VLM (our tower at 32 px, patch 8, an mlp adapter, a
2-layer Llama; everything trains) learns it twice, from the same initialisation, batches and steps, at the same
budget of 16 patches (16 image tokens) per image:

    squash   the strip resized to 32x32 (a 4x4 patch grid): 4x less horizontal resolution, 2x more vertical
    native   the strip kept at 1:4, resized to 64x16 (a 2x8 patch grid): 2x less resolution both ways

It prints the exact-match accuracy of each on held-out strips. What it shows: at one token budget, keeping the
aspect ratio keeps the resolution along the strip that thin strokes need (squashed, fine stripes blur towards grey).
What it doesn't: anything about real images, other tasks or larger models; it is one toy. About 2 minutes on
2 CPU cores:

    python scripts/experiment_aspect_stripes.py --steps 200 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from vlm_vision.commands.benchmark_resolution import build_model, image_inputs
from vlm_vision.vlm.modeling_vlm import IGNORE_INDEX

QUESTION = 10  # token ids 0 and 1 are the answers
MODES = {"squash": "squash", "native": "native-padded"}  # this task's names -> the benchmark's image layouts
TOWER = {"image_size": 32, "patch_size": 8, "vision_hidden": 64, "vision_layers": 2, "vision_heads": 2}
LM = {"vision_mlp": 128, "text_hidden": 64, "text_layers": 2, "text_heads": 2, "text_mlp": 128, "vocab_size": 16}


def stripes(count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """`count` strips and their answers (1: fine, 0: coarse), half and half on average."""
    rng = np.random.default_rng(seed)
    images, answers = [], []
    for _ in range(count):
        fine = int(rng.integers(0, 2))
        period = 4 if fine else 8
        phase = int(rng.integers(0, period))
        contrast = int(rng.integers(60, 128))
        dark = (np.arange(128) + phase) % period < period // 2
        row = np.where(dark, 128 - contrast, 128 + contrast).astype(np.uint8)  # (128,): mean 128 either way
        images.append(Image.fromarray(np.repeat(np.repeat(row[None, :, None], 32, 0), 3, 2)))
        answers.append(fine)
    return images, answers


def batch_for(model, mode: str, images, answers, args) -> dict:
    """Image tokens, the question token, the answer token (the only supervised one)."""
    inputs, layouts = image_inputs(model, MODES[mode], images, args)
    ids = torch.tensor([[*layout, QUESTION, answer] for layout, answer in zip(layouts, answers, strict=True)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    return {**inputs, "input_ids": ids, "labels": labels}


def accuracy(model, mode: str, images, answers, args) -> float:
    """Exact match of the answer predicted at the question token (argmax over the two answers)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = batch_for(model, mode, images[start : start + 64], answers[start : start + 64], args)
            batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits[:, -2, :2].argmax(-1) == batch["input_ids"][:, -1]).sum())
    model.train()
    return correct / len(images)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation and the data")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "eval_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    vars(args).update({**TOWER, **LM, "max_tiles": 1})  # what build_model and image_inputs read
    train_images, train_answers = stripes(args.steps * args.batch_size, args.seed)
    test_images, test_answers = stripes(args.eval_size, args.seed + 1)
    results = {}
    for mode in MODES:
        model = build_model(args, {"adapter_type": "mlp"}).train()  # the same seed: the same initialisation
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
        for step in range(args.steps):
            window = slice(step * args.batch_size, (step + 1) * args.batch_size)
            model(**batch_for(model, mode, train_images[window], train_answers[window], args)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[mode] = accuracy(model, mode, test_images, test_answers, args)
    print(
        f"fine vs coarse stripes on 128x32 strips, {args.steps} steps of {args.batch_size}, 16 image tokens per "
        f"image, seed {args.seed}: exact match squash {results['squash']:.3f}, native {results['native']:.3f} "
        f"(chance 0.5, {args.eval_size} held-out strips)"
    )
    return results


if __name__ == "__main__":
    main()
