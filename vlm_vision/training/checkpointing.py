"""Training-state checkpoints that are complete or absent: `accelerator.save_state` into a temporary folder, renamed.

Layout under a run's `checkpoints/` folder:

    checkpoint-00000100/        accelerate's state (model, optimizer, scheduler, RNG of every process, ...) and
        trainer_state.json      the loop's position (step, epoch, batches consumed) plus the run's fingerprint
    .checkpoint-00000200.tmp/   a save in progress (or interrupted): never taken for a checkpoint

Every process writes its part into the temporary folder (accelerate saves per-process RNG states, and sharded
optimizers under FSDP/DeepSpeed); then the main process writes `trainer_state.json` last and renames the folder,
which is atomic on one file system. A run killed mid-save leaves only a `.tmp` folder, which the next save of that
step replaces. With several machines the folder must be on a file system they share.

A checkpoint whose files were damaged afterwards (a full disk, a copy cut short) is found before anything is loaded
(:func:`checkpoint_problem`): resuming from it raises :class:`DamagedCheckpointError` naming it and the file, and
`resume="latest"` falls back to the newest intact checkpoint with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DEEPSPEED_FOLDER = "pytorch_model"  # where accelerate has a DeepSpeed engine save its ZeRO partitions
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RESUME_LATEST = ("latest", "auto")


class DamagedCheckpointError(ValueError):
    """A checkpoint folder with a file that cannot be read (empty, truncated, corrupt); the message names both."""


@dataclass
class TrainerState:
    """Where a run is: optimizer steps done, the epoch, the micro-batches (per process) and samples (all processes)
    consumed in it, and what the run is (`config`, whose digest is `fingerprint`) on how many processes."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_in_epoch: int = 0
    fingerprint: str = ""
    config: dict | None = None
    num_processes: int = 1


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save_state_atomically(
    accelerator, checkpoints_dir: str | os.PathLike, state: TrainerState, keep_last=None, sharded=None
) -> Path:
    """`accelerator.save_state` into `checkpoints_dir/checkpoint-<step>`, all or nothing. Call on every process.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        checkpoints_dir: the folder of the run's checkpoints.
        state: the loop's position, written as `trainer_state.json`.
        keep_last: delete all but the newest `keep_last` complete checkpoints after this one is in place.
        sharded: `(model, optimizer)` of an FSDP2 run (not prepared by accelerate): saved sharded, by every process,
            with torch's distributed checkpoint (:func:`.distributed.save_sharded`).

    Returns:
        The checkpoint folder.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / checkpoint_name(state.global_step)
    staging = checkpoints_dir / f".{final.name}.tmp"  # the same path on every process
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if sharded is not None:
        from .distributed import save_sharded

        save_sharded(*sharded, staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(staging / STATE_FILE, "w") as f:
            json.dump(asdict(state), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)  # the same step saved again (e.g. at the end of a resumed, finished run)
        os.replace(staging, final)
        logger.info("Saved checkpoint %s", final)
        if keep_last:
            for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `checkpoints_dir`, oldest first (temporary and incomplete folders are ignored)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a complete checkpoint can't be resumed from, naming the damaged file, or None when its files read.

    Cheap: headers only. `trainer_state.json` must parse; safetensors files must open; torch archives (what
    `torch.save` writes: `.bin`, `.pt`, `.pkl`) must have their zip directory; no file may be empty.
    """
    checkpoint = Path(checkpoint)
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = _file_problem(path)
        if problem is not None:
            return f"{path.relative_to(checkpoint)} {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "is empty"
    if path.name == STATE_FILE:
        try:
            TrainerState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError; unknown fields a TypeError
            return f"is not a trainer state ({error})"
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            return f"is not a readable safetensors file ({error})"
    elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
        with open(path, "rb") as file:
            is_archive = file.read(4) == b"PK\x03\x04"  # torch.save's zip format (older pickles are left alone)
        if is_archive:
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as error:
                return f"is a truncated or corrupt torch archive ({error})"
    return None


def _damaged(checkpoint: Path, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"Cannot resume from {checkpoint}: {problem}, as after a full disk or an interrupted copy. Resume from "
        "another checkpoint (--resume latest takes the newest intact one), or delete this one."
    )


def find_latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `checkpoints_dir`, or None."""
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str | os.PathLike | None, checkpoints_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: None for a fresh start; "latest"/"auto": the newest complete one in
    `checkpoints_dir` (None when there is none yet); otherwise a checkpoint folder, which must be complete."""
    if resume is None or str(resume) == "":
        return None
    if str(resume) in RESUME_LATEST:
        checkpoints = list_checkpoints(checkpoints_dir)
        if not checkpoints:
            logger.info("No complete checkpoint in %s yet: starting from the beginning.", checkpoints_dir)
            return None
        damaged = []
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                if damaged:
                    logger.warning(
                        "Resuming from %s, the newest intact checkpoint: %s",
                        checkpoint,
                        "; ".join(f"{c.name}: {p}" for c, p in damaged),
                    )
                return checkpoint
            damaged.append((checkpoint, problem))
        raise DamagedCheckpointError(
            f"Every checkpoint in {checkpoints_dir} is damaged: "
            + "; ".join(f"{c.name}: {p}" for c, p in damaged)
            + ". Delete them to start over (or resume from a copy)."
        )
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}); a save that was interrupted leaves such a "
            f"folder. Pass a checkpoint-<step> folder, or --resume latest to take the newest complete one."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise _damaged(path, problem)
    return path


def load_state(
    accelerator,
    checkpoint: str | os.PathLike,
    config: dict | None = None,
    sharded=None,
    added_defaults: dict | None = None,
) -> TrainerState:
    """Restore everything `save_state_atomically` saved; return the loop's position.

    Raises:
        DamagedCheckpointError: a file of the checkpoint can't be read (named), or accelerate can't restore it.
        ValueError: the checkpoint is incomplete, or was written by a run with another configuration (the fields
            that differ are named: a different recipe or data set would not continue the same run). A field the
            checkpoint does not have at all (added to the package since it was written) is no difference when its
            value now is its default, `added_defaults[field name]`: a new field's default keeps the old behaviour.
    """
    checkpoint = Path(checkpoint)
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}).")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise _damaged(checkpoint, problem)
    state = TrainerState(**json.loads(state_file.read_text()))
    if config is not None and state.config is not None and "recipe" in config and "recipe" not in state.config:
        logger.warning("%s was saved before runs recorded their recipe: its recipe fields are not checked", checkpoint)
        config = {k: v for k, v in config.items() if k != "recipe"}
    differences = [] if config is None or state.config is None else list(_differences(state.config, config))
    defaults = added_defaults or {}

    def at_its_default(key: str) -> bool:  # a field the checkpoint predates, set as its default
        leaf = key.rsplit(".", 1)[-1]
        return leaf in defaults and _value(config, key) == defaults[leaf]

    added = [key for key, saved, _ in differences if saved is _ABSENT and at_its_default(key)]
    if added:
        logger.info("%s predates the fields %s: resumed with their defaults", checkpoint, ", ".join(added))
    differences = [d for d in differences if d[0] not in added]
    if differences:
        changes = "\n".join(f"  {key}: saved {_shown(a)}, now {_shown(b)}" for key, a, b in differences)
        raise ValueError(
            f"{checkpoint} was saved by a run with another configuration:\n{changes}\nResume with the same recipe "
            "and data (the number of processes may change), or start a new run in another output folder."
        )
    problem = _backend_problem(accelerator, checkpoint, state)
    if problem is not None:
        raise ValueError(f"Cannot resume from {checkpoint}: {problem}")
    try:
        accelerator.load_state(str(checkpoint))
        if sharded is not None:
            from .distributed import load_sharded

            load_sharded(*sharded, checkpoint)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:  # what the headers can't show
        raise DamagedCheckpointError(
            f"Cannot restore the training state from {checkpoint} ({type(error).__name__}: {error}): a file is "
            "damaged, or it was saved for another model or optimizer. Resume from another checkpoint (--resume latest "
            "takes the newest intact one), or start a new run in another output folder."
        ) from error
    logger.info("Resumed from %s (step %d, epoch %d)", checkpoint, state.global_step, state.epoch)
    return state


def _backend_problem(accelerator, checkpoint: Path, state: TrainerState) -> str | None:
    """Why a DeepSpeed checkpoint can't be resumed by this launch (or another checkpoint under DeepSpeed), or None.
    DeepSpeed's engine saves each process's partition (`pytorch_model/zero_pp_rank_<r>_...`), which it loads only on
    as many processes; DDP and FSDP2 checkpoints resume on any number."""
    from accelerate.utils import DistributedType

    saved_by_deepspeed = (checkpoint / DEEPSPEED_FOLDER).is_dir()
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if saved_by_deepspeed and not deepspeed:
        return (
            f"it was saved under DeepSpeed (ZeRO partitions in {DEEPSPEED_FOLDER}/) on {state.num_processes} "
            "processes: resume it with the DeepSpeed accelerate config it was saved with, or start the stage again."
        )
    if deepspeed and not saved_by_deepspeed:
        return (
            "it was saved without DeepSpeed: resume it with the accelerate config it was saved with (DDP, FSDP or one "
            "process), or start the stage again."
        )
    if deepspeed and state.num_processes != accelerator.num_processes:
        return (
            f"it was saved under DeepSpeed on {state.num_processes} processes, each with its partition of the ZeRO "
            f"state, and DeepSpeed loads them only on as many (this launch has {accelerator.num_processes}): resume "
            f"with --num_processes {state.num_processes}, or start the stage again."
        )
    return None


_ABSENT = object()  # a key one side of `_differences` does not have


def _differences(saved, now, prefix: str = ""):
    """(dotted key, saved value, current value) for every leaf that differs between two JSON-like dicts; `_ABSENT`
    where one side lacks the key."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            yield from _differences(
                saved.get(key, _ABSENT), now.get(key, _ABSENT), f"{prefix}.{key}" if prefix else key
            )
    elif saved != now:
        yield prefix, saved, now


def _value(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)
