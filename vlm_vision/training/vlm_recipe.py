"""A VLM recipe as data (`configs/vlm/*.json`) and the function that runs it, stage after stage.

    recipe -> parts: the vision tower (a Hub folder converted in memory, one of ours, or a fresh ViT pre-trained by
              `vision_pretrain` stages), the language model (a folder, or a tiny Llama whose sentencepiece tokenizer
              is trained on the conversations) and a fresh adapter
           -> stages, each one a function of its kind: `vision_pretrain` (the classifier code), or a VLM stage
              (`pretrain` / `finetune` / `full`: freeze what it doesn't train, its own data, the shared loop)
           -> evaluation (batched greedy answers on the model's device) -> final folders and model card

Each stage's result is saved (`<out>/<stage>/model`, its adapter alone in `<out>/<stage>/projector`); with `resume`,
finished stages are loaded and the running one continues exactly from its last atomic checkpoint. The recipe schema
is documented in `docs/recipes.md`; unknown keys are refused with the valid ones listed, and any field can be set
from the command line (`--set stages.finetune.batch_size=64`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..adapters import CONFIG_NAME as PROJECTOR_CONFIG
from ..adapters import Adapter
from ..data.conversations import read_easy_vqa
from ..data.dataset import VLMCollator, VLMDataset
from ..data.index import SampleList, SubsetIndex, open_llava_index
from ..encoder.configuration_vit import VisionTransformerConfig
from ..encoder.image_processing_vit import VisionTransformerImageProcessor
from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel
from ..evaluation.generation import METRICS, evaluate_samples
from ..export.encoder_folder import image_processor_for
from ..export.folders import save_folder_atomically
from ..export.model_card import write_vlm_card
from ..vlm.feature_cache import FeatureStore
from ..vlm.modeling_vlm import VisionLanguageForConditionalGeneration, check_packing_attention
from ..vlm.processing_vlm import (
    IMAGE_ASPECT_RATIOS,
    IMAGE_MODES,
    IMAGE_TOKEN,
    TILE_SEPARATOR_TOKENS,
    VisionLanguageProcessor,
    resolve_chat_template,
)
from ..vlm.smollm import as_plain_model
from ..vlm.tokenizer import chat_texts, train_sentencepiece_tokenizer
from ..vlm.towers import load_vision_tower, resolve_dtype
from .classifier import ClassifierStage, load_stage_data, prepare_classifier, train_classifier
from .distributed import deepspeed_zero_stage
from .loop import TrainingArguments, make_accelerator, process_state, train
from .schema import apply_overrides, check_keys, from_dict, read_recipe
from .stages import VLMStage, set_trainable, stage_optimizer, stage_summary
from .vlm import VLMLoss, WithAuxiliaryClassifier, count_supervised, save_json

logger = logging.getLogger(__name__)

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
VISION_PROCESSING_KEYS = ("image_aspect_ratio", "image_mode", "max_num_patches", "max_tiles")
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
TOKENIZER_TRAINING_SAMPLES = 200_000  # a tiny LM's tokenizer is trained on at most this many conversations


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
            if mode == other and not isinstance(self.vision.get(key), int):
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
                    _required(data, key, stage.name)
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


def _required(data: dict, key: str, stage: str) -> str:
    if not data.get(key):
        raise ValueError(
            f"Stage {stage!r} trains on LLaVA data but has no data.{key}: pass --set stages.{stage}.data.{key}=PATH "
            f"(or set data.{key} in the recipe)."
        )
    return data[key]


def open_training_data(data: dict, seed: int, stage: str = "train"):
    """The index of a stage's training samples (`data` merged already), with its seeded `train_subset`."""
    if data["name"] == "easy-vqa":
        samples, _ = read_easy_vqa(
            "train",
            questions_per_sample=data.get("questions_per_sample", 1),
            shown_fraction=data.get("shown_fraction"),
            rewrite_shown_fraction=data.get("rewrite_shown_fraction"),
            negated_questions=data.get("negated_questions", True),
            seed=seed,
        )
        index = SampleList(samples, source="easy-vqa train")
    else:
        index = open_llava_index(_required(data, "train", stage), _required(data, "image_folder", stage))
    return SubsetIndex.seeded(index, data.get("train_subset"), seed)


def load_eval_samples(data: dict, seed: int) -> list:
    """The evaluation samples of the recipe's `data` (easy-VQA's test split, or LLaVA `eval`), in memory."""
    if data["name"] == "easy-vqa":
        samples, _ = read_easy_vqa("test", questions_per_sample=1)
        index = SampleList(samples, source="easy-vqa test")
    elif data.get("eval"):
        folder = data.get("eval_image_folder") or data.get("image_folder")
        if not folder:
            raise ValueError("data.eval needs data.eval_image_folder (or data.image_folder) for its images.")
        index = open_llava_index(data["eval"], folder)
    else:
        return []
    index = SubsetIndex.seeded(index, data.get("eval_subset"), seed)
    samples = []
    for i in range(len(index)):
        try:
            samples.append(index.sample(i))
        except ValueError as problem:
            logger.warning("evaluation leaves out entry %d of %s: %s", i, index.source, problem)
    return samples


class EasyVQAImageLabel:
    """sample -> the index of its easy-VQA image's class for `task` (`shape`, `color`, `shape_color`), -100 if the
    image's questions don't tell; for the auxiliary classification loss (picklable, for DataLoader workers)."""

    def __init__(self, task: str, label_names: list[str]):
        from ..data.easy_vqa import easy_vqa_image_labels

        self.task, self.label_names = task, label_names
        self.labels = easy_vqa_image_labels("train")

    def __call__(self, sample) -> int:
        labels = self.labels.get(sample.meta.get("image_id"), {})
        if self.task == "shape_color":
            name = f"{labels['color']} {labels['shape']}" if "shape" in labels and "color" in labels else None
        else:
            name = labels.get(self.task)
        return self.label_names.index(name) if name in self.label_names else -100


# ---------------------------------------------------------------------------------------------------------------------
# A run: the parts, then one function per stage kind
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the stages of one run share and hand on."""

    recipe: VLMRecipe
    out: Path
    options: dict  # the loop's run-level arguments (seed, resume, saving, precision, progress bar)
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict] = field(default_factory=list)
    classifier: VisionTransformerForImageClassification | None = None  # the tower as a classifier (vision_pretrain)
    aux: tuple | None = None  # (head, label names, task) of the last vision_pretrain stage
    model: VisionLanguageForConditionalGeneration | None = None
    state_dict: dict | None = None  # the gathered weights of `model` to save (None: the module's own)
    processor: VisionLanguageProcessor | None = None
    accelerator: object = None  # one for the whole run, every stage's

    @property
    def process(self):
        return process_state()

    def summary(self, **extra) -> dict:
        return {"stages": self.rows, "total_seconds": round(time.perf_counter() - self.started, 1), **extra}


def run_vlm_recipe(
    recipe: VLMRecipe,
    output_dir: str,
    *,
    resume: bool = False,
    save_every_steps: int | None = None,
    stop_after_steps: int | None = None,
    progress_bar: bool = True,
    mixed_precision: str = "auto",
    report_to: list[str] | None = None,
    evaluate: bool = True,
) -> dict:
    """Run every stage of `recipe` under `output_dir`; returns `{"stages": rows, "evaluation": metrics, ...}`.

    Call it on every process (under `accelerate launch`); evaluation and the final folders are on the main process.
    """
    check_zero3(recipe, evaluate)
    set_seed(recipe.seed)
    run = _Run(
        recipe,
        Path(output_dir),
        {
            "seed": recipe.seed,
            "save_every_steps": save_every_steps,
            "stop_after_steps": stop_after_steps,
            "resume": "latest" if resume else None,
            "progress_bar": progress_bar,
            "mixed_precision": mixed_precision,
            "report_to": list(report_to or []),
        },
    )
    run.accelerator = make_accelerator(
        TrainingArguments(output_dir=output_dir, mixed_precision=mixed_precision, report_to=list(report_to or []))
    )
    for stage in recipe.stages:
        finished = (run_vision_pretrain if stage.kind == "vision_pretrain" else run_vlm_stage)(run, stage, resume)
        if not finished:
            return run.summary(evaluation=None, stopped_in=stage.name)
    return finish(run, evaluate)


def run_vision_pretrain(run: _Run, stage: VLMStage, resume: bool) -> bool:
    """The tower as an image classifier (the classifier training code); the next stage continues its tower."""
    recipe, stage_dir = run.recipe, run.out / stage.name
    classifier_stage = from_dict(ClassifierStage, {"name": stage.name, **stage.classifier}, stage.name)
    if resume and (stage_dir / "model" / "config.json").is_file():
        run.classifier = VisionTransformerForImageClassification.from_pretrained(stage_dir / "model")
    else:
        set_seed(recipe.seed)
        train_data, eval_data = load_stage_data(classifier_stage, recipe.seed)
        id2label = dict(enumerate(train_data.class_names))
        start = run.classifier
        if start is None:  # the recipe's tower: a fresh one, or a folder's (pre-trained as a classifier further)
            start = build_tower(recipe, None)[0] if recipe.vision.get("path") else _fresh_tower_config(recipe)
        classifier = prepare_classifier(
            start,
            image_size=classifier_stage.image_size,
            head=classifier_stage.head,
            num_labels=len(id2label),
            id2label=id2label,
        )
        result = train_classifier(
            classifier,
            train_data,
            classifier_stage,
            classifier_stage.training_arguments(str(stage_dir), **run.options),
            eval_dataset=eval_data,
            accelerator=run.accelerator,
        )
        if not result.train.finished:
            return False
        run.classifier = result.model
        run.rows.append(
            {
                "stage": stage.name,
                "kind": stage.kind,
                "steps": result.train.num_training_steps,
                "train_seconds": round(result.train.train_seconds, 1),
                "classifier_accuracy": round(result.metrics.get("accuracy", float("nan")), 4),
            }
        )
        if run.process.is_main_process:
            run.classifier.save_pretrained(stage_dir / "model", state_dict=dict(result.train.state_dict))
        run.process.wait_for_everyone()
    config = run.classifier.config
    run.classifier = prepare_classifier(
        run.classifier,
        image_size=recipe.vision.get("image_size", config.image_size),
        head=config.classifier_head,
        num_labels=config.num_labels,
        id2label=config.id2label,
    )
    head = nn.Sequential(*(m for m in (run.classifier.pre_logits, run.classifier.classifier) if m is not None))
    run.aux = (head, [config.id2label[i] for i in range(config.num_labels)], classifier_stage.task)
    return True


def run_vlm_stage(run: _Run, stage: VLMStage, resume: bool) -> bool:
    """A `pretrain` / `finetune` / `full` stage: freeze what it doesn't train, train on its data, save its result."""
    recipe, stage_dir = run.recipe, run.out / stage.name
    if run.model is None:
        run.model, run.processor = build_vlm(recipe, run.classifier, run.out / "tokenizer")
    if resume and (stage_dir / "model" / "config.json").is_file():
        run.model = VisionLanguageForConditionalGeneration.from_pretrained(stage_dir / "model")
        run.state_dict = None
        logger.info("stage %s already finished: loaded %s", stage.name, stage_dir / "model")
        return True
    if stage.init_from is not None:
        run.model = initialise_from(run, stage)
    set_seed(recipe.seed)
    trainable = set_trainable(run.model, stage)
    _trainable_in_fp32(trainable)
    use_aux = stage.aux_classification_weight > 0 and run.aux is not None
    if use_aux:
        trainable = WithAuxiliaryClassifier(trainable, run.aux[0], stage.aux_classification_weight)
    data = recipe.stage_data(stage)
    if data.get("packing"):  # before any data is read
        check_packing_attention(run.model.language_model.config._attn_implementation)
        logger.info("stage %s: conversations packed into rows of up to %d tokens", stage.name, recipe.max_length)
    index = open_training_data(data, recipe.seed, stage.name)
    chat_template = stage.chat_template and resolve_chat_template(stage.chat_template, run.processor.tokenizer)
    dataset = VLMDataset(
        index,
        run.processor,
        max_length=recipe.max_length,
        chat_template=chat_template or None,
        separate_questions=data.get("separate_questions", False),
        image_label=EasyVQAImageLabel(run.aux[2], run.aux[1]) if use_aux else None,
        horizontal_flip=stage.horizontal_flip,
        seed=recipe.seed,
        cache=data.get("cache", data["name"] == "easy-vqa"),
        features=feature_store(run, stage, index, data) if stage.cache_features else None,
        on_error=data.get("on_error", "skip"),
    )
    grouping = {}
    if data.get("group_by_length"):
        chars, images = index.length_estimates()
        grouping = {"lengths": chars // 4 + images * run.processor.num_image_tokens, "modalities": images > 0}
    args = stage.training_arguments(
        str(stage_dir),
        **run.options,
        num_workers=data.get("num_workers", default_num_workers(data)),
        group_by_length=bool(data.get("group_by_length")),
    )
    loss = VLMLoss()
    result = train(
        trainable,
        dataset,
        args,
        stage_optimizer(stage, trainable),
        collate_fn=VLMCollator(run.processor, pack_length=recipe.max_length if data.get("packing") else None),
        compute_loss=loss,
        count_items=count_supervised,
        accelerator=run.accelerator,
        fingerprint_extra={"stage": stage_summary(stage), "recipe": resume_identity(recipe, stage)},
        **grouping,
    )
    skipped = loss.all_skipped()
    if not result.finished:
        return False
    trained = result.model.vlm if use_aux else result.model
    # saved from the gathered weights (accelerate's get_state_dict), not the module's (partitioned under ZeRO-3)
    state_dict = _within(result.state_dict, "vlm.") if use_aux else result.state_dict
    if stage.lora is not None:  # the module's weights are whole here: LoRA is refused under ZeRO-3 (check_zero3)
        if run.process.is_main_process:
            trained.save_pretrained(run.out / "lora" / stage.name)  # the LoRA adapters alone (peft format)
        trained, state_dict = trained.merge_and_unload(), None
    run.model, run.state_dict = trained, state_dict
    run.rows.append(
        {
            "stage": stage.name,
            "kind": stage.kind,
            "steps": result.num_training_steps,
            "train_seconds": round(result.train_seconds, 1),
            "samples_per_second": round(result.samples_per_second, 1),
            "last_loss": round(result.last_loss, 4),
            "skipped_samples": len(skipped),
        }
    )
    if run.process.is_main_process:
        report_skipped(stage_dir, stage.name, dataset.source, skipped)
        save_folder_atomically(stage_dir / "model", lambda folder: _save_vlm(run, folder))
        weights = None if run.state_dict is None else _within(run.state_dict, "adapter.")
        save_folder_atomically(stage_dir / "projector", lambda path: run.model.adapter.save_pretrained(path, weights))
    run.process.wait_for_everyone()
    return True


# What a resumed stage may change in the recipe (the loop refuses any other change, naming it): what is evaluated and
# how (evaluation comes after training), the description, and the data's worker count. The models, the data, the
# lengths, the seed and the stage's own fields must be the stage's checkpoint's; other stages' fields don't matter.
RESUMABLE_RECIPE_FIELDS = ("description", "eval_batch_size", "eval_max_new_tokens", "eval_metric")
RESUMABLE_DATA_FIELDS = ("eval", "eval_image_folder", "eval_subset", "num_workers")


def resume_identity(recipe: VLMRecipe, stage: VLMStage) -> dict:
    """The recipe's resolved fields that a checkpoint of `stage` is saved with and a resume must match."""
    fields = recipe.to_dict()
    identity = {k: v for k, v in fields.items() if k not in (*RESUMABLE_RECIPE_FIELDS, "stages", "data")}
    data = {k: v for k, v in recipe.stage_data(stage).items() if k not in RESUMABLE_DATA_FIELDS}
    return {**identity, "data": data}


def feature_store(run: _Run, stage: VLMStage, index, data: dict) -> FeatureStore:
    """The frozen tower's features of every image file of the stage's data (and their flips when the stage flips),
    built once by the main process under `<out>/feature_cache/` (memory-mapped; reused by later stages with the same
    tower and preprocessing), then opened by every process."""
    paths = set()
    for i in range(len(index)):
        try:
            paths.update(str(image) for image in index.sample(i).images)
        except ValueError:
            continue  # a malformed entry: the data set reports it
    options = {
        "flips": stage.horizontal_flip,
        "dtype": torch.float16 if stage.cache_features == "float16" else torch.float32,
        "batch_size": run.recipe.eval_batch_size,
        "num_workers": data.get("num_workers", default_num_workers(data)),
    }
    root = run.out / "feature_cache"
    store = (
        FeatureStore.build(run.model, run.processor, sorted(paths), root, **options)
        if run.process.is_main_process
        else None
    )
    run.process.wait_for_everyone()
    return store or FeatureStore.build(run.model, run.processor, sorted(paths), root, **options)  # the main's


def finish(run: _Run, evaluate: bool) -> dict:
    """Evaluate (every process answers its share of the questions) and write the final folder, the model card and
    `results.json` (main process)."""
    recipe, evaluation, main = run.recipe, None, run.process.is_main_process
    eval_samples = load_eval_samples(recipe.data, recipe.seed) if evaluate and run.model is not None else []
    if eval_samples:
        evaluation = evaluate_samples(
            run.model,
            run.processor,
            eval_samples,
            recipe.eval_metric or "exact_match",
            batch_size=recipe.eval_batch_size,
            max_new_tokens=recipe.eval_max_new_tokens,
            progress_bar=run.options["progress_bar"],
        )
        predictions = evaluation.pop("predictions")
        evaluation["data"] = recipe.data["name"] if recipe.data["name"] == "easy-vqa" else recipe.data["eval"]
        if main:
            rows = [{"id": s.id, "prediction": p} for s, p in zip(eval_samples, predictions, strict=True)]
            save_json(run.out / "eval_predictions.json", {"predictions": rows})
    summary = run.summary(evaluation=evaluation, seed=recipe.seed, recipe=getattr(recipe, "source", None))
    if main and run.model is not None:

        def write(folder: Path) -> None:
            _save_vlm(run, folder)
            write_vlm_card(folder, recipe.to_dict(), run.rows, evaluation, run.model)

        save_folder_atomically(run.out / "vlm", write)
        save_json(run.out / "results.json", summary)
    run.process.wait_for_everyone()
    return summary


def default_num_workers(data: dict) -> int:
    """DataLoader workers when the recipe doesn't say: none for the built-in data (decoded once, kept in memory);
    for files, up to 4 per process, leaving a core to the training step."""
    if data["name"] == "easy-vqa":
        return 0
    processes = max(1, process_state().num_processes // max(1, torch.cuda.device_count() or 1))
    return max(1, min(4, (os.cpu_count() or 2) // processes - 1))


def report_skipped(stage_dir: Path, stage: str, source: str, skipped: list) -> None:
    """Log how many samples a stage skipped and why, naming the first ones; all of them in `data_report.json`."""
    save_json(stage_dir / "data_report.json", {"source": source, "skipped": [asdict(s) for s in skipped]})
    if not skipped:
        logger.info("stage %s: every sample of %s was usable", stage, source)
        return
    reasons = {}
    for sample in skipped:
        reasons[sample.reason] = reasons.get(sample.reason, 0) + 1
    shown = "; ".join(s.message for s in skipped[:5])
    logger.warning(
        "stage %s skipped %d samples of %s (%s), each replaced by the next usable one: %s%s. All of them: %s",
        stage,
        len(skipped),
        source,
        ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())),
        shown,
        f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else "",
        stage_dir / "data_report.json",
    )


# ---------------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------------


def _fresh_tower_config(recipe: VLMRecipe) -> VisionTransformerConfig:
    fields_ = {k: v for k, v in recipe.vision.items() if k not in (*VISION_KEYS, *VISION_PROCESSING_KEYS)}
    return VisionTransformerConfig(**fields_)


def build_tower(recipe: VLMRecipe, classifier: VisionTransformerForImageClassification | None):
    """(tower, image processor): the pre-trained classifier's tower, a tower folder, or a fresh ViT."""
    if classifier is not None:
        return classifier.vit, image_processor_for(classifier.vit.config)
    vision = recipe.vision
    if vision.get("path"):
        return load_vision_tower(
            vision["path"],
            image_processor=vision.get("image_processor"),
            convert=vision.get("convert", True),
            dtype=vision.get("dtype"),
            attn_implementation=vision.get("attn_implementation"),
        )
    tower = VisionTransformerModel(_fresh_tower_config(recipe))
    return tower, image_processor_for(tower.config)


def build_tokenizer(recipe: VLMRecipe, tokenizer_folder: Path):
    """(tokenizer, chat template): the language model's own, or a sentencepiece tokenizer trained on the data."""
    lm = recipe.language_model
    if lm.get("path"):
        kwargs = {"gguf_file": lm["gguf_file"]} if lm.get("gguf_file") else {}
        tokenizer = AutoTokenizer.from_pretrained(lm["path"], **kwargs)
        return tokenizer, resolve_chat_template(lm.get("chat_template"), tokenizer, where=lm["path"])
    chat_template = resolve_chat_template(lm.get("chat_template", "user_assistant"), None)
    return _trained_tokenizer(recipe, tokenizer_folder, chat_template), chat_template


def build_language_model(recipe: VLMRecipe, tokenizer) -> nn.Module:
    """The causal LM from its folder, or a fresh tiny Llama sized for `tokenizer` (its vocabulary and `<image>`)."""
    lm = recipe.language_model
    if lm.get("path"):
        kwargs = {key: lm[key] for key in ("gguf_file", "attn_implementation") if lm.get(key)}
        dtype = resolve_dtype(lm.get("dtype"), "language_model") or torch.float32
        model = AutoModelForCausalLM.from_pretrained(lm["path"], dtype=dtype, **kwargs)
        return as_plain_model(model) if lm.get("gguf_file") else model
    config = {k: v for k, v in lm.items() if k not in LM_KEYS}
    config = {"tie_word_embeddings": True, "max_position_embeddings": recipe.max_length, **config}
    attention = {"attn_implementation": lm["attn_implementation"]} if lm.get("attn_implementation") else {}
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), **config), **attention)


def _trained_tokenizer(recipe: VLMRecipe, folder: Path, chat_template: str):
    """A sentencepiece tokenizer trained on the first VLM stage's conversations as the template renders them."""
    process = process_state()
    if process.is_main_process and not (folder / "tokenizer.json").is_file():
        first = next(s for s in recipe.stages if s.kind != "vision_pretrain")
        index = open_training_data(recipe.stage_data(first), recipe.seed, first.name)
        positions = range(len(index))
        if len(index) > TOKENIZER_TRAINING_SAMPLES:
            positions = sorted(random.Random(recipe.seed).sample(positions, TOKENIZER_TRAINING_SAMPLES))
        conversations = []
        for i in positions:
            try:
                conversations.append(index.sample(i).messages)
            except ValueError:
                continue  # a malformed entry: the data set reports it when training reaches it
        texts = chat_texts(conversations, chat_template)  # what the LM reads, the template's markup included
        tokenizer = train_sentencepiece_tokenizer(texts, vocab_size=recipe.tokenizer.get("vocab_size", 512))
        tokenizer.save_pretrained(folder)
    process.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)


def build_vlm(recipe: VLMRecipe, classifier, tokenizer_folder: Path):
    """The VLM (tower + fresh adapter + LM) and its processor (the tower's image processor, the LM's tokenizer)."""
    tower, image_processor = build_tower(recipe, classifier)
    mode = recipe.vision.get("image_mode", "fixed")
    if mode == "native":
        image_processor = native_image_processor(tower, image_processor, recipe.vision["max_num_patches"])
    tokenizer, chat_template = build_tokenizer(recipe, tokenizer_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    separators = {}
    if mode == "tiles":
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(TILE_SEPARATOR_TOKENS)}, replace_extra_special_tokens=False
        )
        separators["tile_separator_token_ids"] = tokenizer.convert_tokens_to_ids(list(TILE_SEPARATOR_TOKENS))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    language_model = build_language_model(recipe, tokenizer)
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    model = VisionLanguageForConditionalGeneration.from_parts(
        tower,
        language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        adapter_config=recipe.adapter,
        vision_feature_layer=recipe.vision_feature_layer,
        keep_prefix_tokens=recipe.keep_prefix_tokens,
        **separators,
    )
    for side, part in (("vision", model.vision_tower), ("language_model", model.language_model)):
        if getattr(recipe, side).get("gradient_checkpointing"):
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if getattr(recipe, side).get("compile"):
            compile_layers(part)
    processor = VisionLanguageProcessor.from_model_config(
        model.config,
        image_processor,
        tokenizer,
        chat_template=chat_template,
        image_aspect_ratio=recipe.vision.get("image_aspect_ratio", "squash"),
        image_mode=mode,
        max_tiles=recipe.vision.get("max_tiles"),
    )
    if processor.num_image_tokens >= recipe.max_length:
        raise ValueError(
            f"One image takes {processor.num_image_tokens} tokens ({model.config.grid_size[0]}x"
            f"{model.config.grid_size[1]} patches through the {recipe.adapter.get('adapter_type', 'mlp')} adapter), "
            f"which leaves no room for text within max_length={recipe.max_length}: raise max_length (LLaVA uses "
            "2048) or use an adapter that reduces tokens (pixel_shuffle, resampler)."
        )
    return model, processor


def native_image_processor(tower, image_processor, max_num_patches: int) -> VisionTransformerImageProcessor:
    """The tower's image processor (its mean, std, resampling) in native-resolution mode: aspect ratio kept, at most
    `max_num_patches` patches of the tower's patch size."""
    if not isinstance(tower, VisionTransformerModel):
        raise ValueError(
            f"vision.image_mode='native' needs a tower that takes masked patch sequences; {type(tower).__name__} "
            "doesn't: load it with vision.convert=true (converted into VisionTransformerModel), or use 'fixed' / "
            "'tiles'."
        )
    patch_h, patch_w = tower.config.patch_size_hw
    if patch_h != patch_w:
        raise ValueError(f"vision.image_mode='native' needs square patches, got {patch_h}x{patch_w}.")
    return VisionTransformerImageProcessor(
        patch_size=patch_h,
        max_num_patches=max_num_patches,
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        resample=image_processor.resample,
        do_convert_rgb=getattr(image_processor, "do_convert_rgb", None),
        do_center_crop=False,
    )


def compile_layers(part: nn.Module) -> int:
    """`torch.compile` each transformer layer of `part` in place (the classes of its `_no_split_modules`): regional
    compilation, as accelerate's `compile_regions`: one layer's graph serves all of them (compiled once), the
    module tree and its state-dict names stay as they are, and the tower's `get_intermediate_layers` (which a
    compiled `forward` would bypass) runs compiled layers too. Returns the number of layers compiled."""
    classes = set(getattr(part, "_no_split_modules", None) or ())
    layers = [m for m in part.modules() if type(m).__name__ in classes and m is not part]
    if not layers:
        raise ValueError(f"{type(part).__name__} names no layer classes (_no_split_modules) to compile.")
    for layer in layers:
        layer.compile()
    logger.info("torch.compile: %d %s layers", len(layers), type(part).__name__)
    return len(layers)


def initialise_from(run: _Run, stage: VLMStage) -> VisionLanguageForConditionalGeneration:
    """The model a stage with `init_from` starts from: another stage's result, or a saved projector/VLM's adapter."""
    source = stage.init_from
    names = [s.name for s in run.recipe.stages]
    if source in names:
        folder = run.out / source / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"Stage {stage.name!r}: init_from={source!r}, but that stage has no saved result at {folder} (it "
                "has not finished): run it first, or name a saved projector/VLM folder."
            )
        logger.info("stage %s starts from stage %s's result (%s)", stage.name, source, folder)
        return VisionLanguageForConditionalGeneration.from_pretrained(folder)
    folder = Path(source)
    if (folder / PROJECTOR_CONFIG).is_file():
        adapter = Adapter.from_pretrained(folder)
    elif (folder / "config.json").is_file():
        adapter = VisionLanguageForConditionalGeneration.from_pretrained(folder).adapter
    else:
        raise FileNotFoundError(
            f"Stage {stage.name!r}: init_from={source!r} is neither a stage of this recipe ({names}) nor a folder "
            f"with a projector ({PROJECTOR_CONFIG}) or a saved VLM (config.json)."
        )
    own = run.model.adapter.state_dict()
    theirs = adapter.state_dict()
    mismatched = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    if mismatched or set(theirs) != set(own) or adapter.config.adapter_type != run.model.adapter.config.adapter_type:
        shapes = ", ".join(
            f"{k}: {tuple(theirs[k].shape) if k in theirs else 'missing'} vs {tuple(own[k].shape)}"
            for k in mismatched[:4]
        )
        raise ValueError(
            f"Stage {stage.name!r}: the adapter in {source} ({adapter.config.adapter_type}) does not fit this "
            f"recipe's ({run.model.adapter.config.adapter_type}): {shapes or 'different keys'}. It was trained for "
            "another tower or language model; use a projector of the same shapes."
        )
    run.model.adapter.load_state_dict(theirs)
    logger.info("stage %s starts from the adapter in %s", stage.name, source)
    return run.model


def _trainable_in_fp32(model: nn.Module) -> None:
    """Keep trainable weights in fp32 (a model loaded in bf16 trains its updated parts in full precision under
    autocast, as mixed-precision training expects); frozen parts stay in their dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def _save_vlm(run: _Run, folder: Path) -> None:
    # a copy: transformers' save_pretrained empties the dict it is given
    run.model.save_pretrained(folder, state_dict=None if run.state_dict is None else dict(run.state_dict))
    run.processor.save_pretrained(folder)


def _within(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix` (a submodule's), the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def zero3_problems(recipe: VLMRecipe, evaluate: bool) -> list[str]:
    """What this run would do that can't work on DeepSpeed ZeRO-3's partitioned parameters, each with its fix.

    After a ZeRO-3 stage the loop saves from `accelerator.get_state_dict` (the full 16-bit weights, gathered on the
    main process), but the module itself keeps empty partitions on every process: nothing else may use it.
    """
    problems = []
    stages = recipe.stages
    for stage in stages:
        where = f"stage {stage.name!r}"
        if stage.kind == "vision_pretrain":
            problems.append(
                f"{where} (vision_pretrain) evaluates the classifier and hands its tower on, which needs whole "
                "weights: run it under ZeRO-2 or FSDP (configs/accelerate/fsdp.yaml), and the VLM stages from its "
                "folder"
            )
        if stage.cache_features:
            problems.append(
                f"{where}: cache_features runs the tower on the main process alone, whose weights are partitioned: "
                "drop cache_features, or use ZeRO-2 or FSDP"
            )
        if stage.lora is not None:
            problems.append(
                f"{where}: LoRA's merge_and_unload would run on partitioned weights: use ZeRO-2 or FSDP (which gather "
                "the full weights before merging), or train without lora"
            )
    if len(stages) > 1:
        problems.append(
            f"stages {[s.name for s in stages[1:]]} would start from the partitioned weights of the stage before: run "
            "one stage per launch (the next recipe's stage with init_from=<out>/<stage>/projector), the earlier ones "
            "under ZeRO-2 as LLaVA-1.5 does, or use FSDP"
        )
    if evaluate and (recipe.data.get("eval") or recipe.data["name"] == "easy-vqa"):
        problems.append(
            "evaluation calls generate on every process, on partitioned weights: pass --no-eval and evaluate the "
            "saved folder afterwards (vlm-vision evaluate <out>/vlm), or use FSDP"
        )
    return problems


def check_zero3(recipe: VLMRecipe, evaluate: bool) -> None:
    """Refuse, before anything trains, what can't work under DeepSpeed ZeRO-3 (see :func:`zero3_problems`)."""
    if deepspeed_zero_stage() != 3:
        return
    problems = zero3_problems(recipe, evaluate)
    if problems:
        raise ValueError(
            "This run can't work under DeepSpeed ZeRO-3 (parameters partitioned over the processes):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


__all__ = ["VLMRecipe", "build_vlm", "open_training_data", "run_vlm_recipe"]
