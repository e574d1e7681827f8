"""Answer and score one model on the test examples: what the stages evaluate-base (the base model,
once per test sample and generation settings) and evaluate (base + adapter, after every training)
share, and the files that carry the base model's results from the first to the second.

    metrics/eval_base.json            {samples, settings, base: {rougeL, bleu, ..., perplexity}}
    metrics/eval_base_samples.jsonl   uid, title, question, reference, base: one test example a line
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from titletune.cli import UserError, atomic_path, write_json
from titletune.generation.engine import (SAMPLING_SEED, eos_token_ids, generate, generation_kwargs, prompt_ids,
                                         reference_nll, until_eos)
from titletune.generation.metrics import score
from titletune.modeling import check_answer_room
from titletune.splits import select_examples

# The evaluate params that change the base model's answers or scores: dvc.yaml declares exactly
# these for evaluate-base (tests/test_evaluation.py checks), so that require_improvement or the
# registry name re-run evaluate alone.
BASE_SETTINGS = ("max_samples", "batch_size", "max_new_tokens", "do_sample", "temperature", "top_p")


def base_settings(ep) -> dict:
    """The evaluate settings of the base model's results: recorded in eval_base.json and compared
    by evaluate, so that results from other settings are never mixed in (run by hand too)."""
    return {key: getattr(ep, key) for key in BASE_SETTINGS}


def load_test_examples(test_dir: Path, max_samples: int):
    """evaluate's fixed sample (titletune.splits) of the formatted test split, read from its own
    folder (data/formatted/test): the stages that read only it depend on only it.

    The folder is a DVC output: datasets' cache files written into it would change its hash, so
    caching is off (as in titletune.modeling.load_formatted)."""
    from datasets import disable_caching, load_from_disk

    if not (test_dir / "dataset_info.json").is_file():
        raise UserError(f"{test_dir}: no formatted split here; run `dvc repro` (tokenize-format) first")
    disable_caching()
    examples = select_examples(load_from_disk(str(test_dir)), max_samples)
    if len(examples) == 0:
        raise UserError(f"{test_dir}: the test split is empty; raise preprocess.test_fraction")
    return examples


def answer_and_score(model, tokenizer, examples, ep, name: str, model_name: str) -> tuple[dict, list[str]]:
    """One model's metrics (titletune.generation.metrics.score) and its answers, in example order:
    it scores the reference descriptions (teacher-forced NLL) and answers every test question.
    First, before any work: the longest question and max_new_tokens fit the model's positions."""
    prompts = prompt_ids(examples)
    check_answer_room(model, max(map(len, prompts)), ep.max_new_tokens, "evaluate.max_new_tokens", model_name)
    pad, bs = tokenizer.pad_token_id, ep.slots()
    eos_ids = eos_token_ids(model, tokenizer)
    nll_sum, n_tokens = reference_nll(model, examples, pad_token_id=pad, batch_size=bs,
                                      desc=f"{name}: scoring references")
    torch.manual_seed(SAMPLING_SEED)  # with do_sample, base and tuned draw from the same seed
    new_ids = generate(model, prompts, pad_token_id=pad, eos_ids=eos_ids,
                       desc=f"{name}: generating", **generation_kwargs(ep))
    answer_ids = [until_eos(ids, eos_ids) for ids in new_ids]
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answer_ids]
    return score(answers, examples["content"], list(map(len, answer_ids)), nll_sum, n_tokens), answers


def write_samples(path: Path, examples, answers: dict[str, list[str]]) -> None:
    """One test example a line: uid, title, question, reference, then each model's answer by name."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            row = {"uid": ex["uid"], "title": ex["title"], "question": ex["question"], "reference": ex["content"]}
            f.write(json.dumps(row | {name: given[i] for name, given in answers.items()}, ensure_ascii=False) + "\n")


def write_base(metrics_path: Path, samples_path: Path, examples, settings: dict, metrics: dict,
               answers: list[str]) -> None:
    write_json(metrics_path, {"samples": len(examples), "settings": settings, "base": metrics})
    write_samples(samples_path, examples, {"base": answers})


def read_base(metrics_path: Path, samples_path: Path, examples, settings: dict) -> tuple[dict, list[str]]:
    """evaluate-base's metrics and answers, checked to be for these settings and examples (the same
    uids in the same order): results left from other settings are an error, never mixed in."""
    rerun = "run `dvc repro evaluate-base` (it answers the test questions with the base model)"
    if not metrics_path.is_file() or not samples_path.is_file():
        raise UserError(f"{metrics_path if not metrics_path.is_file() else samples_path}: not found; {rerun}")
    saved = json.loads(metrics_path.read_text(encoding="utf-8"))
    for key, value in settings.items():
        if saved["settings"].get(key) != value:
            raise UserError(f"{metrics_path}: the base results are for {key} = {saved['settings'].get(key)!r}, "
                            f"params.yaml has {value!r}; {rerun}")
    metrics = saved["base"]
    uids, answers = list(examples["uid"]), []
    with open(samples_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if line_no > len(uids) or row["uid"] != uids[line_no - 1]:
                expected = f"uid {uids[line_no - 1]!r}" if line_no <= len(uids) else f"only {len(uids)} examples"
                raise UserError(f"{samples_path}: line {line_no}: uid {row['uid']!r} where this test sample has "
                                f"{expected}: the base answers are from other settings; {rerun}")
            answers.append(row["base"])
    if len(answers) != len(uids):
        raise UserError(f"{samples_path}: {len(answers)} answers for {len(uids)} test examples: "
                        f"the base answers are from other settings; {rerun}")
    return metrics, answers
