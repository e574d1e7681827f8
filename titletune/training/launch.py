"""Data-parallel training on several GPUs of one host: the train stage relaunches itself under
torchrun (PyTorch DDP); every rank trains, only rank 0 writes files and MLflow records.

Multi-node: run torchrun yourself with --nnodes/--rdzv-endpoint (see README); the stage then
sees WORLD_SIZE set and does not relaunch.
"""
from __future__ import annotations

import os
import sys

from titletune.cli import UserError


def resolve_gpus(gpus) -> int:
    """`train.gpus`: auto = every visible GPU (0 on CPU); N = exactly N."""
    import torch
    available = torch.cuda.device_count()
    if gpus == "auto":
        return available
    if gpus > available:
        raise UserError(f"params.yaml: train.gpus: {gpus} asked for, {available} visible")
    return gpus


def launch_command(n_gpus: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `argv` (a script and its arguments, or `-m module ...`)
    data-parallel on n_gpus of this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n_gpus}", *argv]


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
