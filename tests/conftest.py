"""Shared fixtures: throwaway copies of the repository to run real git/DVC commands in
(helpers in titletune.testing)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from titletune.testing import FAST_PARAMS, copy_repo, run, set_params, zero_adapter


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh, committed copy of this repository (no DVC outputs, no cache)."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """A committed repo copy with FAST_PARAMS where `dvc repro` has run once (every stage).

    Shared by many tests: treat it as read-only; copy it (shutil.copytree) to change it. Under
    pytest-xdist (`make test` runs two workers) the first worker that needs it builds it and the
    other waits and reuses it: a session fixture is otherwise built once per worker.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    repo, done = shared / "pipeline" / "repo", shared / "pipeline" / "built"
    with FileLock(shared / "pipeline.lock"):
        if repo.exists() and not done.exists():
            pytest.fail(f"{repo}: building the pipeline repo failed in another worker (see its error)")
        if not done.exists():
            copy_repo(repo)
            set_params(repo, FAST_PARAMS)
            run(["git", "commit", "-qam", "fast params"], repo)
            run(["dvc", "repro"], repo, timeout=900)
            run(["git", "add", "-A"], repo)
            run(["git", "commit", "-qm", "repro"], repo)
            done.touch()
    return repo


@pytest.fixture(scope="session")
def model_runs(pipeline_repo, tmp_path_factory) -> dict:
    """Two commands on the pipeline repo's trained model, run at the same time (2 cores; most of
    each run is importing Unsloth): evaluate with a zero adapter (the gate must fail) and
    `scripts/ask.py` with a question of the evaluated test set. Read-only on the repo."""
    import json
    import shutil
    import subprocess
    import sys

    from titletune.testing import ENV

    repo, tmp = pipeline_repo, tmp_path_factory.mktemp("model_runs")
    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    asked = next((s for s in samples if s["tuned"].strip()), None)
    assert asked, "the tuned model gave only empty answers"
    zero = zero_adapter(repo / "models/adapter", tmp / "zero_adapter")
    # The gate runs in tmp, with its own params.yaml, MLflow store and ./mlruns: the repo stays as it is
    # (and no metrics/train.json there names a training run: evaluate starts a new MLflow run).
    shutil.copy(repo / "params.yaml", tmp / "params.yaml")
    set_params(tmp, {"model": {"name": str(repo / "models/tiny-llama")}})

    def start(cmd: list, cwd: Path, **env) -> subprocess.Popen:
        # A script run by its path puts its own folder first on sys.path, not the repo: PYTHONPATH
        # makes it import the repo's titletune (not whichever checkout the venv has installed).
        return subprocess.Popen(cmd, cwd=cwd, env=dict(ENV, PYTHONPATH=str(repo), **env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = {
        "gate": start([sys.executable, str(repo / "stages/evaluate.py"), str(repo / "data/formatted/test"), str(zero),
                       str(repo / "metrics/eval_base.json"), str(repo / "metrics/eval_base_samples.jsonl"),
                       str(tmp / "gate")], tmp, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'gate.db'}"),
        "ask": start([sys.executable, "scripts/ask.py", asked["question"]], repo),
    }
    finished = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        finished[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return {"repo": repo, "tmp": tmp, "samples": samples, "asked": asked, **finished}


def pytest_collection_modifyitems(items):
    """The tests on pipeline_repo first (in their files' order), then the rest. `make test` hands
    each of its two workers half of this list (pytest-xdist's worksteal): one builds the pipeline
    repo and goes on with its tests while the other runs tests that need no pipeline, instead of
    waiting for the build; a worker out of tests takes half of what the other has left."""
    items.sort(key=lambda item: "pipeline_repo" not in item.fixturenames)
