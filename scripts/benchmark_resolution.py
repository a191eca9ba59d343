"""Tokens per image and training-step time of the VLM's image modes on mixed aspect ratios (1:4 to 4:1).

The same random images (aspect ratios drawn log-uniformly from 1:4 to 4:1, seeded) and the same random text go
through one tiny VLM (our tower, a pixel-shuffle adapter, a Llama) in four layouts:

    squash         image_mode "fixed": every image resized to the tower's square size
    native-padded  image_mode "native" with max_num_patches = the square's patch count (the same patch budget:
                   an image never gets more patches than the square), LM rows padded
    native-packed  the same native images, the LM conversations packed into rows (`vlm_vision.data.packing`); the
                   tower still pads each image to the budget
    native-packed-tower  the same native images packed into tower rows of `--tower-row-length` patch slots (the
                   image processor's `pack_images=True`, first-fit; each image attends within itself), LM rows
                   padded as in native-padded: what packing saves in the tower alone
    tiles          image_mode "tiles" with `--max-tiles`: tiles of the tower's size plus a thumbnail. Tiles cost
                   more tokens than the budget by design (each tile is a whole square); the table says how many

For each: image tokens per image (mean, min, max), LM positions computed per batch (padding included), tower patch
positions per batch (padding included), and the median time of a forward+backward+AdamW step. Timings depend on the
machine; only the token counts are exact. The defaults run in seconds on 2 CPU cores:

    python scripts/benchmark_resolution.py --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import LlamaConfig

from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, VisionTransformerConfig
from vlm_vision.data.packing import pack_encoded
from vlm_vision.encoder.image_processing_vit import VisionTransformerImageProcessor
from vlm_vision.export.encoder_folder import image_processor_for
from vlm_vision.vlm.modeling_vlm import IGNORE_INDEX, tile_layout
from vlm_vision.vlm.processing_vlm import split_image

MODES = ("squash", "native-padded", "native-packed", "native-packed-tower", "tiles")


def build_model(args, adapter: dict | None = None) -> VisionLanguageForConditionalGeneration:
    """A tiny VLM (pixel shuffle r=2 unless `adapter` says otherwise); the last three ids of the vocabulary are
    `<image>`, the column and the row separator."""
    vocab = args.vocab_size
    config = VisionLanguageConfig(
        vision_config=VisionTransformerConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            hidden_size=args.vision_hidden,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_heads,
            intermediate_size=args.vision_mlp,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=args.text_hidden,
            intermediate_size=args.text_mlp,
            num_hidden_layers=args.text_layers,
            num_attention_heads=args.text_heads,
            num_key_value_heads=args.text_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ).to_dict(),
        adapter_config=adapter or {"adapter_type": "pixel_shuffle", "scale_factor": 2},
        vision_feature_layer=-1,
        image_token_id=vocab - 1,
        tile_separator_token_ids=[vocab - 3, vocab - 2],
    )
    torch.manual_seed(args.seed)
    return VisionLanguageForConditionalGeneration(config)


def mixed_images(args) -> list[Image.Image]:
    """Random-pixel images whose aspect ratios run log-uniformly from 1:4 to 4:1; the long side is 2 squares."""
    rng = np.random.default_rng(args.seed)
    images = []
    for ratio in np.exp(rng.uniform(math.log(1 / 4), math.log(4), args.batch_size * args.num_batches)):
        long = 2 * args.image_size
        width, height = (long, max(1, round(long / ratio))) if ratio >= 1 else (max(1, round(long * ratio)), long)
        images.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
    return images


def image_inputs(model, mode: str, images: list[Image.Image], args) -> tuple[dict, list[list[int]]]:
    """The model's image inputs for `images` in `mode` and each image's token ids (what the processor builds)."""
    config = model.config
    square = image_processor_for(config.vision_config)
    tile = [config.image_token_id] * model.num_image_tokens
    if mode == "squash":
        return {"pixel_values": square(images=images, return_tensors="pt")["pixel_values"]}, [tile] * len(images)
    if mode.startswith("native"):
        budget = config.grid_size[0] * config.grid_size[1]
        packing = {}
        if mode == "native-packed-tower":
            packing = {"pack_images": True, "max_packed_length": args.tower_row_length or 2 * budget}
        native = VisionTransformerImageProcessor(
            patch_size=args.patch_size, max_num_patches=budget, image_mean=[0.5] * 3, image_std=[0.5] * 3, **packing
        )
        inputs = dict(native(images=images, return_tensors="pt"))
        counts = model.image_token_counts(inputs["spatial_shapes"])
        return inputs, [[config.image_token_id] * n for n in counts]
    pieces, grids = [], []
    for image in images:
        tiles, rows, columns = split_image(image, (args.image_size, args.image_size), args.max_tiles)
        pieces += tiles
        grids.append((rows, columns))
    inputs = {
        "pixel_values": square(images=pieces, return_tensors="pt")["pixel_values"],
        "image_tiles": torch.tensor(grids),
    }
    return inputs, [tile_layout(r, c, tile, *config.tile_separator_token_ids) for r, c in grids]


def make_batch(model, mode: str, images: list[Image.Image], args, generator: torch.Generator) -> dict:
    """One batch: per sample its image's tokens, then `--text-length` random tokens, all supervised."""
    inputs, layouts = image_inputs(model, mode, images, args)
    encoded = []
    for layout in layouts:
        text = torch.randint(0, args.vocab_size - 3, (args.text_length,), generator=generator).tolist()
        encoded.append({"input_ids": layout + text, "labels": [IGNORE_INDEX] * len(layout) + text})
    if mode == "native-packed":
        row_length = max(len(e["input_ids"]) for e in encoded) * 2
        packed = pack_encoded(encoded, row_length, 0, [[i] for i in range(len(encoded))])
        return {**inputs, **packed, "image_tokens": [len(layout) for layout in layouts]}
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, sample in enumerate(encoded):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.tensor(sample["input_ids"])
        labels[row, :length] = torch.tensor(sample["labels"])
        attention_mask[row, :length] = 1
    return {
        **inputs,
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "image_tokens": [sum(token == model.config.image_token_id for token in layout) for layout in layouts],
    }


def step_seconds(model, optimizer, batch: dict, device: str) -> float:
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--vision-heads", type=int, default=2)
    parser.add_argument("--vision-mlp", type=int, default=128)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-heads", type=int, default=2)
    parser.add_argument("--text-mlp", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--max-tiles", type=int, default=2)
    parser.add_argument(
        "--tower-row-length",
        type=int,
        default=None,
        help="patch slots per packed tower row in native-packed-tower (default: twice the square's patch count)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_batches", "steps", "max_tiles", "text_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")

    model = build_model(args).to(args.device).train()
    images = mixed_images(args)
    groups = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    budget = model.num_image_tokens
    results = {}
    for mode in args.modes:
        generator = torch.Generator().manual_seed(args.seed)
        batches = [make_batch(model, mode, group, args, generator) for group in groups]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step_seconds(model, optimizer, batches[0], args.device)  # warm-up
        times = [step_seconds(model, optimizer, batches[i % len(batches)], args.device) for i in range(args.steps)]
        tokens = [n for batch in batches for n in batch["image_tokens"]]
        results[mode] = {
            "tokens_mean": statistics.mean(tokens),
            "tokens_min": min(tokens),
            "tokens_max": max(tokens),
            "lm_positions": statistics.mean(b["input_ids"].numel() for b in batches),
            "tower_positions": statistics.mean(b["pixel_values"].shape[0] * _patches(b, args) for b in batches),
            "step_seconds": statistics.median(times),
        }
    print(
        f"{len(images)} images, aspect ratios 1:4..4:1 (seed {args.seed}), {args.image_size}px tower (patch "
        f"{args.patch_size}), pixel_shuffle r=2: {budget} image tokens per square; {args.batch_size} per batch"
    )
    print("| mode                | image tokens mean | min | max | LM positions/batch | tower patches/batch | step s |")
    print("|---------------------|-------------------|-----|-----|--------------------|---------------------|--------|")
    for mode, row in results.items():
        print(
            f"| {mode:<19} | {row['tokens_mean']:>17.1f} | {row['tokens_min']:>3} | {row['tokens_max']:>3} | "
            f"{row['lm_positions']:>18,.0f} | {row['tower_positions']:>19,.0f} | {row['step_seconds']:>6.3f} |"
        )
    return results


def _patches(batch: dict, args) -> int:
    """Patch positions the tower computes per image row of pixel_values (padding included)."""
    pixels = batch["pixel_values"]
    return (
        pixels.shape[1]
        if pixels.dim() == 3
        else (pixels.shape[-2] // args.patch_size) * (pixels.shape[-1] // args.patch_size)
    )


if __name__ == "__main__":
    main()
