"""Encoder speed and memory: ours against transformers' ViTModel (and timm's VisionTransformer when importable).

All models have the same size (a preset, or the flags), the same attention (sdpa) and run in one process,
interleaved step by step (the order alternates) so that load from other processes hits them alike. For each one:

    forward           samples/s of inference (`torch.inference_mode`, eval mode), median over the timed steps
    forward+backward  samples/s of a forward and a backward pass (train mode; loss = mean of the last hidden state)
    peak memory       CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the step; CPU: the
                      growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs, freed memory
                      returned with malloc_trim first) over one step: allocator caches make it approximate

Ratios are ours / the other model's (above 1.00x: ours is faster; for memory, below 1.00x: ours takes less). Ours
gets transformers' weights (the names coincide), and the largest difference of their last hidden states is printed,
so the two are the same function. timm is not a dependency; it is measured only where it imports.

    python scripts/benchmark_encoder.py                                     # ViT-S/16 at 224, batch 8, CPU
    python scripts/benchmark_encoder.py --preset vit-b16 --device cuda --dtype bfloat16 --batch-size 256

A benchmark script, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

from vlm_vision import VisionTransformerConfig, VisionTransformerModel

PROC_STATUS = Path("/proc/self/status")


def build_models(args) -> dict[str, torch.nn.Module]:
    """name -> model, all of `args`' size, on `args.device` in `args.dtype`."""
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    config = VisionTransformerConfig.from_preset(
        args.preset, image_size=args.image_size, layer_norm_eps=1e-12, attn_implementation="sdpa", **overrides
    )
    sizes = {name: getattr(config, name) for name in (*names, "image_size")}
    torch.manual_seed(0)
    reference = ViTModel._from_config(
        ViTConfig(**sizes, layer_norm_eps=1e-12), add_pooling_layer=False, attn_implementation="sdpa"
    )
    ours = VisionTransformerModel(config)
    ours.load_state_dict(reference.state_dict(), strict=True)  # the v5 names coincide
    models = {"ours": ours, "transformers": reference}
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # not a dependency
        pass
    else:
        models["timm"] = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.hidden_size,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_ratio=config.intermediate_size / config.hidden_size,
            num_classes=0,
        )
    dtype = getattr(torch, args.dtype)
    for model in models.values():
        model.to(args.device, dtype)
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers' models, ours included
                model.activation_checkpointing_enable()
            else:  # timm
                model.set_grad_checkpointing(True)
    return models


def last_hidden_state(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_features") and not isinstance(model, VisionTransformerModel):
        return model.forward_features(pixel_values)  # timm
    return model(pixel_values=pixel_values).last_hidden_state


def run(model: torch.nn.Module, pixel_values: torch.Tensor, backward: bool) -> None:
    if backward:
        model.train()
        model.zero_grad(set_to_none=True)
        last_hidden_state(model, pixel_values).float().mean().backward()
    else:
        model.eval()
        with torch.inference_mode():
            last_hidden_state(model, pixel_values)


def timed(model, pixel_values, backward: bool, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run(model, pixel_values, backward)
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(model, pixel_values, backward: bool, device: str) -> float:
    """The memory one step takes above what is held before it (see the module docstring)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(model, pixel_values, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mb("VmRSS")
    run(model, pixel_values, backward)
    return _status_mb("VmHWM") - before


def _release_freed_memory() -> None:
    # not glibc: freed memory may stay in the process, the growth then reads low
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_mb(key: str) -> float:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{PROC_STATUS} has no {key} line: CPU peak memory needs Linux's /proc.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-s16", help="the size: vit-ti16, vit-s16, vit-b16, ... (see --hidden)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--hidden", dest="hidden_size", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--layers", dest="num_hidden_layers", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--heads", dest="num_attention_heads", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--mlp", dest="intermediate_size", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and pass (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every model's forward+backward")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        parser.error("--batch-size and --steps must be positive and --warmup not negative.")

    models = build_models(args)
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    pixel_values = pixel_values.to(args.device, getattr(torch, args.dtype))
    with torch.inference_mode():
        ours, reference = (last_hidden_state(models[n].eval(), pixel_values) for n in ("ours", "transformers"))
        difference = (ours.float() - reference.float()).abs().max().item()

    results = {name: {"parameters": sum(p.numel() for p in m.parameters())} for name, m in models.items()}
    for label, backward in (("forward", False), ("forward+backward", True)):
        times = {name: [] for name in models}
        for index in range(args.warmup + args.steps):
            order = list(models) if index % 2 == 0 else list(reversed(models))  # alternate who goes first
            for name in order:
                seconds = timed(models[name], pixel_values, backward, args.device)
                if index >= args.warmup:
                    times[name].append(seconds)
        for name, model in models.items():
            results[name][label] = args.batch_size / statistics.median(times[name])
            results[name][f"{label} MB"] = peak_memory_mb(model, pixel_values, backward, args.device)

    print(
        f"device {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads); {args.preset}-sized "
        f"(hidden {models['ours'].config.hidden_size}, {models['ours'].config.num_hidden_layers} layers) at "
        f"{args.image_size} px, batch {args.batch_size}, {args.steps} timed steps"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; ours vs transformers: max |difference| "
        f"of the last hidden state {difference:.1e}; timm: {'measured' if 'timm' in models else 'not importable'}"
    )
    memory = "peak MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(
        f"\n| model        | parameters | forward samples/s | fwd+bwd samples/s | forward {memory} | fwd+bwd {memory} |"
    )
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 19}|{'-' * 19}|{'-' * (len(memory) + 10)}|{'-' * (len(memory) + 10)}|")
    for name, row in results.items():
        print(
            f"| {name:<12} | {row['parameters']:>10,} | {row['forward']:17.1f} | {row['forward+backward']:17.1f} | "
            f"{row['forward MB']:>{len(memory) + 8}.1f} | {row['forward+backward MB']:>{len(memory) + 8}.1f} |"
        )
    for other in (name for name in results if name != "ours"):
        ratios = {
            key: results["ours"][key] / results[other][key] if results[other][key] > 0 else float("nan")
            for key in ("forward", "forward+backward", "forward MB", "forward+backward MB")
        }
        print(
            f"ours / {other}: forward {ratios['forward']:.2f}x, forward+backward {ratios['forward+backward']:.2f}x "
            f"(speed); memory {ratios['forward MB']:.2f}x forward, {ratios['forward+backward MB']:.2f}x "
            "forward+backward"
        )
    return results


if __name__ == "__main__":
    main()
