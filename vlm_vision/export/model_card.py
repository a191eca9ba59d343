"""Model cards (README.md with YAML metadata) generated from the real config of a saved folder.

:func:`model_card` is the one place a card is put together (Hub metadata as YAML front matter, then the Markdown
body); the encoder's card (:func:`write_model_card`), the trained VLM's (:func:`write_vlm_card`) and the minimal card
`hub.push_folder` uploads for a folder without one (`hub.default_model_card`) differ only in what they say.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CITATION = """@inproceedings{dosovitskiy2021an,
  title={An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author={Alexey Dosovitskiy and Lucas Beyer and Alexander Kolesnikov and Dirk Weissenborn and Xiaohua Zhai and
          Thomas Unterthiner and Mostafa Dehghani and Matthias Minderer and Georg Heigold and Sylvain Gelly and
          Jakob Uszkoreit and Neil Houlsby},
  booktitle={International Conference on Learning Representations},
  year={2021}
}"""


def model_card(body: str, **metadata) -> ModelCard:
    """A card of `ModelCardData(**metadata)` (the YAML block the Hub reads) followed by the Markdown `body`."""
    return ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n\n{body}")


def architecture_table(config) -> str:
    """A Markdown table of the encoder's shape, read from a `VisionTransformerConfig`."""
    grid_h, grid_w = config.grid_size
    rows = {
        "image size": "x".join(map(str, config.image_size_hw)),
        "patch size": "x".join(map(str, config.patch_size_hw)),
        "patch grid": f"{grid_h}x{grid_w} = {grid_h * grid_w} tokens",
        "prefix tokens": f"{int(config.use_class_token)} [CLS] + {config.num_register_tokens} registers",
        "hidden size (D)": config.hidden_size,
        "layers (L)": config.num_hidden_layers,
        "attention heads": config.num_attention_heads,
        "MLP size": config.intermediate_size,
        "activation": config.hidden_act,
        "pooling": config.pooling,
        "hybrid CNN stem": "BiT " + str(config.backbone_config.get("depths")) if config.backbone_config else "none",
    }
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]
    return "\n".join(lines)


def write_model_card(
    directory: str | os.PathLike,
    config,
    *,
    title: str,
    summary: str,
    num_parameters: int,
    pipeline_tag: str = "image-feature-extraction",
    sections: Mapping[str, str] | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Write `directory/README.md`: metadata for the Hub plus usage, architecture and any extra `sections`."""
    body = [
        f"# {title}",
        summary,
        "## Usage",
        "```python\nimport torch\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
        "# with `pip install vlm-vision` and `import vlm_vision`, or with trust_remote_code=True:\n"
        'processor = AutoImageProcessor.from_pretrained("PATH")\n'
        'model = AutoModel.from_pretrained("PATH", trust_remote_code=True)\n'
        'outputs = model(**processor(images=image, return_tensors="pt"))\n'
        "outputs.last_hidden_state  # (1, prefix + patches, hidden)\noutputs.pooler_output  # (1, hidden)\n```",
        "## Architecture",
        f"{num_parameters:,} parameters.\n\n{architecture_table(config)}",
        *(f"## {name}\n{text}" for name, text in (sections or {}).items()),
        f"## Citation\n```bibtex\n{CITATION}\n```",
    ]
    card = model_card(
        "\n\n".join(body) + "\n",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        tags=["vision", "vit", "vlm-vision", config.model_type, *(tags or [])],
        base_model=base_model,
        datasets=datasets,
    )
    card.save(os.path.join(directory, "README.md"))
    return card


def write_vlm_card(folder: Path, recipe: dict, rows: list[dict], evaluation: dict | None, model) -> None:
    """The model card of a trained VLM: metadata, the evaluation, the stages and the recipe."""
    data_name = recipe.get("data", {}).get("name")
    accuracy = ""
    if evaluation and "accuracy" in evaluation:
        lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in evaluation["accuracy"].items())
        header = f"Greedy answers, exact match, {evaluation['num_samples']} questions of {evaluation.get('data')}:"
        accuracy = f"{header}\n\n| | accuracy |\n|---|---|\n{lines}"
    stages = "\n".join(
        f"| {r['stage']} | {r['kind']} | {r.get('steps', '')} | {r.get('train_seconds', '')} |" for r in rows
    )
    body = (
        f"# A vision-language model trained with vlm-vision\n\n"
        f"{model.num_parameters():,} parameters: a `{model.config.vision_config.model_type}` vision tower, a "
        f"`{model.config.adapter_config['adapter_type']}` adapter and a `{model.config.text_config.model_type}` "
        "causal LM. Load with `import vlm_vision` then `AutoModelForImageTextToText.from_pretrained(path)` and "
        f"`AutoProcessor.from_pretrained(path)`.\n\n## Evaluation\n\n{accuracy or 'not evaluated'}\n\n"
        f"## Training\n\n| stage | kind | steps | seconds |\n|---|---|---|---|\n{stages}\n\n"
        f"## Recipe\n\n```json\n{json.dumps(recipe, indent=2, default=str)}\n```\n"
    )
    card = model_card(
        body,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["vision", "vlm-vision", "vision-language-model"],
        datasets=["easy-vqa"] if data_name == "easy-vqa" else None,
    )
    card.save(folder / "README.md")
