"""Stage `evaluate-base` (stages/evaluate_base.py): the base model's answers are generated once and
reused: a training experiment skips the stage, and evaluate's comparison, gate and plot take the
base results from its cached outputs. Reuses the session's `pipeline_repo` (conftest)."""
from __future__ import annotations

import json
import shutil

import pytest

from titletune.testing import run

BASE_FILES = ("metrics/eval_base.json", "metrics/eval_base_samples.jsonl")


@pytest.mark.slow
def test_a_training_experiment_reuses_the_base_answers(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    before = {f: ((repo / f).stat().st_mtime_ns, (repo / f).read_bytes()) for f in BASE_FILES}
    tuned_before = json.loads((repo / "metrics/eval.json").read_text())["tuned"]

    # up to evaluate: export and gguf follow it and are not what this test is about
    proc = run(["dvc", "exp", "run", "evaluate", "-S", "train.learning_rate=0.003"], repo, timeout=900)
    out = proc.stdout + proc.stderr
    assert "Stage 'evaluate-base' didn't change, skipping" in out, out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out
    assert "Running stage 'evaluate-base'" not in out
    assert {f: ((repo / f).stat().st_mtime_ns, (repo / f).read_bytes()) for f in BASE_FILES} == before

    # evaluate compared a newly trained model against the cached base results
    base = json.loads((repo / "metrics/eval_base.json").read_text())["base"]
    report = json.loads((repo / "metrics/eval.json").read_text())
    assert report["base"] == base and report["tuned"] != tuned_before
    assert report["delta"]["perplexity"] == pytest.approx(report["tuned"]["perplexity"] - base["perplexity"])
    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    cached = [json.loads(line) for line in (repo / BASE_FILES[1]).read_text().splitlines()]
    assert [s["base"] for s in samples] == [c["base"] for c in cached]

    # The gate reads the base perplexity from eval_base.json: a base better than any model fails it.
    saved = json.loads((repo / BASE_FILES[0]).read_text())
    saved["base"]["perplexity"] = 1.0
    (repo / BASE_FILES[0]).write_text(json.dumps(saved))
    plot = (repo / "metrics/eval_compare.png").read_bytes()
    gate = run(["dvc", "repro", "--single-item", "evaluate"], repo, check=False, timeout=600)
    assert gate.returncode != 0 and "is not below 1 (base)" in gate.stderr, gate.stderr[-2000:]
    assert json.loads((repo / "metrics/eval.json").read_text())["base"]["perplexity"] == 1.0
    assert (repo / "metrics/eval_compare.png").read_bytes() != plot  # redrawn with the base's 1.0
