"""LoRA on the language side, the vision side or both, scoped by full module path, through peft.

LLaVA-style code lists LoRA targets by leaf name (`q_proj`), so a LoRA meant for the language model also lands in
the vision tower, which has `q_proj` too. Here each side's targets are a regular expression over the whole module
path (peft applies a string `target_modules` with `re.fullmatch`), so a side that should stay frozen gets none.
The adapter (projector) trains fully (`modules_to_save`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

logger = logging.getLogger(__name__)

# Leaf names of the linear layers LoRA adapts, per side. The LM list covers Llama/Mistral/Qwen/SmolLM (and GPT-style
# names); the vision list covers our ViT, CLIP, SigLIP and DINOv2 (`out_proj`/`dense` variants included).
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2")
PARTS = ("vision_tower", "adapter", "language_model")


@dataclass
class LoraSide:
    """LoRA hyper-parameters of one side."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA r and alpha must be positive, got r={self.r}, alpha={self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")


@dataclass
class LoraPreset:
    """Which sides get LoRA. `lm`/`vision` None means that side stays frozen (or trains fully, by the caller)."""

    lm: LoraSide | None = field(default_factory=lambda: LoraSide(targets=LM_TARGETS))
    vision: LoraSide | None = None
    train_adapter: bool = True


LORA_PRESETS = {
    "lm": lambda: LoraPreset(lm=LoraSide(targets=LM_TARGETS), vision=None),
    "vision": lambda: LoraPreset(lm=None, vision=LoraSide(r=8, alpha=16, targets=VISION_TARGETS)),
    "both": lambda: LoraPreset(lm=LoraSide(targets=LM_TARGETS), vision=LoraSide(r=8, alpha=16, targets=VISION_TARGETS)),
}


def side_pattern(prefix: str, targets: tuple[str, ...]) -> str:
    """A regex over full module paths: every `targets` leaf under the `prefix` submodule, nothing elsewhere."""
    leaves = "|".join(sorted(set(targets)))
    return rf"{prefix}\..*\.({leaves})"


def lora_config(preset: str | LoraPreset) -> LoraConfig:
    """Compile a preset (`"lm"`, `"vision"`, `"both"` or a `LoraPreset`) to a peft `LoraConfig` scoped by path.

    Both sides may have their own r/alpha: the LM side's are the defaults, the vision side's go in
    `rank_pattern`/`alpha_pattern` (peft matches those patterns against module paths too).
    """
    if isinstance(preset, str):
        if preset not in LORA_PRESETS:
            raise ValueError(f"Unknown LoRA preset {preset!r}; use one of {sorted(LORA_PRESETS)} or a LoraPreset.")
        preset = LORA_PRESETS[preset]()
    sides = {"language_model": preset.lm, "vision_tower": preset.vision}
    patterns = {name: side_pattern(name, side.targets) for name, side in sides.items() if side is not None}
    if not patterns:
        raise ValueError("A LoRA preset needs at least one side (lm or vision).")
    main = preset.lm or preset.vision
    rank_pattern, alpha_pattern = {}, {}
    if preset.lm is not None and preset.vision is not None:
        rank_pattern[patterns["vision_tower"]] = preset.vision.r
        alpha_pattern[patterns["vision_tower"]] = preset.vision.alpha
    if preset.lm is not None and preset.vision is not None and preset.lm.dropout != preset.vision.dropout:
        logger.warning("peft has one LoRA dropout per config: using the LM side's %.3f for both", preset.lm.dropout)
    return LoraConfig(
        r=main.r,
        lora_alpha=main.alpha,
        lora_dropout=main.dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns.values()),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=["adapter"] if preset.train_adapter else None,
        bias="none",
    )


def parameter_table(model: nn.Module) -> str:
    """A table of trainable and frozen parameter counts per part (vision tower, adapter, language model, LoRA)."""
    rows: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        part = (
            "lora"
            if "lora_" in name
            else next((p for p in PARTS if f"{p}." in f"{name}." or name.startswith(p)), "other")
        )
        counts = rows.setdefault(part, [0, 0])
        counts[0 if parameter.requires_grad else 1] += parameter.numel()
    lines = [f"{'part':<16}{'trainable':>14}{'frozen':>14}"]
    for part in (*PARTS, "lora", "other"):
        if part in rows:
            trainable, frozen = rows[part]
            lines.append(f"{part:<16}{trainable:>14,}{frozen:>14,}")
    total_trainable = sum(r[0] for r in rows.values())
    total_frozen = sum(r[1] for r in rows.values())
    lines.append(f"{'total':<16}{total_trainable:>14,}{total_frozen:>14,}")
    return "\n".join(lines)


def apply_lora(model: nn.Module, preset: str | LoraPreset) -> PeftModel:
    """Wrap `model` with LoRA for `preset`; everything else is frozen except the adapter (when trained).

    Pixel inputs carry no gradient, so with reentrant gradient checkpointing on the tower its LoRA weights would get
    zero gradients silently: the tower's input embeddings are made to require grad (as transformers'
    `enable_input_require_grads` does for the LM).
    """
    # LoRA on tower blocks past the feature layer would never get a gradient (and would stall DDP): keep it frozen
    unused_modules = set()
    if hasattr(model, "freeze_unused_vision_parameters"):
        unused_modules = {f"vision_tower.{n.rsplit('.', 1)[0]}" for n in model.freeze_unused_vision_parameters()}
    peft_model = get_peft_model(model, lora_config(preset))
    for name, parameter in peft_model.named_parameters():
        if ".lora_" in name and name.removeprefix("base_model.model.").split(".lora_")[0] in unused_modules:
            parameter.requires_grad_(False)
    base = peft_model.get_base_model()
    for tower in (getattr(base, "vision_tower", None), getattr(base, "language_model", None)):
        if tower is not None and hasattr(tower, "get_input_embeddings"):
            tower.get_input_embeddings().register_forward_hook(_make_output_require_grad)
    logger.info("LoRA %s:\n%s", preset if isinstance(preset, str) else "custom", parameter_table(peft_model))
    return peft_model


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


__all__ = ["LORA_PRESETS", "LoraPreset", "LoraSide", "apply_lora", "lora_config", "parameter_table"]
