"""Running a VLM recipe (`configs/vlm/*.json`, read into `vlm_schema.VLMRecipe`), stage after stage.

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

`run_vlm_recipe` is a straight loop over one function per stage kind (`run_vision_pretrain`, `run_vlm_stage`), then
`finish`; the recipe's schema is in `vlm_schema`, its data in `vlm_data`, the parts it builds in `vlm_parts`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from ..adapters import CONFIG_NAME as PROJECTOR_CONFIG
from ..adapters import Adapter
from ..data.dataset import VLMCollator, VLMDataset
from ..data.easy_vqa import EasyVQAImageLabel
from ..encoder.modeling_vit import VisionTransformerForImageClassification
from ..evaluation.generation import evaluate_samples
from ..export.folders import save_folder_atomically
from ..export.model_card import write_vlm_card
from ..vlm.feature_cache import FeatureStore
from ..vlm.modeling_vlm import PACKING_VARLEN_ATTENTION, VisionLanguageForConditionalGeneration, check_packing_attention
from ..vlm.packed_attention import SDPA_VARLEN
from ..vlm.processing_vlm import (
    VisionLanguageProcessor,
    resolve_chat_template,
)
from .classifier import ClassifierStage, load_stage_data, prepare_classifier, train_classifier
from .loop import TrainingArguments, make_accelerator, process_state, train
from .schema import from_dict
from .stages import VLMStage, set_trainable, stage_optimizer, stage_summary
from .vlm import VLMLoss, WithAuxiliaryClassifier, count_supervised, save_json
from .vlm_data import load_eval_samples, open_training_data
from .vlm_parts import build_tower, build_vlm, fresh_tower_config
from .vlm_schema import VLMRecipe

logger = logging.getLogger(__name__)

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
            start = build_tower(recipe, None)[0] if recipe.vision.get("path") else fresh_tower_config(recipe)
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
    attention, flatten = run.model.language_model.config._attn_implementation, False
    if data.get("packing"):  # before any data is read
        flatten = packing_attention(run.model.language_model, stage.name, recipe.max_length)
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
    try:
        result = train(
            trainable,
            dataset,
            args,
            stage_optimizer(stage, trainable),
            collate_fn=VLMCollator(
                run.processor, pack_length=recipe.max_length if data.get("packing") else None, flatten=flatten
            ),
            compute_loss=loss,
            count_items=count_supervised,
            accelerator=run.accelerator,
            fingerprint_extra={"stage": stage_summary(stage), "recipe": resume_identity(recipe, stage)},
            **grouping,
        )
    finally:  # packing's choice of attention was for this stage
        if run.model.language_model.config._attn_implementation != attention:
            run.model.language_model.set_attn_implementation(attention)
    skipped = loss.all_skipped()
    if not result.finished:
        return False
    trained = result.model.vlm if use_aux else result.model
    # saved from the full state dict the loop gathered (the module is whole too, on every process)
    state_dict = _within(result.state_dict, "vlm.") if use_aux else result.state_dict
    if stage.lora is not None:  # merged on whole weights (FSDP2 and ZeRO-3 gathered them after training)
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


def packing_attention(language_model, stage_name: str, row_length: int) -> bool:
    """Check the LM's attention can keep packed conversations apart, moving sdpa to `"sdpa_varlen"` (the same
    attention, per conversation instead of through a block-diagonal mask); log the layout. Returns whether the
    collator flattens each batch into one row (attention per conversation: no padding at all)."""
    if language_model.config._attn_implementation == "sdpa":
        language_model.set_attn_implementation(SDPA_VARLEN)
    attention = language_model.config._attn_implementation
    check_packing_attention(attention)
    if attention in PACKING_VARLEN_ATTENTION:
        logger.info(
            "stage %s: conversations packed into one row per batch, %s attention per conversation (each at most %d "
            "tokens)", stage_name, attention, row_length,
        )  # fmt: skip
        return True
    logger.info("stage %s: conversations packed into rows of up to %d tokens (%s)", stage_name, row_length, attention)
    return False


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


__all__ = ["VLMRecipe", "build_vlm", "open_training_data", "run_vlm_recipe"]
