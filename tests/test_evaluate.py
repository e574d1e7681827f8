"""Stage `evaluate` (stages/evaluate.py): base vs tuned metrics, samples, plot and MLflow, and the
gate that fails when the adapter does not help. Reuses the session's `pipeline_repo` (conftest)."""
from __future__ import annotations

import json

import pytest

from titletune.params import load_params
from titletune.testing import run

KEYS = {"rougeL", "bleu", "chrf", "nll", "perplexity", "empty_rate", "degenerate_rate", "mean_output_tokens"}


@pytest.mark.slow
def test_evaluate_writes_metrics_samples_plot_and_mlflow(pipeline_repo):
    repo = pipeline_repo
    n = load_params("evaluate", path=repo / "params.yaml").max_samples
    report = json.loads((repo / "metrics/eval.json").read_text())
    assert report["samples"] == n
    for model in ("base", "tuned", "delta"):
        assert set(report[model]) == KEYS
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    for k in KEYS:
        assert report["delta"][k] == pytest.approx(report["tuned"][k] - report["base"][k])

    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == n
    assert {"uid", "title", "question", "reference", "base", "tuned"} == set(samples[0])
    assert samples[0]["title"] in samples[0]["question"]
    assert (repo / "metrics/eval_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert json.dumps(shown).count('"perplexity"') >= 3 and "metrics/eval.json" in json.dumps(shown)

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    logged = client.get_run(run_id)  # the training run itself
    assert logged.data.metrics["eval_tuned_perplexity"] == pytest.approx(report["tuned"]["perplexity"])
    assert logged.data.metrics["eval_samples"] == n
    assert logged.data.tags["evaluate.max_samples"] == str(n)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/eval.json", "eval/eval_samples.jsonl", "eval/eval_compare.png"}


@pytest.mark.slow
def test_gate_fails_when_the_adapter_does_not_help(model_runs):
    """With a zero adapter tuned == base, so perplexity does not improve: exit 2, one clear line."""
    proc = model_runs["gate"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "not better than the base model" in error[0]
    assert "require_improvement" in error[0] and "Traceback" not in proc.stderr
    report = json.loads((model_runs["tmp"] / "gate/eval.json").read_text())  # written, for the diagnosis
    assert report["delta"]["perplexity"] == 0
