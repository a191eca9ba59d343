"""Encoder speed and memory: ours against transformers' ViTModel (and timm's VisionTransformer when importable).

All models have the same size (a preset, or the flags), the same attention (sdpa) and run in one process,
interleaved step by step (the order alternates) so that load from other processes hits them alike. For each one:

    forward           samples/s of inference (`torch.inference_mode`, eval mode), median over the timed steps
    forward+backward  samples/s of a forward and a backward pass (train mode; loss = mean of the last hidden state);
                      with `--optimizer adamw` a whole training step: forward, backward and `torch.optim.AdamW`'s step
                      (each model its own optimizer, foreach; its state is made in the warm-up step)
    MFU               model FLOPs utilisation: the model's FLOPs per second (counted analytically, see
                      :func:`flops_per_image`; forward+backward = 3x forward) over the throughput of one large
                      `torch.matmul` in the same dtype, measured in the same run (the machine's practical peak)
    peak memory       CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the step; CPU: the
                      growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs, freed memory
                      returned with malloc_trim first) over one step: allocator caches make it approximate. The
                      training step's is measured with and without gradient checkpointing

Ratios are ours / the other model's (above 1.00x: ours is faster; for memory, below 1.00x: ours takes less). Ours
gets transformers' weights (the names coincide), and the largest difference of their last hidden states is printed,
so the two are the same function. timm is not a dependency; it is measured only where it imports.

    python scripts/benchmark_encoder.py                                     # ViT-S/16 at 224, batch 8, CPU
    python scripts/benchmark_encoder.py --preset vit-b16 --device cuda --dtype bfloat16 --batch-size 256
    python scripts/benchmark_encoder.py --profile     # and where the time goes: one forward, op by op, ours vs theirs
    python scripts/benchmark_encoder.py --compile     # and each model under torch.compile ("ours compiled", ...)
    python scripts/benchmark_encoder.py --preset vit-b16 --optimizer adamw      # the training step with AdamW

With `--compile` each model is measured eager and compiled (`torch.compile` of its forward to the last hidden state,
the same weights; compilation happens in the warm-up steps, so give `--warmup 2` or more), and the compiled ones are
compared with each other; their memory is measured without switching checkpointing (that would recompile).

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
        set_checkpointing(model, args.gradient_checkpointing)
    return models


def flops_per_image(config, tokens: int) -> int:
    """Multiply-add FLOPs (2 per multiply-accumulate) of one image's forward through a ViT of `config`'s size with
    `tokens` tokens per image (patches plus prefix tokens): the patch embedding, and per layer the q/k/v and output
    projections, the attention scores (QK^T) and their weighted sum of values (AV), and the MLP. Norms, softmax,
    activations and biases (elementwise, well under 1%) are left out, as in the usual MFU accounting (PaLM, App. B).
    """
    hidden, mlp, patch = config.hidden_size, config.intermediate_size, config.patch_size
    patches = (config.image_size // patch) ** 2
    embedding = 2 * patches * (config.num_channels * patch * patch) * hidden
    projections = 2 * tokens * hidden * 4 * hidden  # q, k, v, o
    attention = 2 * 2 * tokens * tokens * hidden  # QK^T and AV over all heads
    feed_forward = 2 * 2 * tokens * hidden * mlp  # fc1 and fc2
    return embedding + config.num_hidden_layers * (projections + attention + feed_forward)


def matmul_flops_per_second(size: int, dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """The throughput of a `size` x `size` `torch.matmul` in `dtype` on `device` (median of `repeats`)."""
    generator = torch.Generator().manual_seed(2)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' models, ours included
        model.activation_checkpointing_enable() if enabled else model.activation_checkpointing_disable()
    else:  # timm
        model.set_grad_checkpointing(enabled)


def profile_forward(models: dict, pixel_values: torch.Tensor, device: str, rows: int) -> dict[str, dict]:
    """One forward of ours and of transformers' ViTModel under `torch.profiler`, printed side by side: the ops with
    the most self time (CPU, or CUDA on a GPU), milliseconds and calls. Returns name -> {op: self ms}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = {}
    for name in ("ours", "transformers"):
        run(models[name], pixel_values, backward=False)  # warm
        with profile(activities=activities) as profiler:
            run(models[name], pixel_values, backward=False)
            synchronize(device)
        tables[name] = {event.key: (getattr(event, attribute) / 1000, event.count) for event in profiler.key_averages()}
    totals = {name: sum(ms for ms, _ in table.values()) for name, table in tables.items()}
    ops = sorted(set(tables["ours"]) | set(tables["transformers"]),
                 key=lambda op: -max(tables[n].get(op, (0, 0))[0] for n in tables))[:rows]  # fmt: skip
    kind = "CUDA" if cuda else "CPU"
    print(f"\none forward, op by op (self {kind} time; `torch.profiler` key_averages, top {rows}):")
    print("| op | ours ms | calls | transformers ms | calls | ours - transformers ms |")
    print("|---|---|---|---|---|---|")
    for op in ops:
        (a, na), (b, nb) = tables["ours"].get(op, (0.0, 0)), tables["transformers"].get(op, (0.0, 0))
        print(f"| {op} | {a:.3f} | {na} | {b:.3f} | {nb} | {a - b:+.3f} |")
    print(f"| total (every op) | {totals['ours']:.3f} | | {totals['transformers']:.3f} | | "
          f"{totals['ours'] - totals['transformers']:+.3f} |")  # fmt: skip
    return {name: {op: ms for op, (ms, _) in table.items()} for name, table in tables.items()}


class LastHiddenState(torch.nn.Module):
    """A model's last hidden state as its forward, what `--compile` compiles."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return last_hidden_state(self.model, pixel_values)


def compiled(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """`"<name> compiled"` -> `torch.compile` of each model's `LastHiddenState` (sharing its weights)."""
    return {f"{name} compiled": torch.compile(LastHiddenState(model)) for name, model in models.items()}


def is_compiled(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), LastHiddenState)


def last_hidden_state(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    if is_compiled(model):
        return model(pixel_values)
    if hasattr(model, "forward_features") and not isinstance(model, VisionTransformerModel):
        return model.forward_features(pixel_values)  # timm
    return model(pixel_values=pixel_values).last_hidden_state


def run(model: torch.nn.Module, pixel_values: torch.Tensor, backward: bool, optimizer=None) -> None:
    """One pass; with `backward` and an `optimizer`, a training step (its `step` after the backward)."""
    if backward:
        model.train()
        model.zero_grad(set_to_none=True)
        last_hidden_state(model, pixel_values).float().mean().backward()
        if optimizer is not None:
            optimizer.step()
    else:
        model.eval()
        with torch.inference_mode():
            last_hidden_state(model, pixel_values)


def timed(model, pixel_values, backward: bool, device: str, optimizer=None) -> float:
    synchronize(device)
    start = time.perf_counter()
    run(model, pixel_values, backward, optimizer)
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(model, pixel_values, backward: bool, device: str, optimizer=None) -> float:
    """The memory one step takes above what is held before it (see the module docstring)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(model, pixel_values, backward, optimizer)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mb("VmRSS")
    run(model, pixel_values, backward, optimizer)
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
    parser.add_argument("--gradient-checkpointing", action="store_true", help="time every model's fwd+bwd with it")
    parser.add_argument("--matmul-size", type=int, default=None, help="the peak's matmul (default 2048; 8192 on GPU)")
    parser.add_argument("--profile", action="store_true", help="print one forward op by op, ours vs transformers")
    parser.add_argument("--profile-rows", type=int, default=15, help="ops in the --profile table")
    parser.add_argument("--compile", action="store_true", help="measure each model under torch.compile too")
    parser.add_argument(
        "--optimizer", choices=("none", "adamw"), default="none", help="adamw: time forward+backward+AdamW step"
    )
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        parser.error("--batch-size and --steps must be positive and --warmup not negative.")

    models = build_models(args)
    if args.compile:
        models.update(compiled(models))
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    pixel_values = pixel_values.to(args.device, getattr(torch, args.dtype))
    with torch.inference_mode():
        ours, reference = (last_hidden_state(models[n].eval(), pixel_values) for n in ("ours", "transformers"))
        difference = (ours.float() - reference.float()).abs().max().item()
        if args.compile:
            compiled_ours = last_hidden_state(models["ours compiled"].eval(), pixel_values)
            compile_difference = (compiled_ours.float() - ours.float()).abs().max().item()

    optimizers = {}  # made after the comparison above: their steps change the weights
    if args.optimizer == "adamw":
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True) for name, m in models.items()}
    dtype = getattr(torch, args.dtype)
    matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    peak = matmul_flops_per_second(matmul_size, dtype, args.device)
    tokens = ours.shape[1]  # patches + prefix tokens (the same for every model here)
    flops = flops_per_image(models["ours"].config, tokens)
    results = {
        name: {"parameters": sum(p.numel() for p in m.parameters()), "flops per image": flops, "peak FLOP/s": peak}
        for name, m in models.items()
    }
    for label, backward in (("forward", False), ("forward+backward", True)):
        times = {name: [] for name in models}
        for index in range(args.warmup + args.steps):
            order = list(models) if index % 2 == 0 else list(reversed(models))  # alternate who goes first
            for name in order:
                seconds = timed(models[name], pixel_values, backward, args.device, optimizers.get(name))
                if index >= args.warmup:
                    times[name].append(seconds)
        for name, model in models.items():
            results[name][label] = args.batch_size / statistics.median(times[name])
            results[name][f"{label} MFU"] = results[name][label] * flops * (3 if backward else 1) / peak
            optimizer = optimizers.get(name)  # run() steps it only with backward
            results[name][f"{label} MB"] = peak_memory_mb(model, pixel_values, backward, args.device, optimizer)
    for name, model in models.items():  # the training step's memory the other way round
        if is_compiled(model):  # switching would recompile: not measured
            results[name]["fwd+bwd MB checkpointed"] = results[name]["fwd+bwd MB not checkpointed"] = float("nan")
            continue
        set_checkpointing(model, not args.gradient_checkpointing)
        other = peak_memory_mb(model, pixel_values, True, args.device, optimizers.get(name))
        set_checkpointing(model, args.gradient_checkpointing)
        results[name]["fwd+bwd MB checkpointed"] = (
            results[name]["forward+backward MB"] if args.gradient_checkpointing else other
        )
        results[name]["fwd+bwd MB not checkpointed"] = (
            other if args.gradient_checkpointing else results[name]["forward+backward MB"]
        )
    for name, optimizer in optimizers.items():  # how many steps each optimizer took (a check that it ran)
        results[name]["AdamW steps"] = min(int(state["step"]) for state in optimizer.state.values())

    print(
        f"device {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads); {args.preset}-sized "
        f"(hidden {models['ours'].config.hidden_size}, {models['ours'].config.num_hidden_layers} layers) at "
        f"{args.image_size} px, batch {args.batch_size}, {args.steps} timed steps"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
        f"{', forward+backward includes an AdamW step' if optimizers else ''}; ours vs transformers: max |difference| "
        f"of the last hidden state {difference:.1e}; timm: {'measured' if 'timm' in models else 'not importable'}"
    )
    if args.compile:
        print(
            f"torch.compile: ours compiled vs eager, max |difference| of the last hidden state {compile_difference:.1e}"
        )
    print(
        f"peak: a {matmul_size}x{matmul_size} {args.dtype} matmul runs at {peak / 1e9:.1f} GFLOP/s; the model: "
        f"{flops / 1e9:.3f} GFLOP per image forward ({tokens} tokens), 3x that forward+backward"
    )
    memory = "peak MB" if args.device.startswith("cuda") else "peak RSS MB"
    width = max(12, *(len(name) for name in results))
    print(
        f"\n| {'model':<{width}} | parameters | forward samples/s | fwd+bwd samples/s | forward {memory} | "
        f"fwd+bwd {memory} |"
    )
    print(
        f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 19}|{'-' * 19}|{'-' * (len(memory) + 10)}|{'-' * (len(memory) + 10)}|"
    )
    for name, row in results.items():
        print(
            f"| {name:<{width}} | {row['parameters']:>10,} | {row['forward']:17.1f} | "
            f"{row['forward+backward']:17.1f} | {row['forward MB']:>{len(memory) + 8}.1f} | "
            f"{row['forward+backward MB']:>{len(memory) + 8}.1f} |"
        )
    print(f"\n| {'model':<{width}} | forward MFU | fwd+bwd MFU | fwd+bwd {memory} checkpointed | not checkpointed |")
    print(f"|{'-' * (width + 2)}|{'-' * 13}|{'-' * 13}|{'-' * (len(memory) + 23)}|{'-' * 18}|")
    for name, row in results.items():
        print(
            f"| {name:<{width}} | {row['forward MFU']:11.1%} | {row['forward+backward MFU']:11.1%} | "
            f"{row['fwd+bwd MB checkpointed']:>{len(memory) + 21}.1f} | {row['fwd+bwd MB not checkpointed']:16.1f} |"
        )
    pairs = [("ours", name) for name in results if name != "ours" and not is_compiled(models[name])]
    pairs += [("ours compiled", name) for name in results if name != "ours compiled" and is_compiled(models[name])]
    pairs += [("ours compiled", "ours")] if args.compile else []
    for mine, other in pairs:
        ratios = {
            key: results[mine][key] / results[other][key] if results[other][key] > 0 else float("nan")
            for key in ("forward", "forward+backward", "forward MB", "forward+backward MB")
        }
        print(
            f"{mine} / {other}: forward {ratios['forward']:.2f}x, forward+backward {ratios['forward+backward']:.2f}x "
            f"(speed); memory {ratios['forward MB']:.2f}x forward, {ratios['forward+backward MB']:.2f}x "
            "forward+backward"
        )
    if args.profile:
        profile_forward(models, pixel_values, args.device, args.profile_rows)
    return results


if __name__ == "__main__":
    main()
