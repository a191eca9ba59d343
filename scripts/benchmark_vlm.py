"""Training-step throughput of our VLM against transformers' LLaVA with a CLIP tower of the same size and the same LM.

Both models get the same batches (random pixels; random text after the image placeholders) and the same optimizer
(AdamW over the trainable parameters); steps of the two alternate so that load from other processes hits both alike.
Warm-up steps are excluded; the median step time of the timed ones gives samples/s. Modes:

    full         everything trains
    align        only the adapter trains (tower and LM frozen; gradients still flow through the LM to the adapter).
                 Ours runs the frozen tower without autograd and only up to the feature layer; LLaVA runs its whole
                 tower (`output_hidden_states`) with the same parameters frozen.
    align-cache  align, ours fed from a `vlm_vision.vlm.feature_cache` built once before timing (its build time is
                 printed; it pays when the dataset is seen more than once); LLaVA as in align
    packed       LLaVA's finetune stage (tower frozen; adapter and LM trained) on a mix of lengths (text lengths
                 log-normal around `--text-length`, spread `--length-sigma`, up to `--max-length` with the image):
                 supervised tokens/s of ours on padded batches, ours on the same samples packed
                 (`vlm_vision.data.packing`) into rows of `--max-length` (sdpa's block-diagonal mask) and into one
                 row without padding (`sdpa_varlen`: sdpa per conversation, what a packing recipe uses), and LLaVA
                 padded; the padding each layout computes is printed. Packing saves LM work only: the tower's share
                 of a step bounds the gain, and in LLaVA-1.5 (a 7B LM, a 0.3B tower) that share is small.

Sizes are flags. The defaults (a ViT-S-width, 6-layer tower at 64 px with patch 8, a 4-layer 256-wide Llama) finish
in about a minute on 2 CPU cores. A ViT-B/16 at 224 px with a 1024-wide, 8-layer LM, on a GPU:

    python scripts/benchmark_vlm.py --device cuda --dtype bfloat16 --batch-size 32 --image-size 224 --patch-size 16 \
        --vision-hidden 768 --vision-layers 12 --vision-heads 12 --vision-mlp 3072 \
        --text-hidden 1024 --text-layers 8 --text-heads 16 --text-mlp 4096 --vocab-size 32000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlm_vision import VisionLanguageConfig, VisionLanguageForConditionalGeneration, VisionTransformerConfig
from vlm_vision.data.packing import pack_encoded
from vlm_vision.vlm.feature_cache import build_feature_cache
from vlm_vision.vlm.packed_attention import SDPA_VARLEN

MODES = ("full", "align", "align-cache", "packed")


def build_models(args) -> tuple[VisionLanguageForConditionalGeneration, LlavaForConditionalGeneration, int]:
    """Our VLM and LLaVA+CLIP with the same tower shape (CLIP's pre-LN, quick GELU, bias-free patch projection),
    the same Llama and the same LLaVA-1.5 MLP projector; the `<image>` id is the last token of the vocabulary."""
    tower = {
        "hidden_size": args.vision_hidden,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": args.vision_heads,
        "intermediate_size": args.vision_mlp,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    text = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.text_hidden,
        intermediate_size=args.text_mlp,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    image_token_id = args.vocab_size - 1
    ours_config = VisionLanguageConfig(
        vision_config=VisionTransformerConfig(**tower, pre_norm=True, final_norm="pooled", patch_embedding_bias=False),
        text_config=text.to_dict(),
        adapter_config={"adapter_type": "mlp"},
        image_token_id=image_token_id,
        vision_feature_layer=-2,
    )
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tower).to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drops [CLS], as ours does
        projector_hidden_act="gelu",
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = VisionLanguageForConditionalGeneration(ours_config).to(args.device, dtype)
    llava = LlavaForConditionalGeneration(llava_config).to(args.device, dtype)
    return ours, llava, image_token_id


def make_batches(args, image_token_id: int, tokens_per_image: int, count: int) -> list[dict]:
    """`count` batches of one image per sample: the image's placeholders, then `text_length` random tokens."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(count):
        size = (args.batch_size, args.text_length)
        text = torch.randint(0, image_token_id, size, generator=generator)
        images = torch.full((args.batch_size, tokens_per_image), image_token_id)
        input_ids = torch.cat([images, text], dim=1)
        labels = torch.cat([torch.full_like(images, -100), text], dim=1)
        pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        keys = [(index, i) for i in range(args.batch_size)]
        batches.append({"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "keys": keys})
    return batches


def set_mode(ours, llava, mode: str) -> None:
    """Trainability and train/eval modes of both models for a benchmark mode (`finetune`: LLaVA's second stage,
    the tower frozen, the adapter and LM trained; what the packed mode runs)."""
    for model in (ours, llava):
        model.train().requires_grad_(True)
    if mode == "full":
        ours.freeze_unused_vision_parameters()  # the blocks after the feature layer never get a gradient
        return
    frozen = [ours.vision_tower, llava.model.vision_tower]
    if mode != "finetune":
        frozen += [ours.language_model, llava.model.language_model, llava.lm_head]
    for part in frozen:
        part.requires_grad_(False)
    ours.vision_tower.eval()  # what an align or finetune stage does; LLaVA's tower has no dropout either way
    llava.model.vision_tower.eval()


def step(model, optimizer, inputs: dict, device: str) -> float:
    """One training step (forward, backward, AdamW); its wall time in seconds."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_mode(args, ours, llava, batches: list[dict], mode: str) -> tuple[float, float, str]:
    set_mode(ours, llava, mode)
    note = ""
    cache = None
    if mode == "align-cache":
        start = time.perf_counter()
        cache = build_feature_cache(ours, ((b["keys"], b["pixel_values"]) for b in batches))
        seconds = time.perf_counter() - start
        note = f"cache of {len(cache)} images built in {seconds:.2f}s ({len(cache) / seconds:.0f} images/s)"
    dtype = getattr(torch, args.dtype)

    def inputs_for(batch: dict, cached: bool) -> dict:
        inputs = {"input_ids": batch["input_ids"].to(args.device), "labels": batch["labels"].to(args.device)}
        if cached:
            inputs["vision_features"] = cache.lookup(batch["keys"], device=args.device, dtype=dtype)
        else:
            inputs["pixel_values"] = batch["pixel_values"].to(args.device, dtype)
        return inputs

    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) for model in (ours, llava)
    ]
    times = ([], [])
    for index in range(args.warmup + args.steps):
        batch = batches[index % len(batches)]
        order = (0, 1) if index % 2 == 0 else (1, 0)  # alternate who goes first
        for which in order:
            model = (ours, llava)[which]
            seconds = step(
                model, optimizers[which], inputs_for(batch, cached=cache is not None and which == 0), args.device
            )
            if index >= args.warmup:
                times[which].append(seconds)
    ours_rate, llava_rate = (args.batch_size / statistics.median(t) for t in times)
    return ours_rate, llava_rate, note


def make_length_mix_batches(args, image_token_id: int, tokens_per_image: int, count: int) -> list[dict]:
    """`count` batches of one image per sample and log-normal text lengths, each padded (right, with attention
    mask) and packed (position ids, no mask) into rows of `max_length` and into one row: `{"padded": inputs,
    "rows": inputs, "one row": inputs}`."""
    generator = torch.Generator().manual_seed(args.length_seed)
    longest_text = args.max_length - tokens_per_image
    batches = []
    for _ in range(count):
        draws = torch.exp(torch.randn(args.batch_size, generator=generator) * args.length_sigma)
        lengths = (draws * args.text_length).round().long().clamp(4, longest_text).tolist()
        encoded = []
        for length in lengths:
            text = torch.randint(0, image_token_id, (length,), generator=generator).tolist()
            encoded.append(
                {"input_ids": [image_token_id] * tokens_per_image + text, "labels": [-100] * tokens_per_image + text}
            )
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = (
                torch.tensor(e["input_ids"]),
                torch.tensor(e["labels"]),
                1,
            )
        pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        images = [[i] for i in range(len(encoded))]
        batches.append(
            {
                "padded": {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask},
                "rows": pack_encoded(encoded, args.max_length, 0, images),
                "one row": pack_encoded(encoded, args.max_length, 0, images, flatten=True),
                "pixel_values": pixel_values,
                "real_tokens": sum(lengths) + tokens_per_image * len(lengths),
            }
        )
    return batches


def run_packed(args, ours, llava, batches: list[dict]) -> list[tuple[str, str, int, float]]:
    """(layout, model, positions computed, supervised tokens/s) of ours padded, ours packed in rows (sdpa, its
    block-diagonal mask) and in one row (sdpa_varlen), and LLaVA padded (finetune steps, interleaved). A rate
    is the batches' supervised tokens over the sum of each batch's median step time (a step slowed by load from
    elsewhere doesn't count)."""
    set_mode(ours, llava, "finetune")
    dtype = getattr(torch, args.dtype)
    variants = {("padded", "ours"): "sdpa", ("rows", "ours"): "sdpa", ("one row", "ours"): SDPA_VARLEN}
    variants[("padded", "llava")] = None
    optimizers = {
        model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) for model in (ours, llava)
    }
    times = {(variant, number): [] for variant in variants for number in range(len(batches))}
    for index in range(args.warmup + args.steps):
        number = index % len(batches)
        order = list(variants) if index % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for variant in order:
            layout, name = variant
            model = ours if name == "ours" else llava
            if variants[variant] is not None:
                model.language_model.set_attn_implementation(variants[variant])
            inputs = {k: v.to(args.device) for k, v in batches[number][layout].items()}
            inputs["pixel_values"] = batches[number]["pixel_values"].to(args.device, dtype)
            seconds = step(model, optimizers[model], inputs, args.device)
            if index >= args.warmup:
                times[(variant, number)].append(seconds)
    rates = []
    for layout, model in variants:
        timed = [n for n in range(len(batches)) if times[((layout, model), n)]]
        supervised = sum(int((batches[n][layout]["labels"][:, 1:] != -100).sum()) for n in timed)
        seconds = sum(statistics.median(times[((layout, model), n)]) for n in timed)
        positions = sum(batches[n][layout]["input_ids"].numel() for n in range(len(batches)))
        rates.append((layout, model, positions, supervised / seconds))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches cycled through (the dataset)")
    parser.add_argument(
        "--text-length", type=int, default=32, help="text tokens per sample after the image (packed: the median)"
    )
    parser.add_argument("--length-sigma", type=float, default=0.8, help="packed: spread of the log-normal text lengths")
    parser.add_argument("--length-seed", type=int, default=2, help="packed: seed of the length (and token) draw")
    parser.add_argument("--max-length", type=int, default=256, help="packed: longest sample and the packed row length")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=384)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--vision-heads", type=int, default=6)
    parser.add_argument("--vision-mlp", type=int, default=1536)
    parser.add_argument("--text-hidden", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--text-mlp", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=4000)
    args = parser.parse_args(argv)

    ours, llava, image_token_id = build_models(args)
    tokens_per_image = ours.num_image_tokens
    batches = make_batches(args, image_token_id, tokens_per_image, args.num_batches)
    print(
        f"device {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads); batch {args.batch_size}, "
        f"{tokens_per_image} image + {args.text_length} text tokens per sample; parameters: ours "
        f"{ours.num_parameters():,}, llava {llava.num_parameters():,}"
    )
    if tokens_per_image + 4 > args.max_length:
        parser.error(f"--max-length {args.max_length} leaves no room for text after {tokens_per_image} image tokens.")
    rows, notes, packed = [], [], None
    for mode in args.modes:
        if mode == "packed":
            mixed = make_length_mix_batches(args, image_token_id, tokens_per_image, args.num_batches)
            packed = run_packed(args, ours, llava, mixed)
            continue
        ours_rate, llava_rate, note = run_mode(args, ours, llava, batches, mode)
        rows.append((mode, ours_rate, llava_rate))
        if note:
            notes.append(f"{mode}: {note}")
    if rows:
        print(f"\n| {'mode':<12} | ours samples/s | llava samples/s | ratio |")
        print(f"|{'-' * 14}|{'-' * 16}|{'-' * 17}|{'-' * 7}|")
        for mode, ours_rate, llava_rate in rows:
            print(f"| {mode:<12} | {ours_rate:14.1f} | {llava_rate:15.1f} | {ours_rate / llava_rate:4.2f}x |")
    if packed is not None:
        real = sum(b["real_tokens"] for b in mixed)
        print(
            f"\npacked mode: {len(mixed)} batches of {args.batch_size} samples, {real:,} tokens (image tokens included)"
        )
        print("| layout  | model | positions computed | padding | supervised tokens/s |")
        print("|---------|-------|--------------------|---------|---------------------|")
        for layout, model, positions, rate in packed:
            print(f"| {layout:<7} | {model:<5} | {positions:18,} | {1 - real / positions:7.0%} | {rate:19.1f} |")
        rates = {(layout, model): rate for layout, model, _, rate in packed}
        for layout in ("rows", "one row"):
            ratio = rates[(layout, "ours")] / rates[("padded", "ours")]
            print(f"ours packed ({layout}) / ours padded: {ratio:.2f}x supervised tokens/s")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
