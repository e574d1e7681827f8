"""Data-parallel runs on several GPUs of one host: the train stage and scripts/predict.py relaunch
themselves under torchrun; every rank works on its share, only rank 0 writes the final outputs
(train: the adapter, metrics and MLflow records; predict: the output file).

Multi-node: run torchrun yourself with --nnodes/--rdzv-endpoint (see README); the command then
sees WORLD_SIZE set and does not relaunch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from titletune.cli import UserError


def resolve_gpus(gpus, key: str = "train.gpus") -> int:
    """A `gpus` param (`key` names it in the error): auto = every visible GPU (0 on CPU); N = exactly N."""
    import torch
    available = torch.cuda.device_count()
    if gpus == "auto":
        return available
    if gpus > available:
        raise UserError(f"params.yaml: {key}: {gpus} asked for, {available} visible")
    return gpus


def launch_command(n_gpus: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `argv` (a script and its arguments, or `-m module ...`)
    data-parallel on n_gpus of this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n_gpus}", *argv]


def relaunch(n_gpus: int, name: str) -> None:
    """Run this command again under torchrun on n_gpus, as it was started (`python -m module` or
    a script, with its arguments); exit with its exit code."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    this = ["-m", spec.name] if spec else [str(Path(sys.argv[0]).resolve())]
    cmd = launch_command(n_gpus, [*this, *sys.argv[1:]])
    print(f"{name}: launching on {n_gpus} GPUs: {' '.join(cmd)}", flush=True)
    sys.exit(subprocess.run(cmd).returncode)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
