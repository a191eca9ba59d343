"""FSDP2 (torch's `fully_shard`) for the training loop, the same code on CPU processes and GPUs.

accelerate's FSDP plugin does not run on CPU (under a CPU launch it falls back to DDP), so the loop shards the model
itself and never hands it to `accelerator.prepare` (which would wrap it in DDP): accelerate still starts the
processes, shards the data and runs autocast. The settings come from the accelerate config, as for any accelerate
FSDP run (`accelerate launch --config_file configs/accelerate/fsdp.yaml` on GPUs,
`configs/accelerate/fsdp_cpu_2proc.yaml` on 2 CPU processes): `distributed_type: FSDP` with `fsdp_version: 2` sets
the environment read here.

- Wrapping: every module whose class is in the models' own `_no_split_modules` (our ViT layer, the LM's decoder layer)
  is its own FSDP unit, then the root; `fsdp_transformer_layer_cls_to_wrap` names other classes (each must exist in
  the model). Frozen and trainable parameters may share a unit (FSDP2 allows mixed `requires_grad`).
- Checkpoints: the model and optimizer state are saved sharded with torch's distributed checkpoint (each process
  writes its shards; a run can resume on another number of processes), next to accelerate's state.
- Results: :func:`full_state_dict` gathers the full weights on every process and :func:`unsharded_copy` loads them
  into an ordinary module, for the final save, LoRA merging, evaluation on every process, and the next stage.

DeepSpeed ZeRO-2/3 is accelerate's (`accelerator.prepare` makes the DeepSpeed engine), also on CPU processes
(DeepSpeed's CPU accelerator over gloo, :func:`deepspeed_on_cpu`; `configs/accelerate/deepspeed_zero3_cpu_2proc.yaml`).
:func:`deepspeed_zero_stage` says which ZeRO stage a launch runs. After a ZeRO-3 stage (gathering its partitions)
and after a ZeRO-2 one :func:`deepspeed_full_state_dict` takes the weights on every process (trainable ones from the
optimizer's fp32 masters), loaded into the model's :func:`meta_skeleton` as under FSDP2.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

logger = logging.getLogger(__name__)

DCP_FOLDER = "sharded_model_optimizer"


@dataclass(frozen=True)
class FSDPSettings:
    """FSDP2 settings, from the environment `accelerate launch` sets for `distributed_type: FSDP`."""

    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()  # empty: the models' `_no_split_modules`
    offload_params: bool = False

    @classmethod
    def from_env(cls) -> FSDPSettings | None:
        if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
            return None
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(
                f"FSDP version {version} (fsdp_config.fsdp_version in the accelerate config): this package trains with "
                "FSDP2 (torch's fully_shard), which allows frozen and trainable parameters in one unit; set "
                "fsdp_version: 2 (configs/accelerate/fsdp.yaml)."
            )
        policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
        if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            raise ValueError(
                f"fsdp_auto_wrap_policy={policy}: use TRANSFORMER_BASED_WRAP (one unit per transformer layer, the "
                "models' _no_split_modules or fsdp_transformer_layer_cls_to_wrap) or NO_WRAP."
            )
        classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        return cls(
            reshard_after_forward=parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", True),
            wrap_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
            offload_params=parse_flag_from_env("FSDP_OFFLOAD_PARAMS"),
        )


def layer_classes(model: nn.Module) -> set[str]:
    """The class names of the transformer layers of `model`: the `_no_split_modules` of its (sub)models."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """`fully_shard` every transformer layer of `model`, then `model` itself (in place; returned)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    wanted = set(settings.wrap_classes) or layer_classes(model)
    present = {type(module).__name__ for module in model.modules()}
    missing = sorted(set(settings.wrap_classes) - present)
    if missing:
        raise ValueError(
            f"fsdp_transformer_layer_cls_to_wrap names {missing}, which are not classes of this model: leave it empty "
            f"(the models' own layers: {sorted(layer_classes(model) & present)}) or name classes it has."
        )
    options = {"reshard_after_forward": settings.reshard_after_forward}
    if settings.offload_params:
        options["offload_policy"] = CPUOffloadPolicy()
    units = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    for module in units:
        fully_shard(module, **options)
    fully_shard(model, **options)
    logger.info("FSDP2: %d units (%s) and the root", len(units), ", ".join(sorted(wanted & present)))
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory), buffers copied: the shape of the
    unsharded model, to load the gathered weights into after training. Tied parameters stay tied."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def deepspeed_zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage of this launch (from the accelerate config's `deepspeed_config.zero_stage`, or the
    `zero_optimization.stage` of its `deepspeed_config_file`), or None when the launch doesn't use DeepSpeed."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and os.path.isfile(config_file):
        with open(config_file) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
        if stage is not None:
            return int(stage)
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # accelerate's default


def deepspeed_on_cpu() -> bool:
    """Whether this is a DeepSpeed launch on a machine without CUDA: DeepSpeed's CPU accelerator, whose processes
    accelerate only connects when told the backend (gloo); accelerate's own CPU mode would turn DeepSpeed off."""
    return deepspeed_zero_stage() is not None and not torch.cuda.is_available()


def deepspeed_full_state_dict(engine, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The full state dict of a DeepSpeed engine's module on every process (call on every process), in `dtypes`
    (the model's before `accelerator.prepare`): ZeRO-3's partitioned parameters gathered for a moment, and each
    trainable parameter from the optimizer's fp32 master copy (under bf16 the module holds a rounded one)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):  # ZeRO-3 only
        state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            state[name] = safe_get_full_fp32_param(parameter).detach().clone()
    return {name: tensor.to(dtypes.get(name, tensor.dtype)) for name, tensor in state.items()}


def check_deepspeed_precision(model: nn.Module, mixed_precision: str) -> None:
    """Refuse what DeepSpeed's bf16/fp16 would round silently: it casts the whole model, frozen float32 weights too
    (they have no master copy), and they would be trained around and saved rounded."""
    if mixed_precision not in ("bf16", "fp16"):
        return
    rounded = [
        name
        for name, p in model.named_parameters()
        # peft's `original_module` is the untrained copy of a module it trains whole (modules_to_save): never saved
        if not p.requires_grad and p.dtype == torch.float32 and ".original_module." not in name
    ]
    if rounded:
        raise ValueError(
            f"DeepSpeed with mixed_precision {mixed_precision} casts the whole model to it, the {len(rounded)} frozen "
            f"float32 tensors too ({rounded[0]}, ...), which would be rounded and saved so. Load the frozen parts in "
            "that precision (recipe: vision.dtype / language_model.dtype = bfloat16, as LLaVA does), train in fp32 "
            "(mixed_precision: 'no'), or use FSDP2 (configs/accelerate/fsdp.yaml), which keeps the weights."
        )


def full_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model, on every process (call on every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(full: dict[str, torch.Tensor], skeleton: nn.Module) -> nn.Module:
    """Load `full` (:func:`full_state_dict`) into `skeleton` (:func:`meta_skeleton` of the model before sharding):
    an ordinary module on every process."""
    shared = {}  # parameters that are one tensor under several names (tied embeddings)
    for name, parameter in skeleton.named_parameters(remove_duplicate=False):
        shared.setdefault(id(parameter), []).append(name)
    requires_grad = {name: p.requires_grad for name, p in skeleton.named_parameters(remove_duplicate=False)}
    skeleton.load_state_dict(full, strict=True, assign=True)
    for names in shared.values():
        first = skeleton.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(skeleton.get_submodule(owner) if owner else skeleton, leaf, first)
    for name, parameter in skeleton.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    return skeleton


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder) -> None:
    """The model's and optimizer's shards into `folder/sharded_model_optimizer` (every process writes its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(folder, DCP_FOLDER))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder) -> None:
    """Load what :func:`save_sharded` wrote, resharded to this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.path.join(folder, DCP_FOLDER)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{folder} has no {DCP_FOLDER}: it was saved without FSDP. Resume it with the accelerate config it was "
            "saved with (DDP or one process), or start the stage again."
        )
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


__all__ = [
    "FSDPSettings",
    "check_deepspeed_precision",
    "deepspeed_full_state_dict",
    "deepspeed_on_cpu",
    "deepspeed_zero_stage",
    "full_state_dict",
    "is_sharded",
    "layer_classes",
    "load_sharded",
    "meta_skeleton",
    "save_sharded",
    "shard",
    "unsharded_copy",
]
