"""Stage `export` (stages/export.py): the merged model loads with plain transformers and answers
exactly as base + adapter did in evaluate."""
from __future__ import annotations

import json
import sys

import pytest

from titletune.testing import run

# Loads the merged model with plain transformers (no Unsloth, no PEFT) and answers the test
# questions with evaluate's own generation settings.
MERGED_ANSWERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from titletune.generation import generate, generation_kwargs, prompt_ids, select_examples, until_eos
from titletune.modeling import load_formatted
from titletune.params import load_params
ep = load_params("evaluate")
model = AutoModelForCausalLM.from_pretrained("models/merged").eval()
tok = AutoTokenizer.from_pretrained("models/merged")
examples = select_examples(load_formatted("data/formatted")["test"], ep.max_samples)
ids = generate(model, prompt_ids(examples), pad_token_id=tok.pad_token_id, batch_size=ep.batch_size,
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
