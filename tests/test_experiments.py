"""The experiment loop on the embedded default: `dvc exp run -S` in the workspace, `--queue` +
`dvc queue start` (a temp-dir run that sees only git-tracked files), `dvc exp show --json`
with params and metrics, and one MLflow run per experiment named and tagged after it.

MLflow: the stages log to sqlite:///<repo root>/mlflow.db unless MLFLOW_TRACKING_URI is set. A
queued experiment runs in a temporary copy (.dvc/tmp/exps/tmpXXXX) that is deleted afterwards,
so the test (and the README) set MLFLOW_TRACKING_URI to one absolute sqlite path: workspace and
queued runs all land in that one store.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from titletune.testing import ENV, run

METRIC_FILES = ("metrics/data.json", "metrics/format.json", "metrics/train.json", "metrics/eval.json")


def test_everything_a_queued_run_needs_is_tracked(repo):
    """Every dependency that no stage produces is committed (the copy commits exactly what git
    does not ignore), so a queued run, which sees only the git commit, finds it."""
    from dvc.repo import Repo
    tracked = set(run(["git", "ls-files"], repo).stdout.splitlines())
    with Repo(str(repo)) as dvc_repo:
        stages = list(dvc_repo.index.stages)
        outs = {o.def_path for s in stages for o in s.outs}
        deps = {d.def_path for s in stages for d in s.deps}
    assert {"dvc.yaml", "params.yaml"} <= tracked
    # a dep inside a stage's output folder (data/formatted/test) is produced too
    sources = {d for d in deps if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in outs)}
    assert "data/sample/trn.json.gz" in sources and "models/tiny-llama" in sources
    for dep in sorted(sources):
        files = [f for f in tracked if f == dep or f.startswith(dep.rstrip("/") + "/")]
        assert files, f"{dep}: a stage dependency that git does not track (or ignores)"
    for needed in ("models/tiny-llama/config.json", "models/tiny-llama/model.safetensors",
                   "models/tiny-llama/tokenizer.json"):
        assert needed in tracked


def wait_for_queue(repo: Path, env: dict, timeout: float) -> str:
    """Poll `dvc queue status` until no experiment is queued or running; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], repo, env=env).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        if time.monotonic() > deadline:
            run(["dvc", "queue", "kill", "--all"], repo, env=env, check=False)
            raise AssertionError(f"queue not done after {timeout} s:\n{status}")
        time.sleep(5)  # each `dvc queue status` costs ~1 s of CPU


def exp_rows(show: list) -> dict[str, dict]:
    """{experiment name: data} from `dvc exp show --json` (DVC 3 layout), baseline as 'workspace'
    and by its rev."""
    rows = {}
    for baseline in show:
        rows[baseline.get("name") or baseline["rev"]] = baseline["data"]
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = rev["data"]
    return rows


def metric(data: dict, path: str) -> dict:
    return data["metrics"][path]["data"]


def mlflow_runs(store: Path) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("titletune")
    assert experiment is not None, "no 'titletune' experiment in the MLflow store"
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two training runs: ~2.5 min on 2 idle cores, 15 min seen on busy ones
def test_exp_run_queue_show_and_mlflow(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    shutil.rmtree(repo / "mlruns", ignore_errors=True)   # start from an empty MLflow store
    (repo / "mlflow.db").unlink(missing_ok=True)
    store = repo / "mlflow.db"
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    # Targets keep it cheap (each stage run imports Unsloth, ~16 s): the workspace experiment runs
    # up to `train`, the queued one up to `evaluate` (its MLflow logging is the path at risk in a
    # temp dir); no export.

    # Queue first: a queued experiment snapshots the workspace as it is now (a workspace
    # experiment run before it would leave its params applied to the workspace).
    out = run(["dvc", "exp", "run", "--queue", "evaluate", "-n", "lr-high",
               "-S", "train.learning_rate=0.004", "-S", "train.seed=7"], repo, env=env).stdout
    assert "Queued experiment 'lr-high'" in out

    # Workspace experiment, one -S.
    out = run(["dvc", "exp", "run", "train", "-n", "lr-low", "-S", "train.learning_rate=0.001"],
              repo, env=env, timeout=900).stdout
    assert "Running stage 'train'" in out
    assert "Running stage 'tokenize-format'" not in out         # the data stages are reused
    assert "Ran experiment(s): lr-low" in out

    # The queued one: a worker runs it in .dvc/tmp/exps/tmpXXXX, from the git commit + DVC cache.
    run(["dvc", "queue", "start"], repo, env=env)
    status = wait_for_queue(repo, env, timeout=900)
    assert "Success" in status, status + run(["dvc", "queue", "logs", "lr-high"], repo, env=env,
                                             check=False).stdout[-4000:]
    run(["dvc", "queue", "stop"], repo, env=env, check=False)   # the worker stops once idle anyway
    check_show_and_mlflow(repo, env, store)


def check_show_and_mlflow(repo: Path, env: dict, store: Path) -> None:
    """`dvc exp show` has both experiments with their params and all metrics; MLflow has one run
    for each, named after it."""
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo, env=env).stdout)
    rows = exp_rows(show)
    assert {"lr-low", "lr-high"} <= set(rows), sorted(rows)
    baseline = next(b for b in show if b["rev"] != "workspace")["data"]    # the commit (main)
    for name, lr, seed in (("lr-low", 0.001, 42), ("lr-high", 0.004, 7)):
        data = rows[name]
        train_params = data["params"]["params.yaml"]["data"]["train"]
        assert (train_params["learning_rate"], train_params["seed"]) == (lr, seed)
        for path in METRIC_FILES:
            assert metric(data, path), f"{name}: no {path} in dvc exp show"
        assert metric(data, "metrics/data.json") == metric(baseline, "metrics/data.json")
        assert metric(data, "metrics/train.json")["val_loss_after"] != \
            metric(baseline, "metrics/train.json")["val_loss_after"]
    # lr-low stopped at train (its eval.json is the baseline's); lr-high ran evaluate.
    assert metric(rows["lr-high"], "metrics/eval.json")["tuned"] != metric(baseline, "metrics/eval.json")["tuned"]

    # One MLflow run per experiment, all in the one store: named and tagged after the experiment,
    # with the train metrics and (for lr-high, logged by evaluate into the same run) the eval ones.
    runs = {r.data.tags.get("dvc_experiment"): r for r in mlflow_runs(store)}
    assert {"lr-low", "lr-high"} <= set(runs), sorted(map(str, runs))
    for name in ("lr-low", "lr-high"):
        r, data = runs[name], rows[name]
        assert r.info.run_name == name and r.info.status == "FINISHED"
        assert float(r.data.params["learning_rate"]) == \
            data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        assert r.data.metrics["final_val_loss_after"] == pytest.approx(
            metric(data, "metrics/train.json")["val_loss_after"])
    assert runs["lr-high"].data.metrics["eval_tuned_perplexity"] == pytest.approx(
        metric(rows["lr-high"], "metrics/eval.json")["tuned"]["perplexity"])
    assert "eval_tuned_perplexity" not in runs["lr-low"].data.metrics
    # Nothing went to a store inside the (deleted) temp dir of the queued run.
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))
