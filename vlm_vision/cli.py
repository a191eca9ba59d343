"""`vlm-vision`: one console script over the library's entry points.

    vlm-vision train                                   # the built-in default recipe (shipped with the package)
    vlm-vision train --recipe llava_1_5 --vision ./clip-vit-large-patch14-336 --lm ./Qwen2.5-0.5B-Instruct --set ...
    vlm-vision evaluate outputs/easy_vqa/vlm
    vlm-vision ask outputs/easy_vqa/vlm photo.png "what shape is in the image?"
    vlm-vision SUBCOMMAND --help                       # that subcommand's own flags

Each subcommand is the `main(argv)` of a module (`vlm_vision.commands` is the repository's `scripts/` folder), so
`vlm-vision train ...` and `python scripts/train_vlm.py ...` are the same program.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module with main(argv), one line for --help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vlm_vision.commands.train_vlm", "train (and evaluate) a vision-language model from a recipe"),
    "train-classifier": ("vlm_vision.commands.train_classifier", "the paper's classifier recipe: pre-train, fine-tune"),
    "evaluate": ("vlm_vision.commands.evaluate_vlm", "evaluate a saved VLM (easy-VQA, LLaVA JSON, VQAv2)"),
    "ask": ("vlm_vision.cli", "answer one question about one image with a saved VLM"),
    "convert": (
        "vlm_vision.conversion.cli",
        "convert a CLIP/SigLIP/DINOv2/ViT/timm/JAX checkpoint into an encoder folder",
    ),
    "create": ("vlm_vision.export.encoder_folder", "write an encoder checkpoint folder for a preset"),
    "analyze": ("vlm_vision.commands.analyze", "Figure 7 of the paper and attention rollout for an encoder"),
    "push": ("vlm_vision.commands.push_to_hub", "push a saved folder to the Hugging Face Hub"),
    "demo": ("vlm_vision.demo", "write ./vit-b16 and encode a photo through it"),
    "benchmark": (
        "vlm_vision.cli",
        "benchmarks: encoder (ours vs transformers' ViT, timm), vlm (ours vs Llava, packed vs padded), data-memory, "
        "seeds, resolution (squash vs native vs tiles)",
    ),
}
BENCHMARKS: dict[str, str] = {
    "encoder": "vlm_vision.commands.benchmark_encoder",
    "vlm": "vlm_vision.commands.benchmark_vlm",
    "data-memory": "vlm_vision.commands.benchmark_data_memory",  # needs a checkout (tests/real_path.py)
    "seeds": "vlm_vision.commands.benchmark_seeds",
    "resolution": "vlm_vision.commands.benchmark_resolution",
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "subcommands:\n" + "\n".join(lines) + "\n\n'vlm-vision SUBCOMMAND --help' shows its flags."


def _run(module_name: str, prog: str, argv: list[str]):
    module = importlib.import_module(module_name)
    saved, sys.argv = sys.argv, [prog, *argv]  # argparse takes its prog from argv[0]
    try:
        return module.main(argv)
    finally:
        sys.argv = saved


def require_vlm_folder(parser: argparse.ArgumentParser, path: str) -> Path:
    """`path` as a folder with a config.json, or the parser's error naming it (transformers would take a missing
    local path for a Hub repository id)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        parser.error(f"{folder} is not a saved model folder (no config.json): give the `vlm/` folder of a run.")
    return folder


def ask(argv: list[str] | None = None) -> str:
    """`vlm-vision ask MODEL IMAGE QUESTION`: the greedy answer of a saved VLM, printed and returned."""
    parser = argparse.ArgumentParser(prog="vlm-vision ask", description=ask.__doc__.split(":", 1)[1].strip())
    parser.add_argument("model", help="a saved VLM folder (e.g. outputs/easy_vqa/vlm)")
    parser.add_argument("image", help="an image file")
    parser.add_argument("question", help="the question, in quotes")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    folder, image = require_vlm_folder(parser, args.model), Path(args.image)
    if not image.is_file():
        parser.error(f"{image} is not a file: give the path of an image.")
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}.")

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_vision.data.conversations import VLMSample
    from vlm_vision.evaluation.generation import generate_answers

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    sample = VLMSample(
        images=[str(image)], messages=[{"role": "user", "content": f"<image>\n{args.question}"}], id=str(image)
    )
    (answer,) = generate_answers(model, processor, [sample], max_new_tokens=args.max_new_tokens, progress_bar=False)
    if answer is None:
        raise SystemExit(f"{image} could not be read as an image (see the warning above).")
    print(answer)
    return answer


def benchmark(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        listed = ", ".join(BENCHMARKS)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"vlm-vision benchmark: unknown benchmark {argv[0]!r}; choose one of {listed}.")
        print(f"usage: vlm-vision benchmark {{{listed}}} [flags]   ('vlm-vision benchmark NAME --help' for its flags)")
        return None
    return _run(BENCHMARKS[argv[0]], f"vlm-vision benchmark {argv[0]}", argv[1:])


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0].strip() + "\n\n" + _usage())
        return None
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise SystemExit(f"vlm-vision: unknown subcommand {name!r}.\n{_usage()}")
    if name == "ask":
        return ask(rest)
    if name == "benchmark":
        return benchmark(rest)
    return _run(SUBCOMMANDS[name][0], f"vlm-vision {name}", rest)


if __name__ == "__main__":
    main()


def console() -> int:
    """The `vlm-vision` script: `main`, exiting 0 on success (the values `main` returns, such as `ask`'s answer or a
    benchmark's report, are for Python callers; a console script would take them for an exit status)."""
    main()
    return 0
