"""Peak memory of LLaVA-format data at scale: building the data and 20 training steps, for 1k, 10k and 100k samples.

    python scripts/benchmark_data_memory.py                      # 1k, 10k, 100k samples; about 3 minutes on 2 CPU cores
    python scripts/benchmark_data_memory.py --sizes 1000 300000 --workers 2

Each size runs in a fresh process: the LLaVA-1.5 recipe's `finetune` stage (a tiny random CLIP tower saved as a
Hub folder, a tiny Llama with a real tokenizer) on a generated LLaVA-Instruct-style JSON file of N multi-turn
conversations over 1,000 real JPEG files (written once and kept in the cache folder, like the JSON files), for 20
optimizer steps of 8 conversations with DataLoader workers. It prints the file size, the time to index it, the peak
RSS of the training process and of its largest DataLoader worker (forked: its peak counts the pages it shares with the
training process), and, for comparison, the peak RSS of a fresh Python process reading the same file with
`json.load` (what a reader that keeps the file as Python objects holds).

A benchmark script, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from vlm_vision import recipes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/real_path.py builds the Hub-style folders

QUESTIONS = (
    "What is the man on the left holding, and what does it suggest about the setting of the photo?",
    "Describe the colours of the vehicles in the street and how they stand out against the buildings.",
    "How many people are visible near the table, and what are they doing?",
    "What might be the reason for the crowd gathering in front of the building?",
)


def write_data(cache: Path, sizes: list[int], num_images: int = 1000) -> dict[int, Path]:
    """1,000 JPEG files and one LLaVA-Instruct-style JSON per size (multi-turn; 1 in 8 text-only), written once."""
    import numpy as np
    from PIL import Image

    images = cache / "images"
    if not (images / f"{num_images - 1:06d}.jpg").is_file():
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(num_images):
            array = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(array).save(images / f"{i:06d}.jpg", quality=90)
    files = {}
    for size in sizes:
        path = cache / f"llava_instruct_{size}.json"
        if not path.is_file():
            entries = []
            for i in range(size):
                turns = []
                for t in range(1 + i % 3):
                    question = QUESTIONS[(i + t) % len(QUESTIONS)]
                    turns += [
                        {"from": "human", "value": ("<image>\n" if t == 0 and i % 8 else "") + question},
                        {"from": "gpt", "value": f"Answer {i}.{t}: " + "it looks like a busy street scene. " * 3},
                    ]
                entry = {"id": f"{i:09d}", "conversations": turns}
                if i % 8:
                    entry["image"] = f"{i % num_images:06d}.jpg"
                entries.append(entry)
            path.write_text(json.dumps(entries))
        files[size] = path
    return files


def parts(cache: Path) -> tuple[Path, Path]:
    """A tiny CLIP folder (with its image processor) and a tiny Llama LM folder, written once."""
    from tests.real_path import write_clip_folder, write_lm_folder

    clip, lm = cache / "clip", cache / "lm"
    if not (clip / "preprocessor_config.json").is_file():
        write_clip_folder(clip)
    if not (lm / "tokenizer_config.json").is_file():
        write_lm_folder(lm, list(QUESTIONS) * 20 + ["Answer: it looks like a busy street scene."] * 20)
    return clip, lm


def child(data_file: Path, cache: Path, steps: int, workers: int) -> dict:
    """In a fresh process: index the file, build the data set and run `steps` optimizer steps."""
    import torch

    from vlm_vision.data.index import JsonIndex
    from vlm_vision.training.vlm_recipe import VLMRecipe, run_vlm_recipe

    torch.set_num_threads(1)
    clip, lm = parts(cache)
    started = time.perf_counter()
    index = JsonIndex(data_file, cache / "images")
    index_seconds = time.perf_counter() - started
    del index
    recipe = VLMRecipe.from_json(
        recipes.path("vlm/llava_1_5.json"),
        [
            f"stages.finetune.data.train={data_file}",
            f"stages.finetune.data.image_folder={cache / 'images'}",
            f"stages.finetune.max_steps={steps}",
            "stages.finetune.batch_size=8",
            "stages.finetune.per_device_batch_size=8",
            f"data.num_workers={workers}",
            "stages.pretrain.data.train=unused.json",
            "stages.pretrain.data.image_folder=.",
        ],
        vision=clip,
        language_model=lm,
    )
    recipe.stages = recipe.stages[1:]  # the finetune stage alone
    out = cache / "runs" / data_file.stem
    started = time.perf_counter()
    run_vlm_recipe(recipe, str(out), progress_bar=False, evaluate=False)
    return {
        "index_seconds": round(index_seconds, 2),
        "train_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": peak_rss_mb(),
        # workers are forked, not exec'd: their peak includes the pages they share with the training process
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM of its own memory map: unlike getrusage's ru_maxrss, it does not carry the
    peak of the process it was forked from over `exec`)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def json_load_rss(data_file: Path) -> float:
    """Peak RSS (MB) of a fresh process that reads the file with json.load."""
    code = (
        "import json, re, sys; data = json.load(open(sys.argv[1])); "
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code, str(data_file)], capture_output=True, text=True).stdout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--cache", default="outputs/benchmark-data", help="images, JSON files and parts, kept")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache = Path(args.cache).resolve()
    if args.child:
        print(json.dumps(child(Path(args.child), cache, args.steps, args.workers)))
        return
    files = write_data(cache, args.sizes)  # (the tower and LM folders are written by the first run)
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(files[size]), "--cache", str(cache)]
        command += ["--steps", str(args.steps), "--workers", str(args.workers)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"size {size} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"samples": size, "json_mb": files[size].stat().st_size / 2**20, **row})
        rows[-1]["json_load_rss_mb"] = json_load_rss(files[size])
    print(
        f"| samples | JSON file | index build | peak RSS, training process | peak RSS, largest worker | "
        f"{args.steps} steps | json.load of the file |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['samples']:,} | {r['json_mb']:.1f} MB | {r['index_seconds']:.2f} s | {r['peak_rss_mb']:.0f} MB | "
            f"{r['worker_peak_rss_mb']:.0f} MB | {r['train_seconds']:.0f} s | {r['json_load_rss_mb']:.0f} MB |"
        )
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    print(f"training process: {rows[-1]['samples']:,} samples vs {rows[0]['samples']:,}: {growth:+.0f} MB")


if __name__ == "__main__":
    main()
