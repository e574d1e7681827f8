"""Any result can be rebuilt exactly.

- Data: the data stages (decompress, preprocess, tokenize-format) run in a fresh repo copy, at
  another path, give byte-identical outputs to those of the session's `pipeline_repo` (another
  fresh copy): same md5 for every output in dvc.lock.
- Training: a second CPU training run with the same seed (forced, in a copy of `pipeline_repo` at
  another path) gives the same loss curve (metrics/train_log.csv), the same losses and the same
  adapter, byte for byte: the same md5 in dvc.lock, so evaluate and export do not re-run.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from titletune.testing import ENV, FAST_PARAMS, copy_repo, run, set_params

DATA_STAGES = ("decompress", "preprocess", "tokenize-format")


def lock_outs(repo: Path, stages) -> dict[str, str]:
    """{out path: md5} of the given stages, from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in stages for o in lock[s]["outs"]}


@pytest.mark.slow
def test_data_stages_give_identical_hashes(pipeline_repo, tmp_path):
    repo = copy_repo(tmp_path / "second")
    set_params(repo, FAST_PARAMS)
    run(["git", "commit", "-qam", "fast params"], repo)
    run(["dvc", "repro", "tokenize-format"], repo, timeout=600)

    first, second = lock_outs(pipeline_repo, DATA_STAGES), lock_outs(repo, DATA_STAGES)
    assert set(first) == {"data/interim/trn.jsonl", "data/processed", "metrics/data.json",
                          "data/formatted", "metrics/format.json"}
    assert second == first
    # Directory outputs hash their file list: the same files, not only the same total.
    assert first["data/formatted"].endswith(".dir") and first["data/processed"].endswith(".dir")


@pytest.mark.slow
def test_training_with_the_same_seed_gives_identical_loss_curves(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    # A private MLflow store (the copied one would log artifacts into pipeline_repo's mlruns/).
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run(["dvc", "repro", "--force", "--single-item", "train"], repo, env=env, timeout=900)

    log = "metrics/train_log.csv"
    first, second = (pipeline_repo / log).read_text(), (repo / log).read_text()
    assert len(first.splitlines()) >= 1 + FAST_PARAMS["train"]["max_steps"] // FAST_PARAMS["train"]["logging_steps"]
    assert second == first

    losses = ("train_loss_before", "train_loss_after", "val_loss_before", "val_loss_after")
    metrics = [yaml.safe_load((r / "metrics/train.json").read_text()) for r in (pipeline_repo, repo)]
    assert {k: metrics[0][k] for k in losses} == {k: metrics[1][k] for k in losses}
    adapter = {r: {p.relative_to(r).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
                   for p in sorted((r / "models/adapter").rglob("*")) if p.is_file()} for r in (pipeline_repo, repo)}
    assert "models/adapter/adapter_model.safetensors" in adapter[repo]
    assert adapter[repo] == adapter[pipeline_repo]
    config = json.loads((repo / "models/adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/tiny-llama"      # model.name, as in params.yaml
    assert config["target_modules"] == sorted(config["target_modules"])
    assert lock_outs(repo, ["train"])["models/adapter"] == lock_outs(pipeline_repo, ["train"])["models/adapter"]
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}   # evaluate, export: up to date
