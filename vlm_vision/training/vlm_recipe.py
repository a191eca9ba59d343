"""A VLM recipe as data (`configs/vlm/*.json`) and the function that runs it, stage after stage.

    recipe -> data (easy-VQA or a LLaVA JSON) -> tokenizer (sentencepiece trained on the conversations as the
              chat template renders them, or the LM's own)
           -> vision_pretrain stage(s) (the classifier code) -> VLM = tower + adapter + LM
           -> align / finetune / full stages
           -> evaluation (greedy answers, exact match by question type) -> final folders and model card

Each stage's result is saved (`<out>/<stage>/model`); with `resume`, finished stages are loaded and the running one
continues exactly from its last atomic checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..checkpoint import image_processor_for, replace_directory_atomically
from ..configuration_vlm_vit import VisionTransformerConfig
from ..data.conversations import VLMSample, read_easy_vqa, read_llava
from ..modeling_vlm import VisionLanguageForConditionalGeneration
from ..modeling_vlm_vit import VisionTransformerForImageClassification, VisionTransformerModel
from ..processing_vlm import IMAGE_TOKEN, VisionLanguageProcessor
from ..tokenizer import chat_texts, train_sentencepiece_tokenizer
from .classifier import ClassifierStage, load_stage_data, prepare_classifier, train_classifier
from .loop import process_state, train
from .vlm import (
    EncodedCollator,
    EncodedConversations,
    VLMStage,
    WithAuxiliaryClassifier,
    save_json,
    seeded_subset,
    set_trainable,
    stage_optimizer,
    stage_summary,
    vlm_loss,
    vqa_exact_match,
)

logger = logging.getLogger(__name__)


@dataclass
class VLMRecipe:
    """What to build and how to train it.

    Attributes:
        vision: `VisionTransformerConfig` fields of a fresh tower, or `{"path": folder}` of a saved encoder.
        language_model: `LlamaConfig` fields of a fresh tiny LM (its tokenizer is trained on the data), or
            `{"path": folder}` of any causal LM with its tokenizer.
        adapter: the adapter config (`vlm_vision.adapters`).
        vision_feature_layer: the tower layer(s) the adapter reads.
        keep_prefix_tokens: the tower's [CLS] goes to the LM too, as one more image token (after `vision_pretrain`
            with an auxiliary classification loss, it holds the image's class).
        data: `{"name": "easy-vqa", "questions_per_sample": k}` or `{"name": "llava", "train": json,
            "image_folder": dir, "eval": json}`; `train_subset`/`eval_subset` take seeded random subsets;
            `"separate_questions": true` trains each question of a one-image sample as its own sequence, the image
            encoded once for all of them (no question sees another's answer). easy-VQA, training only:
            `"shown_fraction": f` repeats the rare yes/no questions that name what the image shows to about that
            share; `"rewrite_shown_fraction": f` gets there by renaming the attribute of questions that name what
            it lacks (new pairs, not copies); `"negated_questions": false` leaves out "is there not a ...?".
        tokenizer: `{"vocab_size": n}` for the trained sentencepiece tokenizer.
        max_length: longest conversation in tokens (longer ones are dropped, never truncated).
        stages: `VLMStage`s, in order. `vision_pretrain` stages come first; each continues the tower of the one
            before (e.g. shape first, then shape x colour), and the last one's head is the auxiliary classifier.
    """

    vision: dict = field(default_factory=dict)
    language_model: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=lambda: {"adapter_type": "mlp"})
    vision_feature_layer: int | list[int] = -2
    keep_prefix_tokens: bool = False
    data: dict = field(default_factory=lambda: {"name": "easy-vqa", "questions_per_sample": 1})
    tokenizer: dict = field(default_factory=lambda: {"vocab_size": 512})
    max_length: int = 512
    stages: list[VLMStage] = field(default_factory=list)
    seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self):
        self.stages = [VLMStage(**s) if isinstance(s, dict) else s for s in self.stages]
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

    @classmethod
    def from_json(cls, path) -> VLMRecipe:
        raw = json.loads(Path(path).read_text())
        raw.pop("description", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {unknown}; a recipe has {sorted(known)}.")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)


def load_samples(data: dict, seed: int, evaluation: bool = True) -> tuple[list[VLMSample], list[VLMSample]]:
    """(train, eval) samples of the recipe's data; eval is empty with `evaluation=False`."""
    eval_samples = []
    if data.get("name") == "easy-vqa":
        train_samples, report = read_easy_vqa(
            "train",
            questions_per_sample=data.get("questions_per_sample", 1),
            shown_fraction=data.get("shown_fraction"),
            rewrite_shown_fraction=data.get("rewrite_shown_fraction"),
            negated_questions=data.get("negated_questions", True),
            seed=seed,
        )
        if evaluation:
            eval_samples, _ = read_easy_vqa("test", questions_per_sample=1)
    elif data.get("name") == "llava":
        only_easy_vqa = sorted(set(data) & {"shown_fraction", "rewrite_shown_fraction", "negated_questions"})
        if only_easy_vqa:
            raise ValueError(
                f"data options {only_easy_vqa} are for the built-in easy-VQA questions (they read its yes/no "
                "questions); remove them for LLaVA data."
            )
        train_samples, report = read_llava(data["train"], data["image_folder"])
        if evaluation and data.get("eval"):
            eval_samples, _ = read_llava(data["eval"], data["image_folder"])
    else:
        raise ValueError(f"data.name={data.get('name')!r}: use 'easy-vqa' (built in) or 'llava' (a LLaVA JSON).")
    report.log()
    train_samples = seeded_subset(train_samples, data.get("train_subset"), seed)
    return train_samples, seeded_subset(eval_samples, data.get("eval_subset"), seed)


def build_tokenizer(recipe: VLMRecipe, samples: list[VLMSample], folder: Path):
    """The LM's tokenizer, or a sentencepiece tokenizer trained on the training text (saved in `folder`)."""
    if "path" in recipe.language_model:
        return AutoTokenizer.from_pretrained(recipe.language_model["path"])
    process = process_state()
    if process.is_main_process and not (folder / "tokenizer.json").is_file():
        texts = chat_texts(s.messages for s in samples)  # what the LM reads, the chat template's markup included
        train_sentencepiece_tokenizer(texts, vocab_size=recipe.tokenizer.get("vocab_size", 512)).save_pretrained(folder)
    process.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)


def build_vlm(recipe: VLMRecipe, tower: VisionTransformerModel, tokenizer) -> VisionLanguageForConditionalGeneration:
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if "path" in recipe.language_model:
        language_model = AutoModelForCausalLM.from_pretrained(recipe.language_model["path"])
    else:
        fields_ = {"tie_word_embeddings": True, "max_position_embeddings": recipe.max_length, **recipe.language_model}
        language_model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), **fields_))
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    return VisionLanguageForConditionalGeneration.from_parts(
        tower,
        language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        adapter_config=recipe.adapter,
        vision_feature_layer=recipe.vision_feature_layer,
        keep_prefix_tokens=recipe.keep_prefix_tokens,
    )


def write_vlm_card(folder: Path, recipe: VLMRecipe, rows: list[dict], evaluation: dict | None, model) -> None:
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["vision", "vlm-vision", "vision-language-model"],
        datasets=["easy-vqa"] if recipe.data.get("name") == "easy-vqa" else None,
    )
    accuracy = ""
    if evaluation:
        accuracy = "\n".join(f"| {k} | {v:.4f} |" for k, v in evaluation["accuracy"].items())
        header = f"Greedy answers, exact match, {evaluation['num_samples']} questions:"
        accuracy = f"{header}\n\n| | accuracy |\n|---|---|\n{accuracy}"
    stages = "\n".join(
        f"| {r['stage']} | {r['kind']} | {r.get('steps', '')} | {r.get('train_seconds', '')} |" for r in rows
    )
    body = (
        f"# A vision-language model trained with vlm-vision\n\n"
        f"{model.num_parameters():,} parameters: our ViT tower, a `{recipe.adapter['adapter_type']}` adapter and a "
        f"causal LM. Load with `import vlm_vision` then `AutoModelForImageTextToText.from_pretrained(path)` and "
        f"`AutoProcessor.from_pretrained(path)`.\n\n## Evaluation\n\n{accuracy or 'not evaluated'}\n\n"
        f"## Training\n\n| stage | kind | steps | seconds |\n|---|---|---|---|\n{stages}\n\n"
        f"## Recipe\n\n```json\n{json.dumps(recipe.to_dict(), indent=2, default=str)}\n```\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def save_vlm(model, processor, folder: Path) -> None:
    """Save a VLM and its processor into `folder` atomically (a temporary sibling, then a rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        replace_directory_atomically(staging, folder, overwrite=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    """Run every stage of `recipe` under `output_dir`; returns `{"stages": rows, "evaluation": metrics}`.

    Call it on every process (under `accelerate launch`); evaluation and the final folders are on the main process.
    """
    out = Path(output_dir)
    process = process_state()
    started = time.perf_counter()
    set_seed(recipe.seed)
    train_samples, eval_samples = load_samples(recipe.data, recipe.seed)
    tokenizer = build_tokenizer(recipe, train_samples, out / "tokenizer")
    rows, tower, aux_head, aux_labels, aux_task, model, processor = [], None, None, None, None, None, None
    classifier = None  # the tower as a classifier, from one vision_pretrain stage to the next
    run_args = {
        "seed": recipe.seed,
        "save_every_steps": save_every_steps,
        "stop_after_steps": stop_after_steps,
        "resume": "latest" if resume else None,
        "progress_bar": progress_bar,
        "mixed_precision": mixed_precision,
        "report_to": list(report_to or []),
    }
    for stage in recipe.stages:
        stage_dir = out / stage.name
        done = stage_dir / "model" / "config.json"
        if stage.kind == "vision_pretrain":
            classifier_stage = ClassifierStage(name=stage.name, **stage.classifier)
            if resume and done.is_file():
                classifier = VisionTransformerForImageClassification.from_pretrained(stage_dir / "model")
            else:
                set_seed(recipe.seed)
                train_data, eval_data = load_stage_data(classifier_stage, recipe.seed)
                id2label = dict(enumerate(train_data.class_names))
                classifier = prepare_classifier(
                    classifier if classifier is not None else VisionTransformerConfig(**recipe.vision),
                    image_size=classifier_stage.image_size,
                    head=classifier_stage.head,
                    num_labels=len(id2label),
                    id2label=id2label,
                )
                result = train_classifier(
                    classifier,
                    train_data,
                    classifier_stage,
                    classifier_stage.training_arguments(str(stage_dir), **run_args),
                    eval_dataset=eval_data,
                )
                if not result.train.finished:
                    return {"stages": rows, "evaluation": None, "stopped_in": stage.name}
                classifier = result.model
                rows.append(
                    {
                        "stage": stage.name,
                        "kind": stage.kind,
                        "steps": result.train.num_training_steps,
                        "train_seconds": round(result.train.train_seconds, 1),
                        "classifier_accuracy": round(result.metrics.get("accuracy", float("nan")), 4),
                    }
                )
                if process.is_main_process:
                    classifier.save_pretrained(stage_dir / "model")
                process.wait_for_everyone()
            vlm_size = recipe.vision.get("image_size", classifier.config.image_size)
            classifier = prepare_classifier(
                classifier,
                image_size=vlm_size,
                head=classifier.config.classifier_head,
                num_labels=classifier.config.num_labels,
                id2label=classifier.config.id2label,
            )
            tower = classifier.vit
            aux_head = nn.Sequential(*(m for m in (classifier.pre_logits, classifier.classifier) if m is not None))
            aux_labels = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
            aux_task = classifier_stage.task
            continue

        if model is None:
            if tower is None:
                tower = (
                    AutoModel.from_pretrained(recipe.vision["path"])
                    if "path" in recipe.vision
                    else VisionTransformerModel(VisionTransformerConfig(**recipe.vision))
                )
            model = build_vlm(recipe, tower, tokenizer)
            processor = VisionLanguageProcessor.from_model_config(
                model.config, image_processor_for(tower.config), tokenizer
            )
        if resume and done.is_file():
            model = VisionLanguageForConditionalGeneration.from_pretrained(stage_dir / "model")
            logger.info("stage %s already finished: loaded %s", stage.name, stage_dir / "model")
            continue
        set_seed(recipe.seed)
        trainable = set_trainable(model, stage)
        label_key, label_names = None, None
        use_aux = stage.aux_classification_weight > 0 and aux_head is not None
        if use_aux:
            trainable = WithAuxiliaryClassifier(trainable, aux_head, stage.aux_classification_weight)
            label_key, label_names = aux_task, aux_labels
        data = {**recipe.data, **(stage.data or {})}
        samples = load_samples(data, recipe.seed, evaluation=False)[0] if stage.data else train_samples
        dataset = EncodedConversations(
            [_with_label(s, label_key) for s in samples] if use_aux else samples,
            processor,
            max_length=recipe.max_length,
            image_label_key=label_key,
            label_names=label_names,
            separate_questions=data.get("separate_questions", False),
        )
        args = stage.training_arguments(str(stage_dir), **run_args)
        result = train(
            trainable,
            dataset,
            args,
            stage_optimizer(stage, trainable),
            collate_fn=EncodedCollator(processor, horizontal_flip=stage.horizontal_flip),
            compute_loss=vlm_loss,
            fingerprint_extra={"stage": stage_summary(stage), "model": model.config.to_json_string(use_diff=True)},
        )
        if not result.finished:
            return {"stages": rows, "evaluation": None, "stopped_in": stage.name}
        trained = result.model.vlm if use_aux else result.model
        if stage.kind == "finetune":
            if process.is_main_process:
                trained.save_pretrained(out / "lora" / stage.name)  # the LoRA adapters alone (peft format)
            trained = trained.merge_and_unload()
        model = trained
        rows.append(
            {
                "stage": stage.name,
                "kind": stage.kind,
                "steps": result.num_training_steps,
                "train_seconds": round(result.train_seconds, 1),
                "samples_per_second": round(result.samples_per_second, 1),
                "last_loss": round(result.last_loss, 4),
            }
        )
        if process.is_main_process:
            save_vlm(model, processor, stage_dir / "model")
        process.wait_for_everyone()

    evaluation = None
    if process.is_main_process and model is not None:
        if evaluate and eval_samples:
            evaluation = vqa_exact_match(model, processor, eval_samples, batch_size=recipe.eval_batch_size)
            save_json(out / "eval_predictions.json", {"predictions": evaluation.pop("predictions")})
        save_vlm(model, processor, out / "vlm")
        write_vlm_card(out / "vlm", recipe, rows, evaluation, model)
        summary = {"stages": rows, "evaluation": evaluation, "total_seconds": round(time.perf_counter() - started, 1)}
        save_json(out / "results.json", summary)
    process.wait_for_everyone()
    return {"stages": rows, "evaluation": evaluation, "total_seconds": round(time.perf_counter() - started, 1)}


def _with_label(sample: VLMSample, task: str) -> VLMSample:
    """Attach the easy-VQA image's label for the classifier `task` (`shape`, `color` or `shape_color`, as the
    vision_pretrain stage's classes) to the sample's meta, for the auxiliary loss."""
    from ..data.easy_vqa import easy_vqa_image_labels

    labels = easy_vqa_image_labels("train").get(sample.meta.get("image_id"), {})
    if task == "shape_color" and "shape" in labels and "color" in labels:
        sample.meta[task] = f"{labels['color']} {labels['shape']}"
    elif task in labels:
        sample.meta[task] = labels[task]
    return sample


__all__ = ["VLMRecipe", "load_samples", "run_vlm_recipe"]
