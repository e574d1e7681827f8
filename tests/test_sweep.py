"""A grid sweep: `dvc exp run --queue` with comma-separated `-S` values queues every combination,
`dvc queue start -j 2` runs them two at a time (each in a temporary copy of the repo), and
`dvc exp show --json` compares them; the data stages are reused from the baseline, never re-run.

Kept cheap: the sweep stops at `train` (its metrics are what the comparison reads) and trains
2 steps; a 2 x 2 grid (lora_r x learning_rate), 4 runs of about 30 s each on 2 idle cores. Two
workers at a time (no faster on 2 cores): runs in parallel must share one new MLflow store, whose
creation they once raced for (tracking.sqlite_lock).
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.test_experiments import exp_rows, metric, mlflow_runs, wait_for_queue
from titletune.testing import ENV, run, set_params

DATA_STAGES = ("decompress", "preprocess", "tokenize-format")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_grid_sweep_queues_every_combination_and_compares_them(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    shutil.rmtree(repo / "mlruns", ignore_errors=True)
    (repo / "mlflow.db").unlink(missing_ok=True)
    store = repo / "mlflow.db"
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{store}")   # absolute: queued runs live in temp dirs
    set_params(repo, {"train": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}})
    run(["git", "commit", "-qam", "sweep baseline: 2 training steps"], repo)

    out = run(["dvc", "exp", "run", "--queue", "train", "-S", "train.lora_r=8,16",
               "-S", "train.learning_rate=0.001,0.002"], repo, env=env).stdout
    assert out.count("Queued experiment") == 4, out
    run(["dvc", "queue", "start", "-j", "2"], repo, env=env)
    status = wait_for_queue(repo, env, timeout=1500)
    assert status.count("Success") == 4, status
    run(["dvc", "queue", "stop"], repo, env=env, check=False)

    show = json.loads(run(["dvc", "exp", "show", "--json"], repo, env=env).stdout)
    baseline = next(b for b in show if b["rev"] != "workspace")
    names = [rev["name"] for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
    rows = exp_rows(show)
    grid = {}
    for name in names:
        data = rows[name]
        train = data["params"]["params.yaml"]["data"]["train"]
        grid[(train["lora_r"], train["learning_rate"])] = data
        assert metric(data, "metrics/train.json")["steps"] == 2
        # the data stages were not re-run: their metrics are the baseline's, and the log says so
        assert metric(data, "metrics/data.json") == metric(baseline["data"], "metrics/data.json")
        log = run(["dvc", "queue", "logs", name], repo, env=env).stdout
        assert "Running stage 'train'" in log
        assert not any(f"Running stage '{stage}'" in log for stage in DATA_STAGES), log[-3000:]
    assert set(grid) == {(8, 0.001), (8, 0.002), (16, 0.001), (16, 0.002)}
    losses = {key: metric(data, "metrics/train.json")["val_loss_after"] for key, data in grid.items()}
    assert len(set(losses.values())) == 4, losses           # four different trainings

    runs = [r for r in mlflow_runs(store) if r.data.tags.get("stage") == "train"]
    assert sorted((int(r.data.params["train.lora_r"]), float(r.data.params["learning_rate"])) for r in runs) == \
        sorted(grid)
