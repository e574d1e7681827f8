"""Helpers for the tests and benchmarks (no stage imports this): throwaway copies of the
repository to run real git and DVC commands in, and the params that make them fast."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the checkout this package is installed from

# Every subprocess runs the venv's python and dvc, without analytics or hub access.
ENV = dict(os.environ, DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
ENV.pop("MLFLOW_TRACKING_URI", None)

# Params that make the whole pipeline take about a minute on 2 cores (tests and benchmarks).
FAST_PARAMS = {
    "format": {"max_length": 128},
    "train": {"max_steps": 12, "per_device_train_batch_size": 8, "eval_steps": 6, "save_steps": 6,
              "logging_steps": 2, "val_samples": 32},
    "evaluate": {"max_samples": 8, "batch_size": 8, "max_new_tokens": 16},
}


def run(cmd: list, cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output in the assertion message."""
    proc = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", ENV), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    """Copy the files git would see (tracked + untracked, not ignored) and commit them in a new repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "copy"], dest)
    return dest


def set_params(repo: Path, overrides: dict) -> None:
    """Write overrides ({section: {key: value}}) into the repo's params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def zero_adapter(adapter: Path, dest: Path) -> Path:
    """A copy of the adapter with every LoRA B matrix zeroed: it changes nothing (tuned == base)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(adapter, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()},
              dest / "adapter_model.safetensors")
    return dest
