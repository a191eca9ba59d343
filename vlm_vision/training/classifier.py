"""The paper's classifier stages: pre-training with the MLP head, then fine-tuning at a higher resolution (Sec. 3.2).

A stage is data (:class:`ClassifierStage`): image size, head, epochs, learning rate, augmentation. Two functions do
the work, and other training code (the VLM's vision pre-training stage) calls them directly:

- :func:`prepare_classifier` turns an encoder or a classifier into the classifier a stage needs: the stage's
  resolution (position embeddings 2-D interpolated from the pre-trained grid, never re-initialised) and, for a new
  task or head type, a fresh head (the fine-tuning head is one zero-initialised D x K layer). The encoder weights are
  kept; with `share_encoder=True` the encoder module itself is shared, so training updates e.g. a VLM's tower.
- :func:`train_classifier` runs a stage on any labelled image data set through :func:`vlm_vision.training.train`,
  and :func:`evaluate_classifier` measures accuracy on any number of processes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import ImageClassificationDataset, load_easy_vqa, load_image_folder
from ..encoder.configuration_vit import CLASSIFIER_HEADS, VisionTransformerConfig
from ..encoder.modeling_vit import VisionTransformerForImageClassification, VisionTransformerModel
from ..export.encoder_folder import save_checkpoint
from .loop import TrainingArguments, TrainResult, make_accelerator, process_state, train
from .optim import OptimizerConfig
from .schema import read_recipe

logger = logging.getLogger(__name__)

# The classifier's parts for per-part learning rates: the new head may learn faster than the pre-trained encoder.
CLASSIFIER_PARTS = {"head": ["classifier", "pre_logits"], "encoder": "vit"}


@dataclass
class ClassifierStage:
    """One classifier training stage, as data (see `configs/classifier/*.json`).

    Attributes:
        name: the stage's folder under the run's output folder ("pretrain", "finetune").
        data: where `run_recipe` takes the images from: "easy-vqa" (built in) or an image folder (one sub-folder per
            class; with `train/` and `val/` or `test/` inside, those are the splits, else 10% is held out).
        task: which labels of the data set (for easy-VQA: "shape", "color", "shape_color").
        image_size: training and evaluation resolution; the position embeddings are resampled to its grid.
        head: "mlp" (pre-training head: hidden layer + tanh) or "linear" (fine-tuning head, zero-initialised).
        num_epochs, max_steps, batch_size, gradient_accumulation_steps, max_grad_norm: see `TrainingArguments`.
        horizontal_flip: augmentation (random horizontal flips).
        train_subset: train on a seeded random subset of this many images (the paper's "smaller task"); None: all.
        optimizer: AdamW, learning rates per part (`head`, `encoder`) and the warm-up/cosine schedule.
    """

    name: str = "pretrain"
    data: str = "easy-vqa"
    task: str = "shape_color"
    image_size: int = 32
    head: str = "mlp"
    num_epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    horizontal_flip: bool = True
    train_subset: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        if isinstance(self.optimizer, dict):
            self.optimizer = OptimizerConfig(**self.optimizer)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise TypeError(f"optimizer must be an OptimizerConfig or a dict of its fields, got {self.optimizer!r}.")
        if not isinstance(self.name, str) or not self.name or self.name in (".", "..") or "/" in self.name:
            raise ValueError(f"name={self.name!r}: a stage's name is its folder under the run folder, e.g. 'pretrain'.")
        for name in ("data", "task"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-empty string.")
        if self.head not in CLASSIFIER_HEADS:
            raise ValueError(f"head={self.head!r}; choose 'mlp' (pre-training) or 'linear' (fine-tuning).")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size={self.image_size!r} must be a positive int.")
        if not isinstance(self.horizontal_flip, bool):
            raise ValueError(f"horizontal_flip={self.horizontal_flip!r} must be true or false.")
        if self.train_subset is not None and (
            isinstance(self.train_subset, bool) or not isinstance(self.train_subset, int) or self.train_subset <= 0
        ):
            raise ValueError(f"train_subset={self.train_subset!r} must be a positive int or None.")
        TrainingArguments.for_stage(self, "")  # the schedule fields (epochs, batch size, ...), checked now, not at run
        if not self.optimizer.parts:
            self.optimizer.parts = dict(CLASSIFIER_PARTS)

    def training_arguments(self, output_dir: str, **overrides) -> TrainingArguments:
        """This stage's `TrainingArguments` (run-level settings such as `resume` or `save_every_steps` as overrides)."""
        return TrainingArguments.for_stage(self, output_dir, **overrides)


def prepare_classifier(
    model: VisionTransformerModel | VisionTransformerForImageClassification | VisionTransformerConfig,
    *,
    image_size: int,
    head: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    share_encoder: bool = False,
) -> VisionTransformerForImageClassification:
    """The classifier for a stage, from a config (fresh weights), an encoder or a classifier.

    - Resolution: the position embeddings are resampled to `image_size`'s patch grid (2-D interpolation, Sec. 3.2,
      in the config's `interpolation_mode`); nothing else depends on the image size.
    - Head: kept when `model` is a classifier with the same head type and labels; otherwise a new head of type
      `head` with `num_labels` outputs. Its last layer is zero-initialised, so the fine-tuning starts from uniform
      predictions and the pre-trained features.

    Args:
        share_encoder: use `model`'s encoder module itself (no copy) when the resolution is unchanged, so training
            the classifier trains that encoder (e.g. a VLM's vision tower pre-trained as a classifier).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels={num_labels!r} must be a positive int (the number of classes).")
    if id2label is not None and sorted(id2label) != list(range(num_labels)):
        raise ValueError(
            f"id2label has the labels {sorted(id2label)[:10]} but num_labels={num_labels}: give one name per label "
            f"0..{num_labels - 1}."
        )
    if not isinstance(share_encoder, bool):
        raise TypeError(f"share_encoder must be True or False, got {share_encoder!r}.")
    if isinstance(model, VisionTransformerConfig):
        config = VisionTransformerConfig(
            **{
                **model.to_dict(),
                "image_size": image_size,
                "classifier_head": head,
                "num_labels": num_labels,
                "id2label": id2label,
            }
        )
        return VisionTransformerForImageClassification(config)
    if isinstance(model, VisionTransformerForImageClassification):
        encoder, old_head = model.vit, model
    elif isinstance(model, VisionTransformerModel):
        encoder, old_head = model, None
    else:
        raise TypeError(
            f"prepare_classifier takes a VisionTransformerConfig, VisionTransformerModel or "
            f"VisionTransformerForImageClassification, got {type(model).__name__}."
        )
    if share_encoder and encoder.config.image_size_hw != (image_size, image_size):
        raise ValueError(
            f"share_encoder=True needs the encoder's own image_size {encoder.config.image_size_hw}, got image_size="
            f"{image_size}: a shared tower keeps its position embeddings. Train at its size, or share_encoder=False."
        )
    config_dict = encoder.config.to_dict()
    config_dict.update(image_size=image_size, classifier_head=head, num_labels=num_labels)
    if id2label is not None:
        config_dict.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path"):
        config_dict.pop(key, None)
    config = VisionTransformerConfig(**config_dict)
    classifier = VisionTransformerForImageClassification(config).to(encoder.device)

    state = encoder.state_dict()
    key = "embeddings.position_embeddings"
    old_grid, new_grid = encoder.config.grid_size, config.grid_size
    if old_grid != new_grid:
        with torch.no_grad():
            state[key] = encoder.embeddings.position_embeddings_for(new_grid).detach().clone()
        logger.info(
            "Position embeddings resampled from grid %s to %s (%s).", old_grid, new_grid, config.interpolation_mode
        )
    if share_encoder:
        classifier.vit = encoder  # its own config stays as it is: the classifier's config holds the head
    else:
        classifier.vit.load_state_dict(state)
    same_head = (
        old_head is not None and old_head.config.classifier_head == head and old_head.config.num_labels == num_labels
    )
    if same_head:
        if old_head.pre_logits is not None:
            classifier.pre_logits.load_state_dict(old_head.pre_logits.state_dict())
        classifier.classifier.load_state_dict(old_head.classifier.state_dict())
    return classifier


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
    mixed_precision: str = "auto",
) -> dict[str, float]:
    """Top-1 accuracy of `model` (`model(pixel_values=...).logits`) on `dataset`, over all processes.

    Without `accelerator`, one is made with `mixed_precision` (which must match the process's earlier accelerators:
    accelerate fixes it once per process).

    Returns:
        `{"accuracy": ..., "num_images": ...}` (every image counted once, whatever the number of processes).
    """
    accelerator = accelerator or make_accelerator(TrainingArguments(mixed_precision=mixed_precision))
    loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))
    was_training = model.training
    model.eval().to(accelerator.device)
    correct = total = 0
    for batch in loader:
        with accelerator.autocast():
            logits = model(pixel_values=batch["pixel_values"]).logits
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "num_images": total}


@dataclass
class StageResult:
    """A stage's trained classifier and its figures."""

    model: VisionTransformerForImageClassification
    train: TrainResult
    metrics: dict[str, float] = field(default_factory=dict)


def train_classifier(
    model: VisionTransformerForImageClassification,
    train_dataset,
    stage: ClassifierStage,
    args: TrainingArguments,
    *,
    eval_dataset=None,
    eval_batch_size: int = 256,
    accelerator: Accelerator | None = None,
) -> StageResult:
    """Train `model` (already prepared for the stage, see :func:`prepare_classifier`) on `train_dataset`.

    Data sets that support it (:class:`vlm_vision.data.ImageClassificationDataset`) are set to the stage's image
    size and augmentation; a `train_subset` is taken here. Any map-style data set of
    `{"pixel_values", "labels"}` items works. Returns the model with the eval accuracy in `metrics`.
    """
    expected = model.config.image_size_hw
    if hasattr(train_dataset, "with_options"):
        train_dataset = train_dataset.with_options(image_size=stage.image_size, horizontal_flip=stage.horizontal_flip)
        if eval_dataset is not None:
            eval_dataset = eval_dataset.with_options(image_size=stage.image_size, horizontal_flip=False)
    if expected != (stage.image_size, stage.image_size):
        raise ValueError(
            f"The model is configured for {expected} images but the stage trains at {stage.image_size}: call "
            "prepare_classifier(model, image_size=stage.image_size, ...) first."
        )
    if stage.train_subset is not None:
        if not hasattr(train_dataset, "subset"):
            raise ValueError("train_subset needs a data set with subset(n, seed) (ImageClassificationDataset).")
        train_dataset = train_dataset.subset(stage.train_subset, args.seed)
    fingerprint_extra = {"stage": stage.name}
    result = train(
        model,
        train_dataset,
        args,
        stage.optimizer,
        accelerator=accelerator,
        fingerprint_extra=fingerprint_extra,
        tracker_config={"stage": stage.name, "image_size": stage.image_size, "head": stage.head},
    )
    metrics = {}
    if eval_dataset is not None and result.finished:
        metrics = evaluate_classifier(
            result.model, eval_dataset, batch_size=eval_batch_size, mixed_precision=args.mixed_precision
        )
    return StageResult(model=result.model, train=result, metrics=metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: a model and a sequence of stages, as in configs/classifier/*.json
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierRecipe:
    """A model and its stages (pre-training, then fine-tuning, ...), as data.

    Attributes:
        model: `VisionTransformerConfig` fields of the encoder (its `image_size` is set by each stage).
        stages: trained in order; each starts from the previous stage's encoder (Sec. 3.2).
        seed: the model's initialisation, data order, subsets and augmentation.
        eval_batch_size: batch size of the accuracy evaluations.
        baseline_from_scratch: also train the last stage from a fresh model with the same steps, to measure what
            the earlier stages bring.
    """

    model: dict = field(default_factory=dict)
    stages: list[ClassifierStage] = field(default_factory=list)
    seed: int = 0
    eval_batch_size: int = 256
    baseline_from_scratch: bool = False

    def __post_init__(self):
        self.stages = [ClassifierStage(**s) if isinstance(s, dict) else s for s in self.stages]
        if not self.stages:
            raise ValueError("A recipe needs at least one stage.")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Stage names {names} must be unique: each is a folder of the run.")
        VisionTransformerConfig(**{**self.model, "image_size": self.stages[0].image_size})  # validate early

    @classmethod
    def from_json(cls, path) -> ClassifierRecipe:
        """A recipe from a JSON file (configs/classifier/*.json); unknown keys are refused with the known ones."""
        raw = read_recipe(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"description"})
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {unknown}; a recipe has {sorted(known)}.")
        stage_fields = {f.name for f in fields(ClassifierStage)}
        if not isinstance(raw.get("stages", []), list) or not all(isinstance(x, dict) for x in raw.get("stages", [])):
            raise ValueError(f"{path}: stages must be a list of objects (one per stage).")
        for stage in raw.get("stages", []):
            bad = sorted(set(stage) - stage_fields)
            if bad:
                raise ValueError(f"{path}: stage {stage.get('name')!r} has unknown keys {bad}; see ClassifierStage.")
        raw.pop("description", None)
        return cls(**raw)


def load_stage_data(stage: ClassifierStage, seed: int = 0, on_error: str = "raise"):
    """(train, eval) `ImageClassificationDataset`s for a stage's `data` and `task`."""
    if stage.data == "easy-vqa":
        train_images, eval_images = load_easy_vqa("train", stage.task), load_easy_vqa("test", stage.task)
    else:
        root = Path(stage.data)
        held_out = next((root / n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
        if (root / "train").is_dir() and held_out is not None:
            train_images = load_image_folder(root / "train")
            eval_images = load_image_folder(held_out, class_names=train_images.class_names)
        else:
            train_images, eval_images = load_image_folder(root).split(0.1, seed)
    make = lambda images: ImageClassificationDataset(images, stage.image_size, seed=seed, on_error=on_error)  # noqa: E731
    return make(train_images), make(eval_images)


def run_recipe(
    recipe: ClassifierRecipe,
    output_dir: str,
    *,
    resume: bool = False,
    save_every_steps: int | None = None,
    stop_after_steps: int | None = None,
    report_to: list[str] | None = None,
    progress_bar: bool = True,
    on_bad_image: str = "raise",
    mixed_precision: str = "auto",
) -> list[dict]:
    """Run every stage of `recipe` under `output_dir/<stage name>/`; returns one row of figures per stage.

    Each stage (:func:`run_classifier_stage`): prepare the model (resolution, head), measure accuracy before, train,
    measure after, and save the classifier as a checkpoint folder `output_dir/<stage>/model` (loadable with
    `AutoModelForImageClassification`). With `resume`, finished stages (their model folder exists) are loaded
    instead of retrained and the running stage continues from its latest checkpoint. Call on every process (under
    `accelerate launch`).
    """
    run = _ClassifierRun(
        recipe,
        Path(output_dir),
        resume=resume,
        on_bad_image=on_bad_image,
        options={
            "seed": recipe.seed,
            "report_to": list(report_to or []),
            "progress_bar": progress_bar,
            "mixed_precision": mixed_precision,
        },
        checkpointing={
            "save_every_steps": save_every_steps,
            "stop_after_steps": stop_after_steps,
            "resume": "latest" if resume else None,
        },
    )
    for number, stage in enumerate(recipe.stages):
        baseline = recipe.baseline_from_scratch and number == len(recipe.stages) - 1 and number > 0
        if not run_classifier_stage(run, stage, baseline):
            break
    return run.rows


@dataclass
class _ClassifierRun:
    """What the stages of one classifier run share and hand on."""

    recipe: ClassifierRecipe
    out: Path
    resume: bool
    on_bad_image: str
    options: dict  # the loop's run-level arguments of every training (seed, trackers, progress bar, precision)
    checkpointing: dict  # and those of the recipe's own stages only, not the baseline's (saving, stopping, resuming)
    rows: list[dict] = field(default_factory=list)
    model: VisionTransformerForImageClassification | None = None  # the last stage's, handed to the next

    @property
    def process(self):
        return process_state()


def run_classifier_stage(run: _ClassifierRun, stage: ClassifierStage, baseline: bool) -> bool:
    """One stage: the previous stage's classifier (or a fresh one) prepared for it, its accuracy before and after
    training, with `baseline` the same stage trained from scratch, and the result saved; False if it stopped early."""
    recipe, stage_dir = run.recipe, run.out / stage.name
    train_data, eval_data = load_stage_data(stage, recipe.seed, run.on_bad_image)
    id2label = dict(enumerate(train_data.class_names))
    final_dir, metrics_file = stage_dir / "model", stage_dir / "metrics.json"
    if run.resume and (final_dir / "config.json").is_file() and metrics_file.is_file():
        run.model = VisionTransformerForImageClassification.from_pretrained(final_dir)
        run.rows.append(json.loads(metrics_file.read_text()))
        logger.info("Stage %s already finished: loaded %s", stage.name, final_dir)
        return True
    set_seed(recipe.seed)
    source = run.model if run.model is not None else VisionTransformerConfig(**recipe.model)
    model = prepare_classifier(
        source, image_size=stage.image_size, head=stage.head, num_labels=len(id2label), id2label=id2label
    )
    eval_data = eval_data.with_options(image_size=stage.image_size)
    before = evaluate_classifier(
        model, eval_data, batch_size=recipe.eval_batch_size, mixed_precision=run.options["mixed_precision"]
    )["accuracy"]
    args = stage.training_arguments(str(stage_dir), **run.checkpointing, **run.options)
    result = train_classifier(
        model, train_data, stage, args, eval_dataset=eval_data, eval_batch_size=recipe.eval_batch_size
    )
    run.model = result.model
    if not result.train.finished:
        logger.info("Stage %s stopped at step %d (stop_after_steps).", stage.name, result.train.state.global_step)
        return False
    row = {
        "stage": stage.name,
        "task": stage.task,
        "data": stage.data,
        "image_size": stage.image_size,
        "head": stage.head,
        "train_images": stage.train_subset or len(train_data),
        "eval_images": result.metrics["num_images"],
        "steps": result.train.num_training_steps,
        "train_seconds": round(result.train.train_seconds, 1),
        "samples_per_second": round(result.train.samples_per_second, 1),
        "accuracy_before": round(before, 4),
        "accuracy_after": round(result.metrics["accuracy"], 4),
    }
    if baseline:
        row["accuracy_from_scratch"] = round(train_from_scratch(run, stage, train_data, eval_data, id2label), 4)
    if run.process.is_main_process:
        save_stage(run.model, stage, row, final_dir, metrics_file)
    run.process.wait_for_everyone()
    run.rows.append(row)
    return True


def train_from_scratch(
    run: _ClassifierRun, stage: ClassifierStage, train_data, eval_data, id2label: dict[int, str]
) -> float:
    """The baseline: `stage` trained from a fresh model with the same steps (under `<stage>/from_scratch`, never
    resumed or stopped early); returns its accuracy, to measure what the earlier stages bring."""
    set_seed(run.recipe.seed)
    scratch = prepare_classifier(
        VisionTransformerConfig(**run.recipe.model),
        image_size=stage.image_size,
        head=stage.head,
        num_labels=len(id2label),
        id2label=id2label,
    )
    args = stage.training_arguments(str(run.out / stage.name / "from_scratch"), **run.options)
    baseline = train_classifier(
        scratch, train_data, stage, args, eval_dataset=eval_data, eval_batch_size=run.recipe.eval_batch_size
    )
    return baseline.metrics["accuracy"]


def save_stage(
    model: VisionTransformerForImageClassification, stage: ClassifierStage, row: dict, final_dir: Path, metrics_file
) -> None:
    """The stage's classifier as a checkpoint folder with a model card holding its figures, and `metrics.json`."""
    summary = (
        f"Stage `{stage.name}` of a vlm-vision classifier recipe: {stage.head} head, {stage.task} on "
        f"{stage.data} at {stage.image_size}x{stage.image_size}; test accuracy {row['accuracy_after']:.4f}."
    )
    sections = {"Training": "```json\n" + json.dumps(row, indent=2) + "\n```"}
    save_checkpoint(
        model,
        final_dir,
        title=f"{stage.name} ({stage.task})",
        summary=summary,
        sections=sections,
        overwrite=True,
    )
    metrics_file.write_text(json.dumps(row, indent=2))
