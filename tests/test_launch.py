"""titletune/launch.py: the data-parallel relaunch under torchrun, and rank 0 as the only writer."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from titletune.params import load_params
from titletune.testing import ENV, run, set_params
from titletune.launch import is_rank0, launch_command, resolve_gpus, world_size


def test_launch_command_is_torchrun_of_the_same_command(monkeypatch):
    assert launch_command(4, ["-m", "stages.train", "a", "b"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "stages.train", "a", "b"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_rank0() and world_size() == 2          # rank 1 writes nothing
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert is_rank0() and world_size() == 1


def test_gpus_auto_is_every_visible_gpu_and_more_is_an_error():
    import torch
    visible = torch.cuda.device_count()
    assert resolve_gpus("auto") == visible and resolve_gpus(0) == 0
    from titletune.cli import UserError
    with pytest.raises(UserError, match=f"train.gpus: {visible + 1} asked for, {visible} visible"):
        resolve_gpus(visible + 1)


@pytest.mark.slow
def test_two_process_data_parallel_run_writes_once_from_rank0(pipeline_repo, tmp_path):
    """The multi-GPU path on CPU: torchrun with 2 processes (gloo), exactly as train.gpus=2 launches
    it on GPUs. Both ranks train; only rank 0 writes the adapter, metrics and the MLflow run."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    shutil.rmtree(repo / "models" / "adapter")
    # With early stopping on: the best checkpoint is reloaded under DDP too, and a run that reaches
    # max_steps is not reported as stopped early (the final evaluation does not count).
    set_params(repo, {"train": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
                                "early_stopping_patience": 1}})
    store = tmp_path / "mlflow.db"
    cmd = launch_command(2, ["-m", "stages.train", "data/formatted", "models/adapter", "metrics"])
    proc = run(cmd, repo, env=dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{store}"), timeout=600)

    log = proc.stdout + proc.stderr
    assert log.count("train: cpu, 2 process(es)") == 2             # both ranks ran
    assert log.count("train: 4 steps in") == 1                     # one summary, from rank 0
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    tp = load_params("train", path=repo / "params.yaml")
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["stopped_early"] is False and metrics["stop_reason"] == "max_steps"
    assert metrics["best_step"] in (2, 4)
    assert metrics["effective_batch_size"] == 2 * tp.per_device_train_batch_size * tp.gradient_accumulation_steps
    assert (repo / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((repo / ".titletune" / "checkpoints").glob("*/checkpoint-*"))

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["final_world_size"] == 2
