"""The strict key-mapping engine: rules as data (a source-key regex to target key(s) and a transform), one
engine that fills every target parameter and lists every unused, missing or mis-shaped key, and the fields a
transformers config gives our config."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .reading import _read_json

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("hf", "clip", "siglip", "siglip2", "dinov2", "timm", "npz")

# A rule maps a source key (regex, full match) to one target key (template with \1 ...) or several (a tuple, when
# the transform splits the tensor, e.g. a fused qkv). Keys are relative to the encoder (`VisionTransformerModel`);
# a classifier's keys get the `vit.` prefix later.
Rule = tuple[str, "str | tuple[str, ...]", "Callable[[torch.Tensor], object] | None"]


def map_keys(source: dict[str, torch.Tensor], rules: list[Rule], ignore: dict[str, str] | None = None):
    """Apply `rules` to every source key. Returns (target state dict, source keys no rule matched).

    `ignore` maps a regex to the reason the matching keys are not part of the vision tower (e.g. a text tower);
    they are dropped and logged, never silently.
    """
    target: dict[str, torch.Tensor] = {}
    unused, ignored = [], {}
    for key, value in source.items():
        reason = next((why for pattern, why in (ignore or {}).items() if re.fullmatch(pattern, key)), None)
        if reason is not None:
            ignored.setdefault(reason, []).append(key)
            continue
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            out = transform(value) if transform is not None else value
            names, values = (template, out) if isinstance(template, tuple) else ((template,), (out,))
            for name, tensor in zip(names, values, strict=True):
                name = match.expand(name)
                if name in target:
                    raise ValueError(f"Two source keys map to {name} (the second is {key}): ambiguous checkpoint.")
                target[name] = tensor
            break
        else:
            unused.append(key)
    for reason, keys in ignored.items():
        logger.info("Not converted (%s): %d keys, e.g. %s", reason, len(keys), keys[0])
    return target, unused


def load_strictly(model: torch.nn.Module, target: dict[str, torch.Tensor], unused: list[str], source: str) -> None:
    """Load `target` into `model` if it fills every parameter with the right shape and no source key is left over."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(target))
    unexpected = sorted(set(target) - set(expected))
    mismatched = sorted(
        f"{k}: source {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in target.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if unused:
        problems.append(f"source keys no rule uses ({len(unused)}): {sorted(unused)}")
    if unexpected:
        problems.append(f"converted keys the model does not have ({len(unexpected)}): {unexpected}")
    if missing:
        problems.append(f"model keys the source does not fill ({len(missing)}): {missing}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError(
            f"Cannot convert {source} exactly:\n  " + "\n  ".join(problems) + "\nCheck that --from names the right "
            "source layout and that the folder's config.json belongs to these weights."
        )
    model.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in target.items()}, strict=True)


def _block_rules(block: str, leaves: dict[str, str], params: str = r"(weight|bias)") -> list[Rule]:
    """Rules for the per-block leaves: `block` is a regex with one group for the block index."""
    return [(block + re.escape(src) + r"\." + params, rf"layers.\1.{dst}.\2", None) for src, dst in leaves.items()]


def _as_token(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, -1)  # (D,) -> (1, 1, D)


def _as_table(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)  # nn.Embedding (T, D) -> (1, T, D)


@dataclass
class _Plan:
    """What a loader decided: config fields, key rules, keys declared as not part of the tower, notes, the source."""

    fields: dict
    rules: list[Rule]
    ignore: dict[str, str]
    notes: list[str]
    source: dict[str, torch.Tensor]


def _detect(source: dict[str, torch.Tensor], layouts: dict[str, str], source_format: str) -> str:
    """The name of the first layout whose marker regex matches a key, or a ValueError saying what was found."""
    for name, marker in layouts.items():
        if any(re.fullmatch(marker, k) for k in source):
            return name
    sample = sorted(source)[:8]
    raise ValueError(
        f"The weights do not look like a --from {source_format} checkpoint (layouts tried: {sorted(layouts)}). "
        f"Found keys such as {sample}. Pick the --from that matches the source ({', '.join(SOURCE_FORMATS)})."
    )


def _transformers_vision_config(folder: Path | None, config_class, composite_class, source_format: str):
    """The source's transformers config (the vision part of a composite CLIP/SigLIP config)."""
    raw = _read_json(folder, "config.json") if folder is not None else None
    if raw is None:
        raise FileNotFoundError(
            f"--from {source_format} needs the source folder's config.json (hyper-parameters such as the number of "
            "heads, eps and the activation are not in the weights). Pass the folder, not the weight file."
        )
    if "vision_config" in raw and composite_class is not None:
        return composite_class.from_dict(raw).vision_config
    return config_class.from_dict(raw)


def _transformer_fields(cfg) -> dict:
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
    }


def _common_fields(cfg) -> dict:
    return {
        **_transformer_fields(cfg),
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
    }


# v4-era (and on-disk v5) names of ViT blocks, and the v5 in-memory names, which are ours.
