"""The training library shared by the classifier and the vision-language model scripts.

- :mod:`.optim`: AdamW parameter groups (weight decay by rule, per-part learning rates), cosine schedule.
- :mod:`.checkpointing`: atomic `accelerator.save_state`, latest complete checkpoint, exact resume.
- :mod:`.loop`: the accelerate training loop (`train`): 1 or N processes alike, accumulation, clipping, mixed
  precision, progress bar, trackers.
- :mod:`.classifier`: the paper's pre-training and fine-tuning stages (Sec. 3.2) for any labelled image data.
- :mod:`.stages`, :mod:`.vlm`: the VLM's stage kinds (what each trains) and its losses.
- :mod:`.vlm_schema`, :mod:`.vlm_data`, :mod:`.vlm_parts`, :mod:`.vlm_recipe`: a VLM recipe's schema, its data, the
  parts it builds, and the runner (`run_vlm_recipe`: one function per stage kind).
"""

from .checkpointing import (
    DamagedCheckpointError,
    TrainerState,
    checkpoint_problem,
    find_latest_checkpoint,
    list_checkpoints,
    load_state,
    resolve_resume,
    save_state_atomically,
)
from .classifier import (
    CLASSIFIER_PARTS,
    ClassifierStage,
    StageResult,
    evaluate_classifier,
    prepare_classifier,
    train_classifier,
)
from .loop import (
    EpochSampler,
    TrainingArguments,
    TrainResult,
    make_accelerator,
    process_state,
    resolve_mixed_precision,
    train,
)
from .optim import (
    OptimizerConfig,
    assign_parts,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    decays,
    describe_trainable,
)

__all__ = [
    "CLASSIFIER_PARTS",
    "ClassifierStage",
    "DamagedCheckpointError",
    "EpochSampler",
    "OptimizerConfig",
    "StageResult",
    "TrainResult",
    "TrainerState",
    "TrainingArguments",
    "assign_parts",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "checkpoint_problem",
    "decays",
    "describe_trainable",
    "evaluate_classifier",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_state",
    "make_accelerator",
    "prepare_classifier",
    "process_state",
    "resolve_mixed_precision",
    "resolve_resume",
    "save_state_atomically",
    "train",
    "train_classifier",
]
