"""evaluate, ask and export end to end on the tiny model.

They reuse the session's `pipeline_repo` (conftest: `dvc repro` of every stage with fast params,
a short training included) and run, at the same time (2 cores; most of each run is importing
Unsloth): evaluate with a zero adapter (the gate) and `scripts/ask.py`. Read-only on the repo.
"""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, ROOT, run


def start(cmd: list[str], cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=dict(ENV, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def zero_adapter(adapter: Path, dest: Path) -> Path:
    """A copy of the adapter with every LoRA B matrix zeroed: it changes nothing (tuned == base)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(adapter, dest)
    (dest / "training_run.json").unlink()  # not the training run's: evaluate starts a new MLflow run
    weights = load_file(dest / "adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()},
              dest / "adapter_model.safetensors")
    return dest


@pytest.fixture(scope="module")
def runs(pipeline_repo, tmp_path_factory) -> dict:
    repo, tmp = pipeline_repo, tmp_path_factory.mktemp("evaluate")
    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    asked = next((s for s in samples if s["tuned"].strip()), None)
    assert asked, "the tuned model gave only empty answers"
    zero = zero_adapter(repo / "models/adapter", tmp / "zero_adapter")
    procs = {
        # Run from tmp with its own MLflow store (and ./mlruns artifacts): the shared repo stays as it is.
        "gate": start([sys.executable, str(repo / "stages/evaluate.py"), str(repo / "data/formatted"), str(zero),
                       str(tmp / "gate")], tmp, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'gate.db'}"),
        "ask": start([sys.executable, "scripts/ask.py", asked["question"]], repo),
    }
    return {"repo": repo, "tmp": tmp, "samples": samples, "asked": asked,
            **{name: finish(proc) for name, proc in procs.items()}}


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_evaluate_writes_metrics_samples_plot_and_mlflow(pipeline_repo):
    from common import load_params
    repo = pipeline_repo
    n = load_params("evaluate", path=repo / "params.yaml")["max_samples"]
    report = json.loads((repo / "metrics/eval.json").read_text())
    assert report["samples"] == n
    keys = {"rougeL", "bleu", "chrf", "nll", "perplexity", "empty_rate", "degenerate_rate", "mean_output_tokens"}
    for model in ("base", "tuned", "delta"):
        assert set(report[model]) == keys
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    for k in keys:
        assert report["delta"][k] == pytest.approx(report["tuned"][k] - report["base"][k])

    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == n
    assert {"title", "question", "reference", "base", "tuned"} <= set(samples[0])
    assert samples[0]["title"] in samples[0]["question"]
    assert (repo / "metrics/eval_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shown = json.dumps(json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout))
    assert "metrics/eval.json" in shown and "perplexity" in shown

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "models/adapter/training_run.json").read_text())["mlflow_run_id"]
    logged = client.get_run(run_id)  # the training run itself
    assert logged.data.metrics["eval_tuned_perplexity"] == pytest.approx(report["tuned"]["perplexity"])
    assert logged.data.tags["evaluate.max_samples"] == str(n)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/eval.json", "eval/eval_samples.jsonl", "eval/eval_compare.png"}


@pytest.mark.slow
def test_gate_fails_when_the_adapter_does_not_help(runs):
    """With a zero adapter tuned == base, so perplexity does not improve: exit 2, one clear line."""
    proc = runs["gate"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "not better than the base model" in error[0]
    assert "require_improvement" in error[0] and "Traceback" not in proc.stderr
    report = json.loads((runs["tmp"] / "gate/eval.json").read_text())  # written, for the diagnosis
    assert report["delta"]["perplexity"] == 0


@pytest.mark.slow
def test_ask_streams_the_tuned_answer(runs):
    stdout = succeeded(runs["ask"]).stdout
    # Greedy: the same answer as evaluate's batched generation for this question.
    assert words(runs["asked"]["tuned"]) in words(stdout)


def test_ask_without_adapter_says_run_dvc_repro(tmp_path):
    proc = run([sys.executable, "scripts/ask.py", "--adapter", str(tmp_path / "none"), "What is X?"],
               ROOT, check=False)
    assert proc.returncode == 2
    assert "no trained adapter" in proc.stderr and "dvc repro" in proc.stderr


def test_ask_reads_questions_until_empty_line_or_eof(monkeypatch):
    spec = importlib.util.spec_from_file_location("ask", ROOT / "scripts" / "ask.py")
    ask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ask)
    assert list(ask.questions("What is X?")) == ["What is X?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is A?\n  What is B?  \n\nignored\n"))
    assert list(ask.questions(None)) == ["What is A?", "What is B?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is C?"))
    assert list(ask.questions(None)) == ["What is C?"]


# Loads the merged model with plain transformers (no Unsloth, no PEFT) and answers the test
# questions with evaluate's own generation settings.
MERGED_ANSWERS = """
import json, sys
sys.path.insert(0, "stages")
from transformers import AutoModelForCausalLM, AutoTokenizer
from common import load_formatted, load_params
from evaluate import generate, generation_kwargs, prompt_ids, select_examples, until_eos
ep = load_params("evaluate")
model = AutoModelForCausalLM.from_pretrained("models/merged").eval()
tok = AutoTokenizer.from_pretrained("models/merged")
examples = select_examples(load_formatted("data/formatted")["test"], ep["max_samples"])
ids = generate(model, prompt_ids(examples), pad_token_id=tok.pad_token_id, batch_size=ep["batch_size"],
               **generation_kwargs(ep))
assert not any(m.startswith(("unsloth", "peft")) for m in sys.modules)
print(json.dumps({"dtype": str(model.dtype), "answers": [
    tok.decode(until_eos(x, {tok.eos_token_id}), skip_special_tokens=True).strip() for x in ids]}))
"""


@pytest.mark.slow
def test_export_merged_equals_base_plus_adapter(pipeline_repo):
    repo = pipeline_repo
    merged = repo / "models/merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    result = json.loads(run([sys.executable, "-c", MERGED_ANSWERS], repo).stdout.splitlines()[-1])
    assert result["dtype"] == "torch.float32"  # export.dtype auto on CPU: see stages/export.py
    # Greedy answers of the merged model == those of base + adapter in metrics/eval_samples.jsonl.
    samples = [json.loads(line) for line in (repo / "metrics/eval_samples.jsonl").read_text().splitlines()]
    assert result["answers"] == [s["tuned"] for s in samples]
