"""AdamW with weight decay by rule and per-part learning rates, and a learning-rate schedule with warm-up.

Weight decay (as timm and nanoGPT): only the weight matrices of layers decay, i.e. parameters with `p.ndim >= 2`
whose name ends in `weight` (Linear, Conv, attention in-projections). Biases, norms and LayerScale (1-D), embedding
tables (`nn.Embedding`), learned tokens and position embeddings ([CLS], registers, probes: raw parameters that are
not a layer's `weight`), and whatever the model lists in a timm-style `no_weight_decay()` do not.

Per-part learning rates: `parts` maps a part name to module-path patterns, e.g.
`{"head": ["classifier", "pre_logits"], "vision": "vit", "vision_lora": "vit.*lora_*"}`. A pattern without `*?[` is
a path prefix on module boundaries (`"vit"` matches `vit.layers.0...`, not `vitals`); with them it is an fnmatch
pattern over the full parameter name. A parameter belongs to the part of the longest pattern it matches (so
`vit.*lora_*` beats `vit`), and to the part `"default"` when none matches. `learning_rates` maps part names to
their rates; parts without an entry use the base rate.

Schedules: transformers' (`get_scheduler`), named as in `TrainingArguments.lr_scheduler_type` (`cosine`, the
default, `linear`, `constant_with_warmup`, `cosine_with_min_lr`, `warmup_stable_decay`, ...), with their own
arguments in `lr_scheduler_kwargs`. For `warmup_stable_decay`, `decay_ratio` (the fraction of the steps that decay)
stands for transformers' `num_decay_steps`, so that a recipe need not know its step count.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

logger = logging.getLogger(__name__)

DEFAULT_PART = "default"
# transformers' schedules that step once per optimizer step with nothing but the step count.
SCHEDULES = frozenset(t.value for t in SchedulerType) - {"reduce_lr_on_plateau", "greedy"}


@dataclass
class OptimizerConfig:
    """AdamW and its schedule.

    Attributes:
        learning_rate: the peak rate of parts without their own.
        weight_decay: decoupled weight decay of the weight matrices (see the module docstring).
        betas, eps: AdamW's.
        warmup_ratio: linear warm-up over this fraction of the optimizer steps (used when `warmup_steps` is None).
        warmup_steps: linear warm-up steps (when not None).
        lr_scheduler_type: the schedule after the warm-up, a transformers name (see the module docstring).
        lr_scheduler_kwargs: the schedule's own arguments (`min_lr_rate` of `cosine_with_min_lr`, `decay_ratio` or
            `num_decay_steps` of `warmup_stable_decay`, ...).
        parts: part name -> module-path pattern(s).
        learning_rates: part name -> peak learning rate.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None
    parts: dict[str, str | list[str]] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    lr_scheduler_type: str = "cosine"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0.")
        self.betas = tuple(self.betas)
        unknown = sorted(set(self.learning_rates) - set(self.parts) - {DEFAULT_PART})
        if unknown:
            raise ValueError(
                f"learning_rates names parts {unknown} that `parts` does not define (parts: {sorted(self.parts)}). "
                "Add them to `parts` as module-path patterns, or fix the name."
            )
        bad = {k: v for k, v in self.learning_rates.items() if not v >= 0}
        if bad:
            raise ValueError(f"learning rates must be >= 0, got {bad}.")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not a schedule this loop can run; use one of "
                f"{sorted(SCHEDULES)} (transformers' names; those that need a metric or a search are left out)."
            )
        if self.lr_scheduler_type == "warmup_stable_decay" and (
            ("decay_ratio" in self.lr_scheduler_kwargs) == ("num_decay_steps" in self.lr_scheduler_kwargs)
        ):
            raise ValueError(
                "lr_scheduler_type='warmup_stable_decay' needs how long the decay is: set exactly one of "
                "lr_scheduler_kwargs.decay_ratio (a fraction of the steps, e.g. 0.2) or num_decay_steps."
            )

    def num_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * num_training_steps)


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    prefix = pattern.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def assign_parts(model: nn.Module, parts: Mapping[str, str | Sequence[str]]) -> dict[str, str]:
    """Parameter name -> part name, for every parameter of `model` (trainable or not).

    Raises:
        ValueError: a part's patterns match no parameter at all (a typo), or two parts claim a parameter with equally
            long patterns.
    """
    patterns = [(part, p) for part, pats in parts.items() for p in ([pats] if isinstance(pats, str) else pats)]
    names = [name for name, _ in model.named_parameters()]
    for part in parts:
        if not any(_matches(name, p) for q, p in patterns if q == part for name in names):
            example = ", ".join(names[:3])
            raise ValueError(
                f"Part {part!r}: its patterns {parts[part]!r} match no parameter of {type(model).__name__} (names "
                f"look like {example}, ...). Use module-path prefixes or fnmatch patterns over parameter names."
            )
    assignment = {}
    for name in names:
        hits = sorted(((len(p), part, p) for part, p in patterns if _matches(name, p)), reverse=True)
        if len(hits) > 1 and hits[0][0] == hits[1][0] and hits[0][1] != hits[1][1]:
            raise ValueError(
                f"Parameter {name} matches parts {hits[0][1]!r} ({hits[0][2]!r}) and {hits[1][1]!r} ({hits[1][2]!r}) "
                "equally: make one pattern more specific."
            )
        assignment[name] = hits[0][1] if hits else DEFAULT_PART
    return assignment


def decays(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether weight decay applies (the rule in the module docstring)."""
    exempt = set()
    no_weight_decay = getattr(model, "no_weight_decay", None)
    if callable(no_weight_decay):
        exempt = set(no_weight_decay())
    embedding_tables = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }
    return {
        name: p.ndim >= 2 and name.endswith("weight") and name not in embedding_tables and name not in exempt
        for name, p in model.named_parameters()
    }


def build_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """AdamW parameter groups, one per (part, decay or not) with trainable parameters, each with its `lr`,
    `weight_decay` and a `name` ("vision/decay"). Frozen parameters (`requires_grad=False`) are left out."""
    part_of = assign_parts(model, config.parts)
    decay_of = decays(model)
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part, decay = part_of[name], decay_of[name]
        group = groups.setdefault(
            (part, decay),
            {
                "name": f"{part}/{'decay' if decay else 'no_decay'}",
                "params": [],
                "lr": config.learning_rates.get(part, config.learning_rate),
                "weight_decay": config.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: unfreeze some (requires_grad=True).")
    return list(groups.values())


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, config)`; logs one line per group."""
    groups = build_param_groups(model, config)
    for group in groups:
        logger.info(
            "  param group %-24s %9d parameters  lr %.2e  weight decay %g",
            group["name"],
            sum(p.numel() for p in group["params"]),
            group["lr"],
            group["weight_decay"],
        )
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, eps=config.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then `config.lr_scheduler_type` over `num_training_steps` optimizer steps (cosine decay to 0
    by default); each group from its own lr."""
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps={num_training_steps} must be > 0: is the data set empty?")
    kwargs = dict(config.lr_scheduler_kwargs)
    if "decay_ratio" in kwargs:
        kwargs["num_decay_steps"] = math.ceil(kwargs.pop("decay_ratio") * num_training_steps)
    try:
        return get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=config.num_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=kwargs,
        )
    except TypeError as error:  # an argument the schedule does not take
        raise ValueError(
            f"lr_scheduler_kwargs {config.lr_scheduler_kwargs} do not fit lr_scheduler_type="
            f"{config.lr_scheduler_type!r} ({error}): see transformers.optimization for its arguments."
        ) from None


def describe_trainable(model: nn.Module, parts: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """A table of the parts with their trainable and frozen parameter counts (Prismatic's "what trains" log)."""
    part_of = assign_parts(model, parts or {})
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = rows.setdefault(part_of[name], [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
    lines = [f"{'part':<16}{'trainable':>12}{'frozen':>12}"]
    lines += [f"{part:<16}{t:>12,}{f:>12,}" for part, (t, f) in rows.items()]
    return "\n".join(lines)
