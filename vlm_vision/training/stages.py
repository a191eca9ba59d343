"""The stages of a VLM recipe, as data: what each kind trains, and how a stage's fields are checked.

What trains is a table (`STAGE_KINDS`), named as LLaVA names its stages:

| kind | trains | LLaVA |
|---|---|---|
| `vision_pretrain` | the tower, as an image classifier (the classifier code itself) | - |
| `pretrain` (or `align`) | the adapter | stage 1, `pretrain.sh` |
| `finetune` | the adapter and the language model (tower frozen) | stage 2, `finetune.sh` |
| `full` | the adapter, the language model and the tower | - |

`lora` turns sides into LoRA: `"lm"`, `"vision"`, `"both"`, or a dict `{"lm": {"r", "alpha", "dropout",
"target_modules"}, "vision": {...}}`; a side named there trains its LoRA weights only (and is added to the kind's
sides if it is not among them), so LLaVA's `finetune_lora.sh` is `{"kind": "finetune", "lora": {"lm": {"r": 128,
"alpha": 256}}}`. Parts past the tower's feature layer never train (they never get a gradient).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatch

from torch import nn

from ..vlm.lora import LM_TARGETS, LORA_PRESETS, VISION_TARGETS, LoraPreset, LoraSide, apply_lora, parameter_table
from .loop import TrainingArguments
from .optim import OptimizerConfig
from .schema import check_keys

logger = logging.getLogger(__name__)

# kind -> the VLM's sides it trains (None: the tower as a classifier, with the classifier code)
STAGE_KINDS = {
    "vision_pretrain": None,
    "pretrain": ("adapter",),
    "align": ("adapter",),
    "finetune": ("adapter", "lm"),
    "full": ("adapter", "lm", "vision"),
}
LORA_SIDE_KEYS = ("r", "alpha", "dropout", "target_modules")
# The optimizer's parts: fnmatch patterns over parameter names, with or without peft's "base_model.model." prefix.
VLM_PARTS = {
    "adapter": "*adapter.*",
    "lm": "*language_model.*",
    "lm_lora": "*language_model.*lora_*",
    "vision": "*vision_tower.*",
    "vision_lora": "*vision_tower.*lora_*",
    "aux_head": "aux_head.*",
}
# what a VLM stage may set in its `data` (merged over the recipe's `data`)
STAGE_DATA_KEYS = (
    "name",
    "train",
    "image_folder",
    "train_subset",
    "num_workers",
    "group_by_length",
    "on_error",
    "cache",
    "packing",
    "questions_per_sample",
    "separate_questions",
    "shown_fraction",
    "rewrite_shown_fraction",
    "negated_questions",
)


@dataclass
class VLMStage:
    """One stage of a VLM recipe.

    Attributes:
        name: the stage's folder under the run's output folder.
        kind: one of `STAGE_KINDS` (see the module docstring for what each trains).
        lora: the sides trained through LoRA: "lm", "vision", "both", or `{"lm": {...}, "vision": {...}}` with
            `r`, `alpha`, `dropout` and `target_modules` (leaf names, scoped to that side) per side.
        init_from: start from the result of another stage of this recipe (its name; it must have run before), or a
            folder: a projector (`projector_config.json`, e.g. `<run>/<stage>/projector`) or a saved VLM, whose
            adapter weights are loaded (they must have the same shapes). None: continue from the previous stage.
        num_epochs, max_steps, batch_size, gradient_accumulation_steps, max_grad_norm: see `TrainingArguments`;
            `batch_size` is the global batch of one optimizer step, in conversations.
        per_device_batch_size: conversations per process and micro-batch; the accumulation is then derived from
            `batch_size` and the number of processes (LLaVA's per-device batch x GPUs x accumulation = global).
        chat_template: render this stage's conversations with this template ("plain": LLaVA's stage-1 format;
            None: the language model's own).
        horizontal_flip: flip a random half of the images (answers that are flip-invariant only).
        aux_classification_weight: weight of the tower's classification loss (needs `vision_pretrain` first).
        freeze_vision: for `full`: keep the tower frozen (the same as `finetune`).
        cache_features: run the frozen tower once over the stage's images (their flips too with `horizontal_flip`)
            and train from its features on disk (`vlm_vision.vlm.feature_cache.FeatureStore`, memory-mapped), instead of
            running it every step: `true` (float32) or `"float16"`. Only for stages that keep the tower frozen.
        optimizer: AdamW and the per-part learning rates (`adapter`, `lm`, `lm_lora`, `vision`, `vision_lora`).
        classifier: for `vision_pretrain`: the `ClassifierStage` fields (task, image size, epochs, ...).
        data: overrides of the recipe's `data` for this stage (`STAGE_DATA_KEYS`): its own file and image folder
            (LLaVA's captions for `pretrain`, the instruction mix for `finetune`), workers, easy-VQA options.
            Evaluation reads the recipe's `data`.
    """

    name: str
    kind: str
    lora: str | dict | None = None
    init_from: str | None = None
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    chat_template: str | None = None
    horizontal_flip: bool = False
    aux_classification_weight: float = 0.0
    freeze_vision: bool = False
    cache_features: bool | str = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    classifier: dict | None = None
    data: dict | None = None

    def __post_init__(self):
        where = f"Stage {self.name!r}"
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; use one of {list(STAGE_KINDS)}.")
        if self.kind == "vision_pretrain":
            if not self.classifier:
                raise ValueError(f"{where}: vision_pretrain needs a 'classifier' section (ClassifierStage fields).")
            for name in ("lora", "init_from", "data", "chat_template"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{where}: vision_pretrain reads its settings from 'classifier', not {name!r}.")
        self.lora_preset()  # validates
        if self.freeze_vision and self.kind != "full":
            raise ValueError(
                f"{where}: freeze_vision is for full stages (pretrain and finetune keep the tower frozen already); "
                f"{self.kind} stages don't take it."
            )
        if self.aux_classification_weight < 0:
            raise ValueError(f"{where}: aux_classification_weight={self.aux_classification_weight} must be >= 0.")
        if self.aux_classification_weight and "vision" not in self.trained_sides():
            raise ValueError(
                f"{where}: the auxiliary classification loss trains the tower, which this stage keeps frozen: set "
                "aux_classification_weight to 0, or use a stage that trains the tower (full, or lora on vision)."
            )
        if self.cache_features not in (False, True, "float16", "float32"):
            raise ValueError(f"{where}: cache_features={self.cache_features!r}; use true, false or 'float16'.")
        if self.cache_features and "vision" in self.trained_sides():
            raise ValueError(
                f"{where}: cache_features needs a frozen tower (its features must not change), but this {self.kind} "
                "stage trains it: drop cache_features, or keep the tower frozen (freeze_vision, finetune, pretrain)."
            )
        if self.per_device_batch_size is not None and (
            not isinstance(self.per_device_batch_size, int) or self.per_device_batch_size <= 0
        ):
            raise ValueError(f"{where}: per_device_batch_size={self.per_device_batch_size!r} must be a positive int.")
        if self.data is not None:
            check_keys(self.data, STAGE_DATA_KEYS, f"{where}: data")
        if isinstance(self.optimizer, dict):  # the VLM's parts before OptimizerConfig checks learning_rates' names
            self.optimizer = OptimizerConfig(**{"parts": dict(VLM_PARTS), **self.optimizer})
        if not self.optimizer.parts:
            self.optimizer.parts = dict(VLM_PARTS)

    def lora_preset(self) -> LoraPreset | None:
        """The stage's LoRA as a preset (None without LoRA)."""
        if self.lora is None:
            return None
        where = f"Stage {self.name!r}: lora"
        if isinstance(self.lora, str):
            if self.lora not in LORA_PRESETS:
                raise ValueError(f"{where}={self.lora!r}; use one of {sorted(LORA_PRESETS)} or a dict per side.")
            return LORA_PRESETS[self.lora]()
        check_keys(self.lora, ("lm", "vision"), where)
        sides = {}
        for side, targets in (("lm", LM_TARGETS), ("vision", VISION_TARGETS)):
            options = self.lora.get(side)
            if options is None:
                continue
            check_keys(options, LORA_SIDE_KEYS, f"{where}.{side}")
            modules = options.get("target_modules", targets)
            sides[side] = LoraSide(
                r=options.get("r", 16),
                alpha=options.get("alpha", 2 * options.get("r", 16)),
                dropout=options.get("dropout", 0.05),
                targets=tuple([modules] if isinstance(modules, str) else modules),
            )
        if not sides:
            raise ValueError(f"{where}: name at least one side, 'lm' or 'vision'.")
        return LoraPreset(lm=sides.get("lm"), vision=sides.get("vision"))

    def trained_sides(self) -> tuple[str, ...]:
        """The VLM's sides this stage trains (`adapter`, `lm`, `vision`), LoRA sides included."""
        sides = set(STAGE_KINDS[self.kind] or ())
        if self.freeze_vision:
            sides.discard("vision")
        preset = self.lora_preset()
        if preset is not None:
            sides |= {s for s, part in (("lm", preset.lm), ("vision", preset.vision)) if part is not None}
        return tuple(s for s in ("adapter", "lm", "vision") if s in sides)

    def training_arguments(self, output_dir: str, **overrides) -> TrainingArguments:
        return TrainingArguments.for_stage(self, output_dir, **overrides)


def set_trainable(model: nn.Module, stage: VLMStage) -> nn.Module:
    """Freeze what `stage` does not train; return the model to train (a peft model when the stage has LoRA)."""
    sides = stage.trained_sides()
    preset = stage.lora_preset()
    base = model
    model.requires_grad_(False)
    if preset is not None:
        model = apply_lora(model, preset)  # LoRA weights only, and the adapter fully (peft's modules_to_save)
    else:
        base.adapter.requires_grad_(True)
    fully = {"lm": base.language_model, "vision": base.vision_tower}
    for side in sides:
        if side in fully and (preset is None or getattr(preset, side) is None):
            fully[side].requires_grad_(True)
    base.freeze_unused_vision_parameters()
    logger.info("stage %s (%s) trains %s:\n%s", stage.name, stage.kind, ", ".join(sides), parameter_table(model))
    return model


def stage_optimizer(stage: VLMStage, model: nn.Module) -> OptimizerConfig:
    """The stage's optimizer config with only the parts that name trainable parameters of `model` (a stage that
    freezes the tower has no `vision` part to give a learning rate to)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = {k: v for k, v in stage.optimizer.parts.items() if any(fnmatch(n, v) for n in names)}
    rates = {k: v for k, v in stage.optimizer.learning_rates.items() if k in parts or k == "default"}
    return replace(stage.optimizer, parts=parts, learning_rates=rates)


def stage_summary(stage: VLMStage) -> dict:
    return {k: v for k, v in asdict(stage).items() if v is not None}


__all__ = [
    "STAGE_DATA_KEYS",
    "STAGE_KINDS",
    "VLM_PARTS",
    "VLMStage",
    "set_trainable",
    "stage_optimizer",
    "stage_summary",
]
