"""A small training loop on accelerate, shared by every training script (classifier, VLM stages).

What it guarantees:

- The same run on 1 process and under `accelerate launch --num_processes N`: `batch_size` is the *global* batch of
  one optimizer step; each process takes `batch_size / (N * gradient_accumulation_steps)` samples per micro-batch.
  The data order comes from :class:`EpochSampler` (a permutation seeded by (seed, epoch), cut into global batches
  and dealt to processes by accelerate), so the samples of each step do not depend on N, and DDP's mean of the
  per-process mean losses equals the one-process mean.
- Exact resume: `save_every_steps` checkpoints (see :mod:`.checkpointing`) hold the model, optimizer, scheduler,
  RNG states and the loop's position; a resumed run skips the batches already consumed in the epoch (without
  reading them) and continues with the same data order, augmentation and schedule.
- Gradient accumulation (the micro-batches of a step all-reduce once; with `count_items`, the loss is normalised by
  the step's item count, e.g. supervised tokens, so accumulation gives the gradient of one big batch), clipping,
  mixed precision (`"auto"`: bf16 on a GPU that supports it, fp32 on CPU), a progress bar with loss, samples/s and
  ETA, and accelerate trackers (`report_to=["tensorboard"]` writes under `output_dir/logs`).

The model's forward must return an object with `.loss` given `**batch`, or pass `compute_loss(model, batch)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env
from torch import nn
from tqdm.auto import tqdm

from .checkpointing import TrainerState, load_state, resolve_resume, save_state_atomically
from .distributed import (
    FSDPSettings,
    check_deepspeed_precision,
    deepspeed_full_state_dict,
    deepspeed_on_cpu,
    deepspeed_zero_stage,
    full_state_dict,
    is_sharded,
    meta_skeleton,
    shard,
    unsharded_copy,
)
from .optim import OptimizerConfig, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)
# a line per log step (loss, learning rate, speed): the log file's record of the curve, kept off the console
progress_logger = logging.getLogger(__name__ + ".progress")

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainingArguments:
    """How to run one training stage (what to optimise is an :class:`OptimizerConfig`).

    Attributes:
        output_dir: the stage's folder: `checkpoints/` and `logs/` go under it.
        num_epochs: passes over the data (ignored when `max_steps` is set).
        max_steps: optimizer steps in total; the schedule's length.
        batch_size: global batch of one optimizer step, over all processes and accumulation micro-batches.
        gradient_accumulation_steps: micro-batches per optimizer step.
        per_device_batch_size: samples per process and micro-batch; when set, the accumulation is derived:
            `batch_size / (num_processes * per_device_batch_size)` (the recipe's global batch on any process count).
        group_by_length: batches of similar lengths (and one modality: with or without images), as LLaVA's
            `group_by_modality_length`: pass `lengths` (and `modalities`) to `train`.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        mixed_precision: "auto" (bf16 on a GPU that supports it, else fp32), "no", "bf16" or "fp16".
        seed: seeds the model's initialisation (by the caller), the data order and the RNGs.
        save_every_steps: save a resumable checkpoint every this many optimizer steps and at the end (None: never).
        keep_last_checkpoints: keep only the newest checkpoints (None: all).
        resume: None, "latest" (the newest complete checkpoint of `output_dir/checkpoints`, if any) or a folder.
        stop_after_steps: stop after this many optimizer steps (saving a checkpoint if `save_every_steps` is set)
            without changing the schedule, as if the run were killed there; for time budgets and tests.
        log_every_steps: progress-bar and tracker updates.
        report_to: accelerate trackers, e.g. ["tensorboard"] (needs the tensorboard package).
        num_workers: DataLoader workers.
        progress_bar: show a tqdm bar on the main process.
    """

    output_dir: str = "outputs/train"
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    per_device_batch_size: int | None = None
    group_by_length: bool = False
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    seed: int = 0
    save_every_steps: int | None = None
    keep_last_checkpoints: int | None = 2
    resume: str | None = None
    stop_after_steps: int | None = None
    log_every_steps: int = 10
    report_to: list[str] = field(default_factory=list)
    num_workers: int = 0
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "log_every_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive int.")
        for name in (
            "max_steps",
            "save_every_steps",
            "keep_last_checkpoints",
            "stop_after_steps",
            "per_device_batch_size",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive int or None.")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose one of {MIXED_PRECISION_CHOICES}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 or None.")

    @classmethod
    def for_stage(cls, stage, output_dir: str, **overrides) -> TrainingArguments:
        """The arguments of a stage (classifier or VLM): its schedule fields, plus run-level `overrides` such as
        `resume` or `save_every_steps`."""
        schedule = (
            "num_epochs",
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "per_device_batch_size",
            "max_grad_norm",
        )
        values = {name: getattr(stage, name) for name in schedule if hasattr(stage, name)}
        return cls(output_dir=output_dir, **{**values, **overrides})

    def for_processes(self, num_processes: int) -> TrainingArguments:
        """These arguments on `num_processes` processes: the accumulation derived from `per_device_batch_size`."""
        if self.per_device_batch_size is None:
            return self
        per_step = num_processes * self.per_device_batch_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} (global) is not a multiple of num_processes ({num_processes}) x "
                f"per_device_batch_size ({self.per_device_batch_size}) = {per_step}: change one of them."
            )
        return replace(self, gradient_accumulation_steps=self.batch_size // per_step)


def resolve_mixed_precision(mixed_precision: str) -> str:
    """ "auto" -> "bf16" on a CUDA GPU with bf16, else "no" (fp32: CPUs gain nothing from bf16 autocast here)."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def use_cpu_processes() -> bool:
    """Whether this process is one of several CPU processes (gloo) rather than a GPU process.

    accelerate makes launched processes CPU processes only when ACCELERATE_USE_CPU is set, which its multi-process
    launcher does not set (and `accelerate launch --cpu --num_processes 2` starts one process without MPI). Launched
    processes (WORLD_SIZE > 1) on a machine without CUDA are therefore made CPU processes here, except under
    DeepSpeed, which runs CPU processes itself (and which accelerate's CPU mode would turn off): see
    :func:`process_group_options`.
    """
    if deepspeed_zero_stage() is not None:
        return False
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available())


def process_state() -> PartialState:
    """accelerate's process state (rank, world size), set up as `make_accelerator` does: use it instead of a bare
    `PartialState()`, which would make every launched CPU process a single, unconnected process."""
    return PartialState(cpu=use_cpu_processes(), **process_group_options())


def end_processes() -> None:
    """At the end of a launched run: wait for every process, then destroy the process group, so that none exits with
    the group's threads still running (a process that does can abort at exit, "terminate called without an active
    exception", and fail the launch after a finished run). Nothing to do in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def process_group_options() -> dict:
    """The process group's backend where accelerate would find none: gloo for DeepSpeed on CPU processes."""
    return {"backend": "gloo"} if deepspeed_on_cpu() else {}


def make_accelerator(args: TrainingArguments) -> Accelerator:
    """An Accelerator for one stage: its mixed precision and trackers."""
    log_with = list(args.report_to) or None
    if log_with and "tensorboard" in log_with:
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "report_to=['tensorboard'] needs the tensorboard package: pip install tensorboard, or drop it."
            ) from error
    group = process_group_options()
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        kwargs_handlers=[InitProcessGroupKwargs(**group)] if group else None,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=1,  # the loop accumulates itself (a step's item count is known in advance)
        log_with=log_with,
        project_dir=str(Path(args.output_dir) / "logs") if log_with else None,
    )
    if deepspeed_zero_stage() == 3:
        # accelerate tells transformers about ZeRO-3 (a global config), after which every model transformers builds
        # is partitioned as it is made (zero.Init) and generate syncs the processes' steps. The loop instead takes
        # whole models, partitions them in `accelerator.prepare` and gathers them back after each stage (as FSDP2),
        # so models are built, merged and generate whole on every process.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation of `range(num_samples)` seeded by (seed, epoch), optionally without its first samples.

    accelerate cuts this stream into per-process batches, so every process agrees on it without communicating.
    `set_epoch` is called by accelerate's data loader each epoch; `skip(n)` drops the first `n` samples of the
    current epoch only (a resumed run's consumed batches, never read).

    With `lengths` (and `group_size`, the global batch), the permutation is cut into groups of `group_size` and each
    group is sorted by length, longest first, so the micro-batches the processes get have similar lengths (less
    padding); the groups come in a random order. With `modalities` (per sample, whether it has images), groups
    hold one modality each, as LLaVA's `group_by_modality_length`; what is left of both goes last. The samples of
    each optimizer step still do not depend on the number of processes.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        modalities: Sequence[bool] | None = None,
        group_size: int | None = None,
    ):
        if lengths is not None and (len(lengths) != num_samples or not group_size):
            raise ValueError(f"lengths needs one entry per sample ({num_samples}) and a group_size (the global batch).")
        self.num_samples = num_samples
        self.seed = seed
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.modalities = None if modalities is None else torch.as_tensor(modalities, dtype=torch.bool)
        self.group_size = group_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def skip(self, num_samples: int) -> None:
        self._skip = num_samples

    def __len__(self) -> int:
        return self.num_samples - self._skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is not None:
            order = self._grouped(order, generator)
        order = order[self._skip :].tolist()
        self._skip = 0
        yield from order

    def _grouped(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        streams = [order]
        if self.modalities is not None and 0 < int(self.modalities.sum()) < self.num_samples:
            with_images = self.modalities[order]
            streams = [order[with_images], order[~with_images]]
        full, rest = [], []
        for stream in streams:
            for start in range(0, len(stream), self.group_size):
                group = stream[start : start + self.group_size]
                group = group[torch.argsort(self.lengths[group], descending=True, stable=True)]
                (full if len(group) == self.group_size else rest).append(group)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if rest:
            leftover = torch.cat(rest)
            shuffled.append(leftover[torch.argsort(self.lengths[leftover], descending=True, stable=True)])
        return torch.cat(shuffled) if shuffled else order


@dataclass
class TrainResult:
    """What `train` returns: the unwrapped model, its full state dict and the run's figures.

    `model` is an ordinary module with the whole weights on every process, also after FSDP2 and DeepSpeed ZeRO-3
    (gathered into a copy of the model as it was before sharding); save from `state_dict`
    (`model.save_pretrained(folder, state_dict=result.state_dict)`), in which tied parameters appear once.
    """

    model: nn.Module
    state: TrainerState
    num_training_steps: int
    last_loss: float = float("nan")
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    finished: bool = True
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def default_compute_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


# what may change between a run and its resume: how it is run, not what it computes
RESUMABLE_CHANGES = (
    "resume",
    "stop_after_steps",
    "progress_bar",
    "output_dir",
    "report_to",
    "num_workers",
    "log_every_steps",
    "keep_last_checkpoints",
    "save_every_steps",
    # the number of processes may change: the global batch and the data order do not depend on it
    "gradient_accumulation_steps_derived",
)


def field_defaults() -> dict:
    """Field name -> default (as `run_config` writes it) of the settings a run's fingerprint holds, for resuming
    checkpoints written before a field existed (see `load_state`)."""
    defaults = {}
    for cls in (TrainingArguments, OptimizerConfig):
        for f in fields(cls):
            if f.default is not MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not MISSING:
                defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults, default=str))


def run_config(
    args: TrainingArguments, optimizer: OptimizerConfig, num_samples: int, extra: dict | None = None
) -> dict:
    """What must not change between a run and its resume (JSON-able): the schedule, the optimizer, the data size and
    `extra` (the model and stage). The number of processes is not in it: a run may resume on another."""
    arguments = {k: v for k, v in asdict(args).items() if k not in RESUMABLE_CHANGES}
    if args.per_device_batch_size is not None:
        arguments.pop("gradient_accumulation_steps")  # derived from the number of processes
    payload = {"args": arguments, "optimizer": asdict(optimizer), "num_samples": num_samples, **(extra or {})}
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def run_fingerprint(config: dict) -> str:
    """A short digest of `run_config`."""
    text = json.dumps(config, sort_keys=True)
    return f"{hashlib.sha256(text.encode()).hexdigest()[:16]} ({config['num_samples']} samples)"


def release(accelerator: Accelerator) -> None:
    """Leave `accelerator` as a stage found it, so the next stage of the run can use it: trackers finished (not with
    `end_training`, which also destroys the process group), prepared objects and checkpoint registrations released."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    accelerator.free_memory()
    accelerator._custom_objects.clear()  # the stage's scheduler: the next stage registers its own


def syncing(model: nn.Module, accelerator: Accelerator, sync: bool):
    """The context of a micro-batch's backward: gradients are reduced over processes only when `sync` (the last
    micro-batch of a step); FSDP2 modules are told so directly, DDP through accelerate's `no_sync`."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def deepspeed_backward(engine, loss: torch.Tensor, last: bool) -> None:
    """A micro-batch's backward on a DeepSpeed engine, which reduces the gradients, clips and steps the optimizer on
    the last micro-batch of a step (the loop accumulates; the engine's own gradient_accumulation_steps is 1). As
    accelerate's `backward`, with the step's boundary given rather than taken from accelerate's accumulation."""
    engine.set_gradient_accumulation_boundary(is_boundary=last)
    engine.backward(loss)
    if last:
        engine.step()


def configure_deepspeed(accelerator: Accelerator, args: TrainingArguments) -> None:
    """The DeepSpeed config of a stage, before `accelerator.prepare` makes its engine: the engine clips at the stage's
    max_grad_norm and does not accumulate (the loop does); the micro-batch comes from the loader (accelerate)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = 0.0 if args.max_grad_norm is None else float(args.max_grad_norm)  # 0: DeepSpeed does not clip
    launched = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if launched != "auto" and float(launched) != clipping:
        raise ValueError(
            f"The accelerate config's deepspeed_config.gradient_clipping is {launched}, the stage's max_grad_norm "
            f"{args.max_grad_norm}: set gradient_clipping: auto (the recipe's, per stage) or make them equal."
        )
    accumulation = config.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ValueError(
            f"The DeepSpeed config accumulates {accumulation} micro-batches: set its gradient_accumulation_steps to 1 "
            "(or auto); the loop accumulates the recipe's micro-batches itself."
        )
    config["gradient_clipping"] = clipping
    config["gradient_accumulation_steps"] = 1


def log_partitions(engine, accelerator: Accelerator) -> None:
    """One line per process: what of the model's state its DeepSpeed engine holds (ZeRO-3: its partition of the
    parameters; ZeRO-2: its partition of the optimizer state, which covers the trainable parameters)."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        parameters = list(engine.module.parameters())
        held, total = sum(p.ds_tensor.numel() for p in parameters), sum(p.ds_numel for p in parameters)
        what = "parameter values"
    else:
        held = sum(t.numel() for t in getattr(engine.optimizer, "single_partition_of_fp32_groups", ()))
        total = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        what = "trainable parameter values' optimizer state"
    logger.info(
        "DeepSpeed ZeRO-%d: process %d of %d holds %d of %d %s",
        stage,
        accelerator.process_index,
        accelerator.num_processes,
        held,
        total,
        what,
    )


def log_shards(model: nn.Module, accelerator: Accelerator) -> None:
    """One line per process: how much of the model it holds (its DTensor shards)."""
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    name, biggest = max(model.named_parameters(), key=lambda item: item[1].numel())
    logger.info(
        "FSDP2: process %d of %d holds %d of %d parameter values (%s: local %s of %s)",
        accelerator.process_index,
        accelerator.num_processes,
        local,
        total,
        name,
        tuple(biggest.to_local().shape),
        tuple(biggest.shape),
    )


def train(
    model: nn.Module,
    train_dataset: torch.utils.data.Dataset,
    args: TrainingArguments,
    optimizer_config: OptimizerConfig,
    *,
    collate_fn: Callable | None = None,
    compute_loss: Callable[[nn.Module, dict], torch.Tensor] = default_compute_loss,
    accelerator: Accelerator | None = None,
    fingerprint_extra: dict | None = None,
    tracker_config: dict | None = None,
    lengths: Sequence[int] | None = None,
    modalities: Sequence[bool] | None = None,
    count_items: Callable[[dict], int] | None = None,
) -> TrainResult:
    """Train `model` on `train_dataset` as `args` says; returns the unwrapped model (on `accelerator.device`).

    The steps: the schedule (batch sizes, steps, epochs), the data order and loader, the model, optimizer and
    scheduler prepared (or sharded), a fresh or resumed state, then epochs of optimizer steps (each followed by its
    periodic log and save), and the trained weights gathered.

    Args:
        model: any `nn.Module`; with the default `compute_loss`, `model(**batch).loss` must be the loss.
        train_dataset: a map-style data set; items are collated by `collate_fn` (PyTorch's default if None). If it
            has `set_epoch(epoch)` (augmentation), it is called at the start of each epoch.
        args: see :class:`TrainingArguments`.
        optimizer_config: AdamW, its parameter groups and the cosine schedule (see :mod:`.optim`).
        compute_loss: `(model, batch) -> scalar loss`, for models whose loss is not `outputs.loss` (e.g. a VLM with
            an auxiliary classification loss).
        accelerator: the run's (one for all its stages: made with `make_accelerator`, accumulation 1); default: a new
            one. It is released at the end (:func:`release`), ready for the next stage.
        fingerprint_extra: more things that identify the run (e.g. the stage), checked on resume with the model's
            parameter names, shapes and trainability.
        tracker_config: hyper-parameters logged to the trackers.
        lengths, modalities: per sample, its (estimated) length and whether it has images, for
            `args.group_by_length` (see :class:`EpochSampler`).
        count_items: batch -> the number of items its loss averages over (e.g. supervised tokens). When given, the
            loss of an optimizer step is normalised by the count over all its micro-batches and processes: each
            batch gets `batch["num_items_in_batch"]` = that count / (processes x micro-batches), and
            `compute_loss` must divide its sum by it (as transformers' losses do), so that accumulation and any
            number of processes give the gradient of one big batch. Without it, the micro-batch losses are means,
            averaged.
    """
    args = args.for_processes(accelerator.num_processes if accelerator else process_state().num_processes)
    accelerator = accelerator or make_accelerator(args)
    schedule = plan_schedule(args, accelerator, len(train_dataset))
    sampler, loader = make_loader(train_dataset, args, schedule, collate_fn, lengths, modalities)
    # what the run trains, by parameter (not by config serialisation, which differs between a model built in memory
    # and the same model loaded from its folder)
    parameters = {name: [list(p.shape), p.requires_grad] for name, p in model.named_parameters()}
    run = prepare_run(model, loader, sampler, args, optimizer_config, accelerator, schedule, compute_loss, count_items)
    config = run_config(
        args, optimizer_config, schedule.num_samples, {"parameters": parameters, **(fingerprint_extra or {})}
    )
    state = start_or_resume(run, config)
    if args.report_to:
        accelerator.init_trackers(Path(args.output_dir).name, config=tracker_config or {})
    log_plan(run)
    progress = _Progress(bar=progress_bar(run, state))
    run.model.train()
    while state.global_step < schedule.stop_at and state.epoch < schedule.num_epochs:
        train_epoch(run, train_dataset, state, progress)
    return finish(run, state, progress)


@dataclass
class _Schedule:
    """How a stage's data is cut: per-device micro-batches, optimizer steps and epochs (see :func:`plan_schedule`)."""

    num_samples: int
    per_device_batch: int
    batches_per_epoch: int  # per process, full batches only
    num_training_steps: int  # the schedule's length
    num_epochs: int
    stop_at: int  # the step this run stops at (`stop_after_steps`, or the end)


@dataclass
class _Run:
    """What the steps of one stage share: its arguments, schedule and the prepared model, optimizer and data."""

    args: TrainingArguments
    accelerator: Accelerator
    schedule: _Schedule
    model: nn.Module  # prepared by accelerate, or sharded by the loop (FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    sampler: EpochSampler
    compute_loss: Callable[[nn.Module, dict], torch.Tensor]
    count_items: Callable[[dict], int] | None
    # FSDP2, DeepSpeed: the model before sharding on the meta device, to gather the weights into
    skeleton: nn.Module | None = None
    forward_context: Callable = contextlib.nullcontext

    @property
    def sharded(self) -> tuple | None:
        """(model, optimizer) when the loop sharded them (FSDP2): checkpoints save and load them itself."""
        return (self.model, self.optimizer) if is_sharded(self.model) else None

    @property
    def deepspeed(self) -> bool:
        """Whether the model is a DeepSpeed engine (it steps the optimizer and clips in its backward)."""
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.args.output_dir) / "checkpoints"


@dataclass
class _Progress:
    """The running figures of a stage: the loss since the last log, the samples trained, the bar."""

    bar: tqdm
    started: float = field(default_factory=time.perf_counter)
    running_loss: float = 0.0
    running_count: int = 0
    last_loss: float = float("nan")
    samples_done: int = 0


def plan_schedule(args: TrainingArguments, accelerator: Accelerator, num_samples: int) -> _Schedule:
    """The batch sizes, optimizer steps and epochs of a stage on `accelerator`'s processes; refuses an accelerator
    that accumulates itself, a global batch the processes can't share and a data set smaller than one batch."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"The accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches itself: make it "
            "with gradient_accumulation_steps=1 (make_accelerator does); the loop accumulates "
            "args.gradient_accumulation_steps micro-batches per optimizer step."
        )
    num_processes = accelerator.num_processes
    micro_batches = num_processes * args.gradient_accumulation_steps
    if args.batch_size % micro_batches:
        raise ValueError(
            f"batch_size={args.batch_size} (global) is not divisible by num_processes ({num_processes}) x "
            f"gradient_accumulation_steps ({args.gradient_accumulation_steps}) = {micro_batches}: choose a multiple."
        )
    per_device_batch = args.batch_size // micro_batches
    batches_per_epoch = num_samples // (per_device_batch * num_processes)
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise ValueError(
            f"The data set has {num_samples} samples, fewer than one global batch of {args.batch_size}: lower "
            "batch_size or add data."
        )
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_training_steps = args.max_steps or args.num_epochs * steps_per_epoch
    return _Schedule(
        num_samples=num_samples,
        per_device_batch=per_device_batch,
        batches_per_epoch=batches_per_epoch,
        num_training_steps=num_training_steps,
        num_epochs=math.ceil(num_training_steps / steps_per_epoch),
        stop_at=min(num_training_steps, args.stop_after_steps or num_training_steps),
    )


def make_loader(
    train_dataset: torch.utils.data.Dataset,
    args: TrainingArguments,
    schedule: _Schedule,
    collate_fn: Callable | None,
    lengths: Sequence[int] | None,
    modalities: Sequence[bool] | None,
) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
    """The data order (:class:`EpochSampler`, grouped by length when `args.group_by_length`) and its loader of
    per-device micro-batches (not yet prepared)."""
    if args.group_by_length and lengths is None:
        raise ValueError("group_by_length=True needs the samples' lengths: pass lengths= (and modalities=) to train.")
    grouping = (
        {"lengths": lengths, "modalities": modalities, "group_size": args.batch_size} if args.group_by_length else {}
    )
    sampler = EpochSampler(schedule.num_samples, seed=args.seed, **grouping)
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=schedule.per_device_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=collate_fn,
        # Its own generator: each new iterator draws a worker seed from it, which would otherwise shift the global
        # RNG (dropout) at every epoch start, and a run resumed mid-epoch would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    return sampler, loader


def prepare_run(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    sampler: EpochSampler,
    args: TrainingArguments,
    optimizer_config: OptimizerConfig,
    accelerator: Accelerator,
    schedule: _Schedule,
    compute_loss: Callable[[nn.Module, dict], torch.Tensor],
    count_items: Callable[[dict], int] | None,
) -> _Run:
    """The model, its optimizer and the loader prepared by accelerate (or, under FSDP2, the model sharded by the loop
    itself, the same on CPU and GPU, never handed to `accelerate.prepare`: see :mod:`.distributed`), and the
    scheduler, registered for checkpointing but not prepared (accelerate would step it once per process; here it
    steps once per update)."""
    fsdp = FSDPSettings.from_env()
    skeleton = None
    if fsdp is not None:
        if accelerator.mixed_precision == "fp16":
            raise ValueError("FSDP2 here trains in fp32 or bf16 (no fp16 loss scaling): use --mixed-precision bf16.")
        skeleton = meta_skeleton(model)
        model = shard(model.to(accelerator.device), fsdp)
        log_shards(model, accelerator)
        optimizer = build_optimizer(model, optimizer_config)
        loader = accelerator.prepare(loader)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, args)
        check_deepspeed_precision(model, accelerator.mixed_precision)
        skeleton = meta_skeleton(model)  # the shape and dtypes to take the weights back into after training
        optimizer = build_optimizer(model, optimizer_config)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        log_partitions(model, accelerator)
    else:
        optimizer = build_optimizer(model, optimizer_config)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, optimizer_config, schedule.num_training_steps)
    accelerator.register_for_checkpointing(scheduler)
    return _Run(
        args=args,
        accelerator=accelerator,
        schedule=schedule,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sampler=sampler,
        compute_loss=compute_loss,
        count_items=count_items,
        skeleton=skeleton,
        # a prepared model runs under autocast itself; the sharded one, not prepared, in accelerate's autocast context
        forward_context=accelerator.autocast if fsdp is not None else contextlib.nullcontext,
    )


def start_or_resume(run: _Run, config: dict) -> TrainerState:
    """A fresh state, or the one of the checkpoint `args.resume` names (model, optimizer, scheduler and RNGs
    restored, `config` checked against the checkpoint's), its position converted to this number of processes."""
    accelerator, num_processes = run.accelerator, run.accelerator.num_processes
    state = TrainerState(fingerprint=run_fingerprint(config), config=config, num_processes=num_processes)
    checkpoint = resolve_resume(run.args.resume, run.checkpoints_dir)
    if checkpoint is None:
        return state
    state = load_state(accelerator, checkpoint, config, sharded=run.sharded, added_defaults=field_defaults())
    if state.num_processes != num_processes:
        logger.warning(
            "Resuming a run saved on %d processes on %d: the data order, the samples of each step, the model, "
            "optimizer and schedule continue exactly; random draws made by each process (dropout) do not.",
            state.num_processes,
            num_processes,
        )
        state.num_processes = num_processes
    per_step_batch = run.schedule.per_device_batch * num_processes
    if state.batches_in_epoch and not state.samples_in_epoch:  # saved before samples were counted
        state.samples_in_epoch = state.batches_in_epoch * per_step_batch
    state.batches_in_epoch = state.samples_in_epoch // per_step_batch
    return state


def log_plan(run: _Run) -> None:
    """One line (main process): the samples, epochs, steps, how a step's batch is cut, and the precision."""
    if not run.accelerator.is_main_process:
        return
    logger.info(
        "Training: %d samples, %d epochs, %d optimizer steps of %d samples (%d processes x %d per device x %d "
        "accumulation), %s precision",
        run.schedule.num_samples,
        run.schedule.num_epochs,
        run.schedule.num_training_steps,
        run.args.batch_size,
        run.accelerator.num_processes,
        run.schedule.per_device_batch,
        run.args.gradient_accumulation_steps,
        "fp32" if run.accelerator.mixed_precision == "no" else run.accelerator.mixed_precision,
    )


def progress_bar(run: _Run, state: TrainerState) -> tqdm:
    """The stage's bar of optimizer steps (local main process, when `args.progress_bar`), from the resumed step."""
    return tqdm(
        total=run.schedule.num_training_steps,
        initial=state.global_step,
        desc=Path(run.args.output_dir).name,
        unit="step",
        disable=not (run.args.progress_bar and run.accelerator.is_local_main_process),
        dynamic_ncols=True,
    )


def train_epoch(run: _Run, train_dataset, state: TrainerState, progress: _Progress) -> None:
    """The rest of the current epoch (a resumed one without its consumed samples, never read), or up to the stop:
    optimizer steps, each followed by its log and save when they are due."""
    run.loader.set_epoch(state.epoch)
    if hasattr(train_dataset, "set_epoch"):
        train_dataset.set_epoch(state.epoch)
    run.sampler.skip(state.samples_in_epoch)
    batches = iter(run.loader)
    while state.global_step < run.schedule.stop_at:
        window = list(itertools.islice(batches, run.args.gradient_accumulation_steps))  # one optimizer step
        if not window:
            break
        step_loss = optimizer_step(run, window, state)
        progress.running_loss += step_loss
        progress.running_count += 1
        progress.samples_done += run.args.batch_size
        progress.bar.update(1)
        if state.global_step % run.args.log_every_steps == 0 or state.global_step == run.schedule.stop_at:
            log_progress(run, state, progress)
        if run.args.save_every_steps and (
            state.global_step % run.args.save_every_steps == 0 or state.global_step == run.schedule.stop_at
        ):
            save_state_atomically(
                run.accelerator, run.checkpoints_dir, state, run.args.keep_last_checkpoints, sharded=run.sharded
            )


def optimizer_step(run: _Run, window: list[dict], state: TrainerState) -> float:
    """One optimizer step over the micro-batches of `window` (gradients reduced over processes once, on the last),
    clipped, then the scheduler's step; `state` moves on by a step (and to the next epoch after its last batch).

    Returns:
        the step's loss on this process: the sum of its micro-batch losses with `count_items` (each normalised by
        the step's item count), else their mean.
    """
    accelerator, num_processes = run.accelerator, run.accelerator.num_processes
    if run.count_items is not None:  # normalise by the step's item count over all micro-batches and processes
        count = torch.tensor(float(sum(run.count_items(b) for b in window)), device=accelerator.device)
        items = (accelerator.reduce(count, "sum") / (num_processes * len(window))).clamp(min=1.0)
    step_loss = 0.0
    for position, batch in enumerate(window):
        last = position == len(window) - 1
        with syncing(run.model, accelerator, last), run.forward_context():  # gradients reduced once a step
            if run.count_items is not None:
                batch["num_items_in_batch"] = items
                loss = run.compute_loss(run.model, batch)
            else:
                loss = run.compute_loss(run.model, batch) / len(window)
            if run.deepspeed:
                deepspeed_backward(run.model, loss, last)
            else:
                accelerator.backward(loss)
        step_loss += loss.detach().float().item()
        state.batches_in_epoch += 1
        state.samples_in_epoch += run.schedule.per_device_batch * num_processes
    if run.args.max_grad_norm is not None and not run.deepspeed:  # DeepSpeed clipped in its step
        accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.global_step += 1
    if state.batches_in_epoch >= run.schedule.batches_per_epoch:
        state.epoch, state.batches_in_epoch, state.samples_in_epoch = state.epoch + 1, 0, 0
    return step_loss / (len(window) if run.count_items is not None else 1)


def log_progress(run: _Run, state: TrainerState, progress: _Progress) -> None:
    """The mean loss since the last log over all processes, the learning rate and the speed: on the bar and to the
    trackers; the running loss starts again."""
    accelerator = run.accelerator
    mean_loss = accelerator.reduce(
        torch.tensor(progress.running_loss / progress.running_count, device=accelerator.device), "mean"
    ).item()
    progress.last_loss, progress.running_loss, progress.running_count = mean_loss, 0.0, 0
    speed = progress.samples_done / max(time.perf_counter() - progress.started, 1e-9)
    learning_rate = run.scheduler.get_last_lr()[0]
    progress.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}", samples_s=f"{speed:.0f}")
    if accelerator.is_main_process:
        progress_logger.info(
            "step %d/%d epoch %d loss %.4f lr %.3e samples/s %.0f",
            state.global_step,
            run.schedule.stop_at,
            state.epoch,
            mean_loss,
            learning_rate,
            speed,
        )
    if run.args.report_to:
        accelerator.log(
            {"train/loss": mean_loss, "train/lr": learning_rate, "train/samples_per_second": speed},
            step=state.global_step,
        )


def finish(run: _Run, state: TrainerState, progress: _Progress) -> TrainResult:
    """The trained model as an ordinary module and its full state dict (gathered from every process), the run's
    figures, and the accelerator released for the next stage."""
    progress.bar.close()
    elapsed = time.perf_counter() - progress.started
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    num_training_steps = run.schedule.num_training_steps
    if accelerator.is_main_process:
        logger.info("Stopped at step %d of %d after %.1f s", state.global_step, num_training_steps, elapsed)
    if run.skeleton is not None:  # an ordinary module on every process: the full weights gathered into the skeleton
        if is_sharded(run.model):
            full = full_state_dict(run.model)
        else:  # DeepSpeed: partitions gathered, trainable weights from the fp32 masters, in the dtypes before
            full = deepspeed_full_state_dict(run.model, {k: t.dtype for k, t in run.skeleton.state_dict().items()})
        trained = unsharded_copy(full, run.skeleton)
        state_dict = trained.state_dict()  # tied parameters share a tensor again: saved once, as by one process
    else:  # DDP: every process holds the whole model
        state_dict = accelerator.get_state_dict(run.model)
        trained = accelerator.unwrap_model(run.model)
    release(accelerator)
    return TrainResult(
        model=trained,
        state_dict=state_dict,
        state=state,
        num_training_steps=num_training_steps,
        last_loss=progress.last_loss,
        train_seconds=elapsed,
        samples_per_second=progress.samples_done / elapsed if elapsed > 0 else 0.0,
        finished=state.global_step >= num_training_steps,
    )
