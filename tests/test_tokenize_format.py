"""Stage `tokenize-format` (stages/tokenize_format.py): the formatted dataset on disk and its metrics."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest

from titletune.modeling import load_formatted
from titletune.params import load_params
from titletune.prompt import build_prompt, pick_question
from titletune.testing import FAST_PARAMS, run, set_params


def test_format_stage_reports_a_bad_model_name(repo):
    set_params(repo, {"model": {"name": "models/missing"}})
    (repo / "data" / "processed").mkdir(parents=True)
    proc = run([sys.executable, "-m", "stages.tokenize_format", "data/processed", "data/formatted", "m.json"],
               repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.name: 'models/missing' is not a folder")
    assert "Traceback" not in proc.stderr and not (repo / "data" / "formatted").exists()


def test_missing_splits_say_run_preprocess(repo):
    (repo / "data" / "processed").mkdir(parents=True)
    proc = run([sys.executable, "-m", "stages.tokenize_format", "data/processed", "data/formatted", "m.json"],
               repo, check=False)
    assert proc.returncode == 2
    assert "missing split file(s) ['train', 'val', 'test']; run the preprocess stage first" in proc.stderr


@pytest.mark.slow
def test_formatted_dataset_matches_its_metrics(pipeline_repo):
    data = load_formatted(pipeline_repo / "data/formatted")
    metrics = json.loads((pipeline_repo / "metrics/format.json").read_text())
    max_length = FAST_PARAMS["format"]["max_length"]
    assert metrics["style"] == "instruction" and metrics["max_length"] == max_length
    for split in ("train", "val", "test"):
        rows = data[split]
        assert set(rows.column_names) == {"uid", "title", "content", "question", "prompt", "input_ids",
                                          "completion_mask", "labels"}
        assert metrics[split]["examples"] == len(rows) > 0
        assert metrics[split]["tokens"] == sum(map(len, rows["input_ids"]))
        assert max(map(len, rows["input_ids"])) <= max_length
        assert all(len(ids) == len(mask) and any(mask) for ids, mask in zip(rows["input_ids"], rows["completion_mask"]))
    example = data["train"][0]
    assert example["question"] in example["prompt"] and example["title"] in example["question"]
    import yaml
    questions = yaml.safe_load((pipeline_repo / "params.yaml").read_text())["format"]["questions"]
    assert example["question"] == pick_question(questions, example["uid"]).format(title=example["title"])


@pytest.mark.slow
def test_fingerprints_are_hashes_of_the_data(pipeline_repo):
    """state.json's _fingerprint is pinned to the saved Arrow data, so the same data has the same
    DVC hash in every clone (datasets would derive it from paths and mtimes)."""
    for split in ("train", "val", "test"):
        folder = pipeline_repo / "data/formatted" / split
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("data-*.arrow"))))
        assert json.loads((folder / "state.json").read_text())["_fingerprint"] == digest.hexdigest()[:16]


@pytest.mark.slow
def test_batched_tokenising_gives_the_ids_of_one_tokenizer_call_per_example(pipeline_repo):
    """The stage tokenises 1,000 records a call through the Rust tokenizer, in one process per core;
    every saved example must be what transformers' own call gives for that example alone: the
    prompt with its BOS, then the description and EOS, cut at max_length, labels -100 on the prompt."""
    from transformers import AutoTokenizer
    model, fmt = load_params("model", "format", path=pipeline_repo / "params.yaml")
    tokenizer = AutoTokenizer.from_pretrained(pipeline_repo / model.name)
    data = load_formatted(pipeline_repo / "data/formatted")
    checked = 0
    for split in ("train", "val", "test"):
        for row in data[split]:
            prompt = tokenizer(build_prompt(tokenizer, row["question"], fmt.style), split_special_tokens=True)["input_ids"]
            answer = tokenizer(row["content"][:fmt.text_cap()], add_special_tokens=False,
                               split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + answer)[:fmt.max_length]
            assert row["input_ids"] == ids, row["uid"]
            assert row["completion_mask"] == [0] * len(prompt) + [1] * (len(ids) - len(prompt)), row["uid"]
            assert row["labels"] == [-100] * len(prompt) + ids[len(prompt):], row["uid"]
            checked += 1
    assert checked == sum(json.loads((pipeline_repo / "metrics/format.json").read_text())[s]["examples"]
                          for s in ("train", "val", "test")) > 2000
