"""The default recipe (or any recipe) from scratch for several seeds: each seed's accuracy, the minimum and the mean.

    vlm-vision benchmark seeds                                  # seeds 0, 1, 2 of easy_vqa, one after the other
    vlm-vision benchmark seeds --seeds 0 1 2 3 --threads 1 --parallel 2
    vlm-vision benchmark seeds --recipe my_recipe.json --set stages.negation.max_steps=1000

Each seed is a fresh `vlm-vision train --seed S` process writing `<output-dir>/seed_S` (with `--resume`, a seed whose
run finished is read, not run again), with `--threads` intra-op threads (OMP_NUM_THREADS). It prints a table of the
test accuracies by question type and the training time per seed, then the minimum and mean, the machine (CPU model,
cores, torch) and the settings, and writes the same to `<output-dir>/seeds.json`. Runs at the same time share the
machine's cores: their times are only comparable with `--parallel 1`.

A benchmark script, not a test: the accuracies depend on the draw and the machine's kernels, the times on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlm_vision import recipes
from vlm_vision.training.vlm import save_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="easy_vqa", help="a recipe file or a shipped recipe's name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per run (default: torch's)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--output-dir", default="outputs/seeds")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="read finished seeds, continue unfinished ones")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop each stage early (tests)")
    args = parser.parse_args(argv)
    for name in ("threads", "parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be at least 1.")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: each seed once.")
    try:
        args.recipe = str(recipes.resolve(args.recipe, "vlm"))
    except ValueError as error:
        parser.error(str(error))
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# environment variables that pick other kernels than the machine's best (another machine's, in effect)
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def code_version() -> str:
    """The git commit of the package's checkout (with "+changes" when its files differ), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except OSError:
        commit = None
    if commit is None or commit.returncode != 0:
        from importlib.metadata import version

        return f"vlm-vision {version('vlm-vision')}"
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """One seed's run in a fresh process; its results.json (the run's log and console output are in its folder)."""
    out = Path(args.output_dir) / f"seed_{seed}"
    results_file = out / "results.json"
    if args.resume and results_file.is_file():
        return json.loads(results_file.read_text())
    command = [sys.executable, "-m", "vlm_vision.cli", "train", "--recipe", args.recipe, "--seed", str(seed)]
    command += ["--output-dir", str(out), "--no-progress-bar"]
    if args.resume:
        command.append("--resume")
    if args.overrides:
        command += ["--set", *args.overrides]
    if args.stop_after_steps is not None:
        command += ["--stop-after-steps", str(args.stop_after_steps)]
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "console.txt", "w") as console:
        done = subprocess.run(command, env=env, stdout=console, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not results_file.is_file():
        raise SystemExit(f"seed {seed}: the run failed (exit {done.returncode}); see {out / 'console.txt'}.")
    results = json.loads(results_file.read_text())
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    return results


def row(seed: int, results: dict) -> dict:
    evaluation = results.get("evaluation") or {}
    return {
        "seed": seed,
        "accuracy": evaluation.get("accuracy", {}),
        "num_questions": evaluation.get("num_samples"),
        "train_seconds": round(sum(stage.get("train_seconds", 0.0) for stage in results["stages"]), 1),
        "total_seconds": results.get("total_seconds"),
        "wall_seconds": results.get("wall_seconds"),
    }


def summarize(rows: list[dict]) -> dict:
    names = [name for name in rows[0]["accuracy"] if all(name in r["accuracy"] for r in rows)]
    return {
        name: {
            "min": min(r["accuracy"][name] for r in rows),
            "mean": statistics.fmean(r["accuracy"][name] for r in rows),
        }
        for name in names
    }


def print_table(rows: list[dict], summary: dict, settings: dict) -> None:
    names = list(summary)
    print("| seed | " + " | ".join(names) + " | training s | run s |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        accuracies = " | ".join(f"{100 * r['accuracy'][name]:.2f}%" for name in names)
        print(f"| {r['seed']} | {accuracies} | {r['train_seconds']:.0f} | {r['total_seconds'] or 0:.0f} |")
    for stat in ("min", "mean"):
        accuracies = " | ".join(f"{100 * summary[name][stat]:.2f}%" for name in names)
        print(f"| {stat} | {accuracies} | | |")
    print(
        f"machine: {settings['cpu']}, {settings['cores']} cores, torch {settings['torch']}; threads per run: "
        f"{settings['threads']}, runs at a time: {settings['parallel']}; recipe {settings['recipe']}"
        + (f" with {' '.join(settings['overrides'])}" if settings["overrides"] else "")
        + f"; code {settings['code']}"
        + "".join(f"; {name}={value}" for name, value in settings["kernels"].items())
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda seed: run_seed(args, seed), args.seeds))
    rows = [row(seed, r) for seed, r in zip(args.seeds, results, strict=True)]
    if not all(r["accuracy"] for r in rows):
        raise SystemExit("A run wrote no evaluation (a recipe without one?): nothing to compare across seeds.")
    settings = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "parallel": args.parallel,
        "recipe": args.recipe,
        "overrides": args.overrides,
        "stop_after_steps": args.stop_after_steps,
        "kernels": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
        "code": code_version(),
    }
    summary = summarize(rows)
    print_table(rows, summary, settings)
    report = {"seeds": rows, "summary": summary, "settings": settings}
    save_json(Path(args.output_dir) / "seeds.json", report)
    return report


if __name__ == "__main__":
    main()
