"""titletune/tracking.py: the training run in MLflow, with MLflow's own source tags, the SFTConfig
params logged by transformers' callback, and ours (DVC experiment, data md5, LoRA and model)."""
from __future__ import annotations

import json

import pytest
import yaml

from titletune.params import load_params
from titletune.tracking import data_md5_from_lock


def test_data_md5_comes_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    assert data_md5_from_lock(lock=lock) is None                 # before the first `dvc repro`
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "preprocess": {"outs": [{"path": "data/processed", "md5": "aaa.dir"}]},
        "tokenize-format": {"outs": [{"path": "data/formatted", "md5": "bbb.dir"},
                                     {"path": "metrics/format.json", "md5": "ccc"}]}}}))
    assert data_md5_from_lock(lock=lock) == "bbb.dir"
    assert data_md5_from_lock("data/processed", lock=lock) == "aaa.dir"


@pytest.mark.slow
def test_the_training_run_is_tagged_and_has_every_param(pipeline_repo):
    from mlflow.tracking import MlflowClient
    repo = pipeline_repo
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"]
    record = client.get_run(run_id)
    tags, params = record.data.tags, record.data.params

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    formatted_md5 = next(o["md5"] for o in lock["stages"]["tokenize-format"]["outs"] if o["path"] == "data/formatted")
    assert tags["data_md5"] == formatted_md5 and tags["stage"] == "train" and tags["hardware"] == "cpu"
    assert "dvc_experiment" not in tags                            # a plain `dvc repro`, no experiment
    # MLflow's own: the commit of the checkout the stage ran in, and the script.
    head = __import__("subprocess").run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True,
                                        text=True).stdout.strip()   # pipeline_repo committed its outputs after
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.name"] == str(repo / "stages" / "train.py")

    model, fmt, train = load_params("model", "format", "train", path=repo / "params.yaml")
    # transformers' MLflow callback: the SFTConfig arguments (our same-named train params among them)
    assert float(params["learning_rate"]) == train.learning_rate
    assert int(params["per_device_train_batch_size"]) == train.per_device_train_batch_size
    assert float(params["warmup_steps"]) == train.warmup_steps and params["optim"].startswith("adamw_torch")
    # ours: what does not reach SFTConfig as it is
    assert params["model.name"] == model.name and params["format.style"] == fmt.style
    assert int(params["train.lora_r"]) == train.lora_r and params["train.optim"] == "auto"
    assert record.data.metrics["final_val_loss_after"] == pytest.approx(
        json.loads((repo / "metrics" / "train.json").read_text())["val_loss_after"])
    assert [m.value for m in client.get_metric_history(run_id, "loss")]  # per-step metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"adapter", "plots"}
