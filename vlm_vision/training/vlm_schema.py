"""The VLM recipe as data: `VLMRecipe` (its fields, the keys each section takes, `from_json` with
overrides) and the checks that run before anything trains (unknown keys, the data sections). The schema is
documented in `docs/recipes.md`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from transformers import LlamaConfig

from ..encoder.configuration_vit import VisionTransformerConfig
from ..evaluation.generation import METRICS
from ..vlm.processing_vlm import (
    IMAGE_ASPECT_RATIOS,
    IMAGE_MODES,
)
from .classifier import ClassifierStage
from .schema import apply_overrides, check_keys, from_dict, read_recipe
from .stages import VLMStage

# keys of `vision` that say how to load or run the tower (the others, for a fresh tower, are its config fields)
VISION_KEYS = (
    "path",
    "image_processor",
    "convert",
    "dtype",
    "attn_implementation",
    "gradient_checkpointing",
    "compile",
)
VISION_PROCESSING_KEYS = (
    "image_aspect_ratio",
    "image_mode",
    "max_num_patches",
    "max_tiles",
    "pack_images",
    "max_packed_length",
)
# keys of `language_model` that say how to load or run it (the others, for a fresh tiny Llama, are LlamaConfig's)
LM_KEYS = ("path", "gguf_file", "dtype", "attn_implementation", "gradient_checkpointing", "compile", "chat_template")
EASY_VQA_KEYS = ("questions_per_sample", "shown_fraction", "rewrite_shown_fraction", "negated_questions")
DATA_KEYS = (
    "name",
    "train",
    "image_folder",
    "eval",
    "eval_image_folder",
    "train_subset",
    "eval_subset",
    "separate_questions",
    "num_workers",
    "group_by_length",
    "on_error",
    "cache",
    "packing",
    *EASY_VQA_KEYS,
)
DATA_NAMES = ("easy-vqa", "llava")
TOKENIZER_KEYS = ("vocab_size",)


def _config_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


@dataclass
class VLMRecipe:
    """What to build and how to train it (the schema, field by field: `docs/recipes.md`).

    Attributes:
        description: what the recipe is for, its expected result and runtime (not read by the code).
        vision: `{"path": folder}` of a tower saved by transformers (CLIP, SigLIP, DINOv2, ViT) or by us, with
            `image_processor`, `convert`, `dtype`, `attn_implementation`; or the `VisionTransformerConfig` fields of
            a fresh tower. Either way `gradient_checkpointing`, `image_aspect_ratio` ("squash" or "pad") and
            `image_mode`: "fixed" (default), "native" (with `max_num_patches`) or "tiles" (with `max_tiles`).
        language_model: `{"path": folder}` of any causal LM with its tokenizer (`gguf_file`, `dtype`,
            `attn_implementation`), or the `LlamaConfig` fields of a fresh tiny LM (its tokenizer trained on the
            data); `gradient_checkpointing`; `chat_template` (the LM's own by default).
        adapter: the adapter config (`vlm_vision.adapters`).
        vision_feature_layer: the tower layer(s) the adapter reads (-2: the penultimate block, as LLaVA).
        keep_prefix_tokens: the tower's [CLS] goes to the LM too, as one more image token.
        data: `{"name": "easy-vqa", ...}` (built in) or `{"name": "llava", "train": file, "image_folder": dir,
            "eval": file}`; see `docs/recipes.md` for every key. A stage may override it (its own file).
        tokenizer: `{"vocab_size": n}` for the trained sentencepiece tokenizer of a fresh LM.
        max_length: longest sequence in tokens, image tokens included (longer samples are skipped, never
            truncated). 2048 fits 576 CLIP-L/336 image tokens and a long conversation.
        stages: `VLMStage`s, in order. `vision_pretrain` stages come first; each continues the tower of the one
            before, and the last one's head is the auxiliary classifier.
        seed: model initialisation, data order, augmentation.
        eval_batch_size, eval_max_new_tokens, eval_metric: the end-of-run evaluation (metric: "exact_match",
            "vqa" or "captions"; default exact match).
    """

    vision: dict = field(default_factory=dict)
    language_model: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=lambda: {"adapter_type": "mlp"})
    vision_feature_layer: int | list[int] = -2
    keep_prefix_tokens: bool = False
    data: dict = field(default_factory=lambda: {"name": "easy-vqa", "questions_per_sample": 1})
    tokenizer: dict = field(default_factory=lambda: {"vocab_size": 512})
    max_length: int = 2048
    stages: list[VLMStage] = field(default_factory=list)
    seed: int = 0
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 32
    eval_metric: str | None = None
    description: str = ""

    def __post_init__(self):
        for section, flag in (("vision", "--vision"), ("language_model", "--lm")):
            if "path" in getattr(self, section) and not getattr(self, section)["path"]:
                raise ValueError(
                    f"This recipe needs {section}.path, a folder saved by transformers: pass {flag} FOLDER (or --set "
                    f"{section}.path=FOLDER)."
                )
        tower_fields = set() if self.vision.get("path") else _config_fields(VisionTransformerConfig)
        check_keys(self.vision, {*VISION_KEYS, *VISION_PROCESSING_KEYS, *tower_fields}, "vision")
        lm_fields = set() if self.language_model.get("path") else _config_fields(LlamaConfig)
        check_keys(self.language_model, {*LM_KEYS, *lm_fields}, "language_model")
        check_keys(self.data, DATA_KEYS, "data")
        check_keys(self.tokenizer, TOKENIZER_KEYS, "tokenizer")
        if self.vision.get("image_aspect_ratio", "squash") not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"vision.image_aspect_ratio={self.vision['image_aspect_ratio']!r}; use {IMAGE_ASPECT_RATIOS}."
            )
        mode = self.vision.get("image_mode", "fixed")
        if mode not in IMAGE_MODES:
            raise ValueError(f"vision.image_mode={mode!r}; use one of {IMAGE_MODES}.")
        needs = {"native": "max_num_patches", "tiles": "max_tiles"}
        for other, key in needs.items():
            # native mode may leave the budget to the tower's image processor (SigLIP2's has one), checked at build
            given = key in self.vision or other == "tiles"
            if mode == other and given and not isinstance(self.vision.get(key), int):
                raise ValueError(
                    f"vision.image_mode={mode!r} needs vision.{key} (an int: "
                    + (
                        "the patch budget per image, e.g. 576"
                        if key == "max_num_patches"
                        else "tiles along the long side, e.g. 3"
                    )
                    + ")."
                )
            if mode != other and key in self.vision:
                raise ValueError(f"vision.{key} is for image_mode={other!r}, but image_mode is {mode!r}: remove it.")
        packing = "pack_images" in self.vision or "max_packed_length" in self.vision
        if packing and (mode != "native" or self.vision.get("pack_images") is not True):
            raise ValueError(
                "vision.pack_images (true: several images' patches per tower row) and vision.max_packed_length "
                f"(the patch slots of a row) are for image_mode='native' with pack_images true; image_mode is "
                f"{mode!r}, pack_images {self.vision.get('pack_images')!r}: set image_mode 'native' and pack_images "
                "true, or remove them."
            )
        if self.eval_metric is not None and self.eval_metric not in METRICS:
            raise ValueError(f"eval_metric={self.eval_metric!r}; use one of {METRICS} (or null for exact match).")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length={self.max_length!r} must be a positive int (tokens).")
        self.stages = [
            from_dict(VLMStage, s, f"stages[{i}] ({s.get('name', '?')})") if isinstance(s, dict) else s
            for i, s in enumerate(self.stages)
        ]
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"A recipe needs stages with unique names (they are folders), got {names}.")
        kinds = [s.kind for s in self.stages]
        leading = next((i for i, kind in enumerate(kinds) if kind != "vision_pretrain"), len(kinds))
        if "vision_pretrain" in kinds[leading:]:
            raise ValueError(
                f"Stage kinds {kinds}: vision_pretrain stages must come first (the VLM is built from their tower); "
                "each one continues the tower of the one before."
            )
        for position, stage in enumerate(self.stages):
            if stage.classifier is not None:
                from_dict(ClassifierStage, {"name": stage.name, **stage.classifier}, f"stages.{stage.name}.classifier")
            data = self.stage_data(stage)
            check_data(data, f"stage {stage.name!r}")
            if stage.kind != "vision_pretrain" and data["name"] == "llava":
                for key in ("train", "image_folder"):
                    required_data_path(data, key, stage.name)
            if stage.aux_classification_weight and mode != "fixed":
                raise ValueError(
                    f"Stage {stage.name!r}: aux_classification_weight classifies each image by the tower's [CLS], "
                    f"which the VLM is handed with the image's features in image_mode 'fixed' only, not {mode!r}: set "
                    "aux_classification_weight to 0, or vision.image_mode to 'fixed'."
                )
            if stage.init_from in names and names.index(stage.init_from) >= position:
                raise ValueError(
                    f"Stage {stage.name!r}: init_from={stage.init_from!r} names a stage that runs at or after it; name "
                    f"one of the stages before it {names[:position]}, or a saved projector/VLM folder."
                )

    def stage_data(self, stage: VLMStage) -> dict:
        """The data a stage trains on: the recipe's `data` with the stage's overrides."""
        return {**self.data, **(stage.data or {})}

    @classmethod
    def from_json(
        cls,
        path,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        vision: str | None = None,
        language_model: str | None = None,
    ) -> VLMRecipe:
        """Read a recipe file, point it at a `vision` tower folder and a `language_model` folder (what
        `--vision`/`--lm` do: the loading options of the recipe's section are kept), apply `--set` style
        `overrides` (`dotted.key=value`), and check it."""
        raw = read_recipe(path)
        for section, folder, keep in (
            ("vision", vision, VISION_KEYS + VISION_PROCESSING_KEYS),
            ("language_model", language_model, LM_KEYS),
        ):
            if folder is not None:
                kept = {k: v for k, v in (raw.get(section) or {}).items() if k in keep and k != "path"}
                raw[section] = {"path": str(folder), **kept}
        apply_overrides(raw, overrides)
        recipe = from_dict(cls, raw, f"recipe {path}")
        recipe.source = str(path)  # for results.json and the model card; not a field
        return recipe

    def to_dict(self) -> dict:
        return asdict(self)


def check_data(data: dict, where: str) -> None:
    """The data section of a stage (or the evaluation's), checked before anything runs."""
    name = data.get("name")
    if name not in DATA_NAMES:
        raise ValueError(f"{where}: data.name={name!r}; use 'easy-vqa' (built in) or 'llava' (a LLaVA-format file).")
    if name == "llava":
        wrong = sorted(set(data) & set(EASY_VQA_KEYS))
        if wrong:
            raise ValueError(
                f"{where}: data options {wrong} are for the built-in easy-VQA questions (they read its yes/no "
                "questions); remove them for LLaVA data."
            )
    if data.get("on_error", "skip") not in ("skip", "raise"):
        raise ValueError(f"{where}: data.on_error={data['on_error']!r}; use 'skip' or 'raise'.")
    if not isinstance(data.get("packing", False), bool):
        raise ValueError(f"{where}: data.packing={data['packing']!r}; use true (rows of max_length tokens) or false.")


def required_data_path(data: dict, key: str, stage: str) -> str:
    if not data.get(key):
        raise ValueError(
            f"Stage {stage!r} trains on LLaVA data but has no data.{key}: pass --set stages.{stage}.data.{key}=PATH "
            f"(or set data.{key} in the recipe)."
        )
    return data[key]
