"""Stage `evaluate` (stages/evaluate.py): base vs tuned metrics, samples, plot and MLflow, the
gate that fails when the adapter does not help, and the MLflow model registry version of an adapter
that passes. Reuses the session's `pipeline_repo` (conftest)."""
from __future__ import annotations

import json
from pathlib import Path

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
    assert logged.data.params["evaluate.max_samples"] == str(n)   # evaluate logs its params on that run
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
    from mlflow import MlflowClient                       # an adapter that fails the gate is not registered
    assert MlflowClient(tracking_uri=f"sqlite:///{model_runs['tmp'] / 'gate.db'}").search_registered_models() == []


# Plain transformers + PEFT (no Unsloth): the registry's download is an adapter folder PEFT loads.
PEFT_LOAD = """
import sys
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/tiny-llama"), sys.argv[1])
print(type(model).__name__, sorted(model.peft_config))
"""


@pytest.mark.slow
def test_the_adapter_is_a_registered_model_version_with_metrics_data_and_commit(pipeline_repo, tmp_path):
    import hashlib
    import subprocess
    import sys

    import mlflow
    import yaml
    from mlflow import MlflowClient

    repo = pipeline_repo
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions("name = 'titletune'")
    assert len(versions) == 1, versions                  # one pipeline run: one adapter, one version
    version = versions[0]
    tags = version.tags
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    assert version.run_id == run_id and version.source.endswith("/adapter")   # the training run's adapter
    report = json.loads((repo / "metrics/eval.json").read_text())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    formatted_md5 = next(o["md5"] for o in lock["stages"]["tokenize-format"]["outs"] if o["path"] == "data/formatted")
    commit = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True, text=True).stdout.strip()
    weights = (repo / "models/adapter/adapter_model.safetensors").read_bytes()
    assert tags["data_md5"] == formatted_md5 and tags["git_commit"] == commit   # HEAD~1: the commit repro ran at
    assert tags["adapter_md5"] == hashlib.md5(weights).hexdigest() and tags["training_run_id"] == run_id
    assert float(tags["eval_tuned_perplexity"]) == pytest.approx(report["tuned"]["perplexity"], rel=1e-5)
    assert float(tags["eval_delta_rougeL"]) == pytest.approx(report["delta"]["rougeL"], rel=1e-5, abs=1e-9)
    assert tags["eval_samples"] == str(report["samples"]) and tags["base_model"] == "models/tiny-llama"
    # export attached the merged model and its parity figures to the same version
    assert tags["merged_model"].endswith("/merged") and tags["export_passed"] == "True"
    assert tags["export_dtype"] == "float32" and float(tags["export_token_mismatch"]) == 0
    assert {a.path for a in client.list_artifacts(run_id)} >= {"adapter", "eval", "merged", "gguf"}
    # Nothing else, and so no secret: every tag is one of these.
    metrics = {f"eval_{m}_{k}" for m in ("tuned", "delta") for k in report["tuned"]}
    assert set(tags) == metrics | {"eval_samples", "base_model", "adapter_md5", "training_run_id", "git_commit",
                                   "data_md5", "merged_model", "export_dtype", "export_passed",
                                   "export_token_mismatch", "export_nll_max_abs_diff",
                                   # the gguf stage's (tests/test_gguf.py)
                                   "gguf", *(f"gguf_f16_{k}" for k in ("passed", "size_mb", "answers_identical",
                                                                         "nll_max_abs_diff"))}

    # models:/NAME/VERSION downloads the adapter folder, which PEFT loads onto the base model.
    mlflow.set_tracking_uri(uri)          # the registry the models:/ URI is resolved in
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/titletune/{version.version}",
                                                      dst_path=str(tmp_path / "dl")))
    assert (folder / "adapter_model.safetensors").read_bytes() == weights
    loaded = run([sys.executable, "-c", PEFT_LOAD, str(folder)], repo).stdout.splitlines()[-1]
    assert loaded == "PeftModelForCausalLM ['default']"
