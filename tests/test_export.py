"""Stage `export` (stages/export.py): the merged model loads with plain transformers, answers
exactly as base + adapter did in evaluate, writes the training prompt through its chat template and
stops on EOS by its generation_config.json; the parity gate fails beyond its tolerances."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from titletune.testing import run, set_params

# Loads the merged model with plain transformers (no Unsloth, no PEFT) and answers the test
# questions with evaluate's own generation settings.
MERGED_ANSWERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from titletune.generation.engine import generate, generation_kwargs, prompt_ids, until_eos
from titletune.modeling import load_formatted
from titletune.params import load_params
from titletune.splits import select_examples
ep = load_params("evaluate")
model = AutoModelForCausalLM.from_pretrained("models/merged").eval()
tok = AutoTokenizer.from_pretrained("models/merged")
examples = select_examples(load_formatted("data/formatted")["test"], ep.max_samples)
ids = generate(model, prompt_ids(examples), pad_token_id=tok.pad_token_id,
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


# Plain transformers again, the way a user of models/merged asks: the question through the saved
# chat template, generate() with no eos/pad argument (generation_config.json decides when to stop).
EOS_RUN = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from titletune.generation.engine import prompt_ids
from titletune.modeling import load_formatted
from titletune.splits import select_examples
MAX_NEW = int(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained("models/merged").eval()
tok = AutoTokenizer.from_pretrained("models/merged")
examples = select_examples(load_formatted("data/formatted")["test"], 8)
runs = []
for ex, training_prompt in zip(examples, prompt_ids(examples)):
    ids = tok.apply_chat_template([{"role": "user", "content": ex["question"]}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=MAX_NEW)[0, ids["input_ids"].shape[1]:].tolist()
    runs.append({"training_prompt": ids["input_ids"][0].tolist() == training_prompt, "new": new})
assert not any(m.startswith(("unsloth", "peft")) for m in sys.modules)
print(json.dumps({"eos": tok.eos_token_id, "generation_eos": model.generation_config.eos_token_id, "runs": runs}))
"""


@pytest.mark.slow
def test_merged_model_uses_the_training_prompt_and_stops_on_eos(pipeline_repo):
    repo, max_new = pipeline_repo, 200   # the tiny model's answers end on EOS after 150-190 tokens
    assert (repo / "models/merged/generation_config.json").is_file()
    result = json.loads(run([sys.executable, "-c", EOS_RUN, str(max_new)], repo).stdout.splitlines()[-1])
    assert result["generation_eos"] == result["eos"] or result["eos"] in result["generation_eos"]
    assert all(r["training_prompt"] for r in result["runs"])   # chat template == the training prompt
    for r in result["runs"]:
        assert len(r["new"]) <= max_new and result["eos"] not in r["new"][:-1]   # nothing after an EOS
    stopped = [r for r in result["runs"] if r["new"][-1] == result["eos"] and len(r["new"]) < max_new]
    assert stopped, "no answer ended on EOS within max_new_tokens"

    report = json.loads((repo / "metrics/export.json").read_text())
    assert report["passed"] and report["dtype"] == "float32" and report["samples"] == 8
    assert report["token_mismatch"] == 0 and report["answers_identical"] == 8
    assert report["nll_max_abs_diff"] < 1e-4          # float32: only the order of additions differs


@pytest.mark.slow
def test_parity_gate_fails_beyond_its_tolerance(pipeline_repo, tmp_path):
    """A bfloat16 export from a CPU, where base + adapter computes in float32: its rounding is a
    real difference, which tolerances of 0 do not accept. One line, and models/merged stays."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    before = (repo / "models/merged/model.safetensors").read_bytes()
    set_params(repo, {"export": {"dtype": "bfloat16", "parity_max_token_mismatch": 0, "parity_max_nll_diff": 0}})
    proc = run([sys.executable, "-m", "stages.export", "data/formatted", "models/adapter", "models/merged",
                "metrics/export.json"], repo, check=False, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: the merged model does not answer like base + adapter on 8 test examples: ")
    assert "export.parity_max_nll_diff 0" in errors[0] and "models/merged was not written" in errors[0]
    report = json.loads((repo / "metrics/export.json").read_text())
    assert report["passed"] is False and report["dtype"] == "bfloat16" and report["nll_max_abs_diff"] > 0
    assert (repo / "models/merged/model.safetensors").read_bytes() == before
