"""titletune/export/gguf.py and stage `gguf` (stages/gguf.py): the Ollama Modelfile writes exactly
the training prompt; the gate's tolerances; the stage on the pipeline's tiny model writes GGUF files
that llama.cpp loads, with the chat template, the EOS and the tokenizer of models/merged, and
that pass the gate; q4_k_m has its own tolerances; a failing gate is one line and changes nothing;
without llama.cpp, one line says how to install it."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from titletune.export.gguf import gate_problems, go_template_text, modelfile, strip_bos
from titletune.export.merge import compare, prompt_pieces
from titletune.prompt import build_prompt, encode_prompts
from titletune.testing import ENV, ROOT, run, set_params

EVALUATE = SimpleNamespace(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=64)
STAGE = [sys.executable, "-m", "stages.gguf", "data/formatted", "models/adapter", "models/merged", "models/gguf",
         "metrics/gguf.json"]


def render_go_template(template: str, prompt: str) -> str:
    """The part of Go's text/template that Ollama's TEMPLATE uses here: text, {{ .Prompt }} and
    string actions {{ "..." }} (Go's escapes are JSON's for these)."""
    action = re.compile(r'\{\{\s*(\.Prompt|"(?:[^"\\]|\\.)*")\s*\}\}', flags=re.S)
    pieces = action.split(template)  # text, action, text, ...
    assert not any("{{" in text for text in pieces[::2]), f"an action outside the subset: {template!r}"
    return "".join(prompt if i % 2 and piece == ".Prompt" else json.loads(piece) if i % 2 else piece
                   for i, piece in enumerate(pieces))


def modelfile_parts(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M).group(1)
    params = [line.split(" ", 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER ")]
    return {"from": re.search(r"^FROM (.+)$", text, flags=re.M).group(1), "template": template, "params": params}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ROOT / "models/tiny-llama")


@pytest.mark.parametrize("style", ["instruction", "chat"])
def test_the_modelfile_template_writes_the_training_prompt_byte_for_byte(tokenizer, style):
    questions = ["What is Acme Kettle, 1.7 L {steel}?", 'Describe this product: "Mug" \\ 12 oz\u00e9']
    prompts = [build_prompt(tokenizer, q, style) for q in questions]
    examples = {"question": questions, "prompt": prompts, "input_ids": encode_prompts(tokenizer, questions, style)}
    examples = [dict(zip(examples, row)) for row in zip(*examples.values())]
    prefix, suffix = prompt_pieces(examples)
    text = modelfile("titletune-q8_0.gguf", strip_bos(prefix, tokenizer.bos_token), suffix, ["</s>"], EVALUATE)
    parts = modelfile_parts(text)
    assert parts["from"] == "./titletune-q8_0.gguf"
    for question, prompt in zip(questions, prompts):
        rendered = render_go_template(parts["template"], question)
        # The BOS token is no text: llama.cpp and Ollama add it (the GGUF's add_bos_token), as training's tokenizer did.
        assert rendered == (prompt.removeprefix(tokenizer.bos_token) if style == "chat" else prompt)
    assert parts["params"] == [["stop", '"</s>"'], ["temperature", "0"], ["top_p", "1"], ["repeat_penalty", "1"],
                               ["num_predict", "64"]]


def test_template_text_that_looks_like_an_action_stays_text():
    for text in ["Q: {{ .System }}\n", 'three """ quotes', "plain ### Question:\n"]:
        assert render_go_template(go_template_text(text), "x") == text
    sampled = modelfile("f.gguf", "a", "b", ["</s>", "<|eot_id|>"],
                        SimpleNamespace(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=32))
    assert modelfile_parts(sampled)["params"] == [["stop", '"</s>"'], ["stop", '"<|eot_id|>"'], ["temperature", "0.7"],
                                                  ["top_p", "0.9"], ["repeat_penalty", "1"], ["num_predict", "32"]]


def test_the_gate_counts_identical_answers_and_nll():
    reference = {"answers": [[1, 2]] * 8, "nll": [1.0] * 8}
    seven = compare(reference, {"answers": [[1, 2]] * 7 + [[1, 3]], "nll": [1.0] * 7 + [1.04]}, names=("hf", "gguf"))
    assert seven["answers_identical"] == 7 and "nll_mean_gguf" in seven
    keys = ("gguf_min_identical", "gguf_max_nll_diff")
    assert gate_problems(seven, 0.875, 0.05, keys) == []
    problems = gate_problems(seven, 1.0, 0.01, keys)
    assert problems[0] == "7 of 8 greedy answers identical (export.gguf_min_identical 1: 8 needed)"
    assert problems[1].startswith("per-token NLL differs by up to 0.04 nats > export.gguf_max_nll_diff 0.01")
    broken = compare(reference, {"answers": reference["answers"], "nll": [float("nan")] * 8})
    assert len(gate_problems(broken, 0.0, 1.0, keys)) == 1      # a NaN NLL fails


def test_without_llama_cpp_one_line_says_how_to_install_it(repo):
    proc = run(STAGE, repo, check=False, env=dict(ENV, TITLETUNE_LLAMA_CPP=str(repo / "no-such-dir")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("run `make gguf`"), proc.stderr


def tree_md5(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_pipeline_writes_a_gguf_that_llama_cpp_loads_and_that_passes_the_gate(pipeline_repo):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    repo = pipeline_repo
    assert sorted(p.name for p in (repo / "models/gguf").iterdir()) == ["Modelfile", "titletune-f16.gguf"]
    report = json.loads((repo / "metrics/gguf.json").read_text())
    f16 = report["types"]["f16"]
    assert report["passed"] and f16["passed"] and report["samples"] == 8
    assert f16["answers_identical"] >= 7 and f16["nll_max_abs_diff"] <= 0.05 and f16["answer_tokens"] > 0
    assert f16["chat_template"] is True and f16["prompts_tokenized_alike"] == 8
    assert f16["tokenizer"] == "llama" and f16["pre_tokenizer"] == "default"   # SentencePiece: no BPE pre-tokenizer
    hf = AutoTokenizer.from_pretrained(repo / "models/merged")
    assert f16["eog_ids"] == [hf.eos_token_id]

    llm = Llama(model_path=str(repo / "models/gguf/titletune-f16.gguf"), n_ctx=512, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == hf.chat_template
    assert modelfile_parts((repo / "models/gguf/Modelfile").read_text())["from"] == "./titletune-f16.gguf"
    # llama.cpp ends an answer on the EOS by itself (the stop tokens are in the file).
    prompt = build_prompt(hf, "What is Acme Kettle, 1.7 L?", "instruction")
    reasons = [llm.create_completion(prompt, max_tokens=128, temperature=0.8, seed=s)["choices"][0]["finish_reason"]
               for s in range(4)]
    assert "stop" in reasons, reasons

    # export.register_gguf: the files are MLflow artifacts of the adapter's registry version's run
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    version = client.search_model_versions("name = 'titletune'")[0]
    assert version.tags["gguf"].endswith("/gguf") and version.tags["gguf_f16_passed"] == "True"
    assert {a.path for a in client.list_artifacts(version.run_id, "gguf")} == {"gguf/Modelfile",
                                                                               "gguf/titletune-f16.gguf"}


@pytest.mark.slow
def test_q4_k_m_has_its_own_tolerance_and_a_failing_gate_changes_nothing(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"export": {"gguf": ["q4_k_m", "f16"], "register_gguf": False}})
    proc = run(STAGE, repo, timeout=600)
    report = json.loads((repo / "metrics/gguf.json").read_text())
    q4, f16 = report["types"]["q4_k_m"], report["types"]["f16"]
    assert report["passed"] and q4["size_mb"] < f16["size_mb"] and f16["answers_identical"] >= 7
    assert modelfile_parts((repo / "models/gguf/Modelfile").read_text())["from"] == "./titletune-q4_k_m.gguf"
    assert sorted(p.name for p in (repo / "models/gguf").iterdir()) == [
        "Modelfile", "titletune-f16.gguf", "titletune-q4_k_m.gguf"]
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("gguf: q4_k_m ")

    before = {d: tree_md5(repo / d) for d in ("models/gguf", "models/merged", "models/adapter")}
    set_params(repo, {"export": {"gguf_max_nll_diff": 0, "gguf_q4_max_nll_diff": 0}})
    proc = run(STAGE, repo, check=False, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: the GGUF files do not answer like models/merged on 8 test examples: q4_k_m: ")
    assert "export.gguf_q4_max_nll_diff 0" in errors[0] and "models/gguf was not written" in errors[0]
    assert {d: tree_md5(repo / d) for d in before} == before
    assert json.loads((repo / "metrics/gguf.json").read_text())["passed"] is False
    assert not [p for p in (repo / "models").iterdir() if p.name.startswith(".gguf")]   # no temp folder left
