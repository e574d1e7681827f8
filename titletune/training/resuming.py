"""Resuming a killed training run: where its checkpoints live and whether they still fit.

Trainer checkpoints go to .titletune/checkpoints/<run fingerprint>/ (git- and dvc-ignored, no DVC
output): a killed run resumes from the last one if the params and the data are still the same
(run_fingerprint), else it starts over; a finished run deletes them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from titletune.launch import is_rank0

# Trainer checkpoints of the run in progress, in a folder named after its fingerprint, outside
# every DVC output: DVC never saves a stage with a `persist` output to its run-cache, and the
# train stage must be cacheable (`dvc push --run-cache` shares a finished run with the team).
CHECKPOINT_DIR = Path(".titletune/checkpoints")
LOSS_BEFORE = "loss_before.json"  # in the run's folder: the losses before training, for a resumed run


def run_fingerprint(sections: dict, train_set) -> str:
    """What a checkpoint must match to be resumed: the params ({name: section}) and the data."""
    params = {name: section.model_dump() for name, section in sections.items()}
    blob = json.dumps({"params": params, "data": train_set._fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_dir(fingerprint: str) -> Path:
    """The folder of one run's checkpoints (the trainer's output_dir)."""
    return CHECKPOINT_DIR / fingerprint


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints (transformers' own order, oldest first) that hold their trainer state,
    the file a checkpoint gets last: one without it was cut short while being saved."""
    if not run_dir.is_dir():
        return []
    return [Path(c) for c in sort_checkpoints(str(run_dir)) if (Path(c) / TRAINER_STATE_NAME).is_file()]


def last_checkpoint_step(fingerprint: str) -> int | None:
    """The step of this run's last complete checkpoint, from its trainer state; None: none yet."""
    complete = complete_checkpoints(checkpoint_dir(fingerprint))
    return TrainerState.load_from_json(str(complete[-1] / TRAINER_STATE_NAME)).global_step if complete else None


def resumable_checkpoint(fingerprint: str) -> bool:
    """True when this run's folder holds a complete checkpoint. The folders of other runs (killed
    with other params or data) are removed: checkpoints can be large, and only an unchanged run
    resumes, so at most one interrupted run is kept."""
    run_dir = checkpoint_dir(fingerprint)
    for other in CHECKPOINT_DIR.glob("*"):
        if other != run_dir:
            _remove(other)
    complete = complete_checkpoints(run_dir)
    for ckpt in sort_checkpoints(str(run_dir)) if run_dir.is_dir() else []:
        if Path(ckpt) not in complete:
            _remove(Path(ckpt))
    if run_dir.is_dir() and get_last_checkpoint(str(run_dir)):   # where the trainer resumes from
        return True
    _remove(run_dir)
    run_dir.mkdir(parents=True)
    return False


def _remove(path: Path) -> None:
    """A folder with what is in it; a file or a link (never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def resume_decision(fingerprint: str, world_size: int) -> bool:
    """Rank 0 keeps or clears the checkpoints; under torchrun every rank then sees its choice."""
    resume = resumable_checkpoint(fingerprint) if is_rank0() else False
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has cleared or kept the checkpoints
        resume = get_last_checkpoint(str(checkpoint_dir(fingerprint))) is not None
    return resume


def clear_checkpoints(fingerprint: str) -> None:
    """After a finished run: its checkpoints are no longer needed (the adapter is the result)."""
    shutil.rmtree(checkpoint_dir(fingerprint), ignore_errors=True)
