"""Stage `train` (stages/train.py): it lowers the validation loss and writes its metrics and step log;
a killed run resumes from its last checkpoint; only a train param change re-runs it."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from titletune.testing import ENV, FAST_PARAMS, run, set_params


@pytest.mark.slow
def test_training_lowers_val_loss_and_writes_metrics_and_step_log(pipeline_repo):
    metrics = json.loads((pipeline_repo / "metrics" / "train.json").read_text())
    fast = FAST_PARAMS["train"]
    assert metrics["steps"] == fast["max_steps"] and metrics["world_size"] == 1
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["train_loss_after"] < metrics["train_loss_before"]
    assert metrics["tokens_per_s"] > 0 and metrics["tokens_per_s_overall"] > 0 and metrics["peak_memory_gb"] > 0
    assert metrics["effective_batch_size"] == fast["per_device_train_batch_size"]
    # tokens_per_step: auto (the default) is examples per step on a CPU, as 0 always was
    assert metrics["attention"] == "sdpa (cpu)" and metrics["tokens_per_step"] == 0
    assert metrics["batching"] == f"{fast['per_device_train_batch_size']} examples a step, padded"
    assert 0 < metrics["real_tokens_per_step"] <= metrics["tokens_per_optimizer_step"]
    assert metrics["rank_step_s"][0] > 0 and metrics["rank_step_spread"] == 1.0
    # train.early_stopping_patience 0 (the default): trained to max_steps, the last weights kept
    assert (metrics["stopped_early"], metrics["stop_reason"], metrics["best_step"]) == (False, "max_steps", None)
    with open(pipeline_repo / "metrics" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "learning_rate"]
    logged = [int(r["step"]) for r in rows if r["train_loss"]]
    assert logged == list(range(fast["logging_steps"], fast["max_steps"] + 1, fast["logging_steps"]))
    evaluated = [int(r["step"]) for r in rows if r["val_loss"]]
    assert evaluated == list(range(fast["eval_steps"], fast["max_steps"] + 1, fast["eval_steps"]))
    assert (pipeline_repo / "metrics" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = pipeline_repo / "models" / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert "training_run.json" not in {p.name for p in adapter.iterdir()}    # the run id is in train.json
    assert len(metrics["mlflow_run_id"]) == 32
    assert not list((pipeline_repo / ".titletune" / "checkpoints").glob("*/checkpoint-*"))   # cleaned after success


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"train": {"max_steps": 24, "save_steps": 4, "eval_steps": 100}})
    cmd = [sys.executable, "-m", "stages.train", "data/formatted", "models/adapter", "metrics"]
    proc = subprocess.Popen(cmd, cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        # trainer_state.json is the last file a checkpoint gets: kill once checkpoint-8 is complete
        # (in .titletune/checkpoints/<run fingerprint>/: git- and dvc-ignored, no DVC output)
        while not list((repo / ".titletune" / "checkpoints").glob("*/checkpoint-8/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint"
            time.sleep(0.5)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = run(["dvc", "repro", "train"], repo, timeout=600)
    assert "resuming from the last checkpoint" in resumed.stdout + resumed.stderr
    # The killed run's MLflow run stayed RUNNING; the next start ended it KILLED (and only it).
    assert "ended 1 MLflow run(s) of this repository whose process was killed" in resumed.stdout
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"], [r.info for r in runs]
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 24
    assert not list((repo / ".titletune" / "checkpoints").glob("*/checkpoint-*"))  # cleaned after success


@pytest.mark.slow
def test_early_stopping_stops_on_a_rising_val_loss_and_keeps_the_best_checkpoint(pipeline_repo, tmp_path):
    """A learning rate far too high for the tiny model (0.05): the validation loss rises from the
    second evaluation on; patience 1 stops there, and the adapter kept is the best checkpoint's."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"train": {"max_steps": 30, "eval_steps": 2, "save_steps": 2, "logging_steps": 2,
                                "learning_rate": 0.05, "early_stopping_patience": 1}})
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = run([sys.executable, "-m", "stages.train", "data/formatted", "models/adapter", "metrics"], repo,
               env=env, timeout=900)
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["stopped_early"] is True and metrics["steps"] < 30
    assert metrics["stop_reason"] == "early stopping: the validation loss did not improve for 1 evaluations"
    with open(repo / "metrics" / "train_log.csv") as f:
        val = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]}
    assert max(val) == metrics["steps"] and metrics["best_step"] == min(val, key=val.get) < metrics["steps"]
    assert metrics["best_val_loss"] == val[metrics["best_step"]] < val[metrics["steps"]]
    # The adapter saved is the best checkpoint's: evaluated again after training, it scores exactly that.
    assert metrics["val_loss_after"] == pytest.approx(metrics["best_val_loss"], abs=1e-6)
    assert f"stopped early (early stopping: the validation loss did not improve for 1 evaluations), " \
           f"adapter of step {metrics['best_step']}" in proc.stdout
    assert "tokens/s (8 examples a step, padded; attention sdpa (cpu)), val loss" in proc.stdout   # which path ran


@pytest.mark.slow
def test_changing_a_train_param_reruns_only_train_and_what_follows(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"train": {"learning_rate": 0.001}})
    changed = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    # train is out of date; the data stages are not (evaluate and export follow once train re-runs)
    assert changed == {"train": [{"changed deps": {"params.yaml": {"train": "modified"}}}]}, changed


def test_a_bad_optimizer_name_stops_train_before_loading_a_model(repo):
    set_params(repo, {"train": {"optim": "adamw_torhc"}})
    proc = run([sys.executable, "-m", "stages.train", "data/formatted", "models/adapter", "metrics"], repo,
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith('error: params.yaml: train.optim: "adamw_torhc" is not allowed (must be one of auto, ')
    assert error.endswith("; did you mean adamw_torch?")
