"""What a real user brings, built offline with transformers' own classes and random weights: Hub-style tower folders
(a whole `CLIPModel` with its `CLIPImageProcessor`, a `SiglipModel`, a SigLIP2 NaFlex `Siglip2Model`, a
`Dinov2Model`), a causal LM folder with a real sentencepiece tokenizer and a chat template, and LLaVA-format data for
both stages over real image files on disk, some of them missing, truncated, grayscale, CMYK, RGBA or palette images,
as in every real crawl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from vlm_vision.vlm.tokenizer import train_sentencepiece_tokenizer

# a ChatML template with a default system prompt, as Qwen2.5 and SmolLM2 have
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
TEXT_TOWER = {
    **TOWER,
    "num_hidden_layers": 1,
    "vocab_size": 99,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "bar", "column")
MODES = ("jpeg", "png", "gray", "cmyk", "rgba", "palette")


def write_clip_folder(folder: Path) -> Path:
    """A raw `CLIPModel` folder (both towers) with `CLIPImageProcessor` (shortest edge 28 + centre crop 28, OpenAI
    mean/std, bicubic): 28 px / patch 7 = a 4x4 grid."""
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config={**TOWER, "image_size": 28, "patch_size": 7}, text_config=TEXT_TOWER, projection_dim=16
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def write_siglip_folder(folder: Path) -> Path:
    """A raw `SiglipModel` folder with `SiglipImageProcessor` (resize to 32x32, mean = std = 0.5): no [CLS]."""
    torch.manual_seed(1)
    config = SiglipConfig(vision_config={**TOWER, "image_size": 32, "patch_size": 8}, text_config=TEXT_TOWER)
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_siglip2_folder(folder: Path, composite: bool = True, max_num_patches: int = 32) -> Path:
    """A raw SigLIP2 NaFlex folder (a whole `Siglip2Model`, or a `Siglip2VisionModel`) with `Siglip2ImageProcessor`
    (patches of 8, at most `max_num_patches` of them, mean = std = 0.5): a 4x4 position table, no [CLS]."""
    torch.manual_seed(4)
    vision = {**TOWER, "num_patches": 16, "patch_size": 8}
    if composite:
        Siglip2Model(Siglip2Config(vision_config=vision, text_config=TEXT_TOWER)).save_pretrained(folder)
    else:
        Siglip2VisionModel(Siglip2VisionConfig(**vision)).save_pretrained(folder)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=max_num_patches).save_pretrained(folder)
    return folder


def write_dinov2_folder(folder: Path) -> Path:
    """A raw `Dinov2Model` folder with its `BitImageProcessor` (shortest edge 32, centre crop 28, ImageNet stats)."""
    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(**TOWER, image_size=28, patch_size=7)).save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def write_lm_folder(folder: Path, corpus: list[str], chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """A tiny Llama causal LM with a real sentencepiece tokenizer (trained on `corpus`) and a chat template."""
    tokenizer = train_sentencepiece_tokenizer(corpus, vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_image(path: Path, color: str, shape: str, mode: str, seed: int) -> None:
    """A real picture of a coloured shape (non-square: 40x24, 24x40 or 32x32), saved in the file format of `mode`."""
    rng = np.random.default_rng(seed)
    height, width = {"square": (32, 32), "bar": (24, 40), "column": (40, 24)}[shape]
    array = rng.integers(200, 255, (height, width, 3), dtype=np.uint8)
    array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = COLORS[color]
    image = Image.fromarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "jpeg":
        image.save(path, format="JPEG", quality=95)
    elif mode == "png":
        image.save(path, format="PNG")
    elif mode == "gray":
        image.convert("L").save(path, format="PNG")
    elif mode == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif mode == "rgba":
        alpha = np.full((height, width, 1), 255, np.uint8)
        alpha[:4] = 0  # a transparent band at the top
        Image.fromarray(np.concatenate([array, alpha], axis=-1), "RGBA").save(path, format="PNG")
    else:
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, format="PNG")


@dataclass
class LlavaData:
    """LLaVA-format data for both stages: the files, their image folder, and which entries are bad."""

    root: Path  # the image folder both files are relative to
    pretrain: Path  # blip_laion_cc_sbu_558k-style captions
    finetune: Path  # llava_v1_5_mix665k-style instruction mix
    good_images: list[Path]
    missing: list[Path]  # named in the files, not on disk
    truncated: list[Path]  # on disk, undecodable


def write_llava_data(folder: Path, num_images: int = 240, seed: int = 0) -> LlavaData:
    """`num_images` real image files of every mode in LLaVA-style sub-folders, 4 truncated and 4 missing; stage 1
    captions over all of them; stage 2 a mix of multi-turn, text-only and two-image conversations."""
    rng = np.random.default_rng(seed)
    root = folder / "images"
    entries = []
    good, missing, truncated = [], [], []
    for i in range(num_images):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        mode = MODES[i % len(MODES)]
        path = root / f"{i // 100:05d}" / f"{i:09d}.{'jpg' if mode in ('jpeg', 'cmyk') else 'png'}"
        if i % 60 == 7:
            missing.append(path)  # never written
        else:
            write_image(path, color, shape, mode, seed=i)
            if i % 60 == 13:
                path.write_bytes(path.read_bytes()[:120])  # the header and a few bytes: exists, won't decode
                truncated.append(path)
            else:
                good.append(path)
        entries.append((path, color, shape))

    pretrain = [
        {
            "id": f"{i:09d}",
            "image": str(path.relative_to(root)),
            "conversations": [
                {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                {"from": "gpt", "value": f"a {color} {shape} on a light background"},
            ],
        }
        for i, (path, color, shape) in enumerate(entries)
    ]
    mix = []
    for i, (path, color, shape) in enumerate(entries[: num_images // 2]):
        image = str(path.relative_to(root))
        if i % 5 == 3:  # text only (ShareGPT-style)
            mix.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"from": "human", "value": f"What is a {color} {shape}?"},
                        {"from": "gpt", "value": f"A {shape} painted {color}."},
                    ],
                }
            )
        elif i % 5 == 4:  # two images
            other = str(entries[(i + 1) % num_images][0].relative_to(root))
            mix.append(
                {
                    "id": f"pair-{i}",
                    "image": [image, other],
                    "conversations": [
                        {"from": "human", "value": "<image>\n<image>\nDo both images show the same colour?"},
                        {"from": "gpt", "value": "yes" if i % 4 == (i + 1) % 4 else "no"},
                    ],
                }
            )
        else:  # multi-turn VQA, the tag where LLaVA's mix puts it (first, or after the question)
            first = "<image>\nWhat colour is the shape?" if i % 2 else "What colour is the shape?\n<image>"
            mix.append(
                {
                    "id": f"vqa-{i}",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": first},
                        {"from": "gpt", "value": color},
                        {"from": "human", "value": "And its form?"},
                        {"from": "gpt", "value": f"It is a {shape}."},
                    ],
                }
            )
    rng.shuffle(mix)
    paths = LlavaData(
        root, folder / "blip_laion_cc_sbu_558k.json", folder / "llava_v1_5_mix665k.json", good, missing, truncated
    )
    paths.pretrain.write_text(json.dumps(pretrain))
    paths.finetune.write_text(json.dumps(list(mix)))
    return paths


def corpus_of(data: LlavaData) -> list[str]:
    """The conversations' text, for the LM's tokenizer."""
    texts = []
    for file in (data.pretrain, data.finetune):
        texts += [turn["value"] for entry in json.loads(file.read_text()) for turn in entry["conversations"]]
    return [*texts, "You are a helpful assistant.", "system user assistant"] * 3


def llava_expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's `expand2square` (llava/mm_utils.py), verbatim but for names: the reference for `pad`."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def build_world(base: Path, num_images: int = 240) -> dict:
    """All of it under `base`: the LLaVA data, the three tower folders and the LM folder."""
    data = write_llava_data(base / "data", num_images=num_images)
    return {
        "data": data,
        "clip": write_clip_folder(base / "clip-vit"),
        "siglip": write_siglip_folder(base / "siglip"),
        "dinov2": write_dinov2_folder(base / "dinov2"),
        "lm": write_lm_folder(base / "lm", corpus_of(data)),
    }


def llava_command(world: dict, tower: str, out: Path, *extra: str, lm: Path | None = None, recipe: Path | None = None):
    """The README's command for the LLaVA recipe (flags after `scripts/train_vlm.py`), with batch sizes and workers
    small enough for a test."""
    data = world["data"]
    recipe = recipe or Path(__file__).resolve().parent.parent / "configs" / "vlm" / "llava_1_5.json"
    return [
        "--recipe", str(recipe), "--vision", str(world[tower]), "--lm", str(lm or world["lm"]),
        "--output-dir", str(out), "--no-progress-bar", "--set",
        f"stages.pretrain.data.train={data.pretrain}", f"stages.pretrain.data.image_folder={data.root}",
        f"stages.finetune.data.train={data.finetune}", f"stages.finetune.data.image_folder={data.root}",
        "stages.pretrain.batch_size=16", "stages.pretrain.per_device_batch_size=8",
        "stages.finetune.batch_size=8", "stages.finetune.per_device_batch_size=4", "data.num_workers=1",
        *extra,
    ]  # fmt: skip


LLAVA_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "llava_1_5.json"


def llava_recipe(world: dict, *overrides: str, vision: str = "clip"):
    """The shipped LLaVA-1.5 recipe on the world's data, its `vision` tower folder (a key of `world`) and LM."""
    from vlm_vision.training import vlm_recipe

    data = world["data"]
    paths = [
        f"stages.pretrain.data.train={data.pretrain}", f"stages.pretrain.data.image_folder={data.root}",
        f"stages.finetune.data.train={data.finetune}", f"stages.finetune.data.image_folder={data.root}",
    ]  # fmt: skip
    return vlm_recipe.VLMRecipe.from_json(
        LLAVA_RECIPE, [*paths, *overrides], vision=world[vision], language_model=world["lm"]
    )
