"""Stage `evaluate`: does fine-tuning help? The base model against base + adapter, on the test split.

    python stages/evaluate.py data/formatted models/adapter metrics

Reads params `model`, `format` and `evaluate`. Both models answer the same test questions
(titletune.generation.engine: batched, left padding, KV cache; greedy unless evaluate.do_sample) and
score the reference descriptions (teacher-forced NLL and perplexity of the completion tokens);
titletune.generation.metrics scores them. Writes, in the metrics folder:
    eval.json           {base: {...}, tuned: {...}, delta: tuned - base}   (DVC metrics)
    eval_samples.jsonl  title, question, reference and both answers, one test example a line
    eval_compare.png    base vs tuned, one pair of bars per metric
and logs them, with the evaluate params, to the training run in MLflow (its id is in
metrics/train.json; titletune.tracking.stage_run says when it is a run of its own). With
evaluate.require_improvement (the default) the stage fails when the tuned model's perplexity is
not below the base model's; an adapter that passes becomes a version of the MLflow registered
model `evaluate.registered_model`, tagged with these metrics, the data md5 and the git commit
(titletune.tracking.register_evaluation).
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, new_figure, run_main, write_json, write_png

ARGUMENTS = "DATA_DIR ADAPTER_DIR METRICS_DIR"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import contextlib
import json
from pathlib import Path

import torch

from titletune.generation.engine import (SAMPLING_SEED, eos_token_ids, generate, generation_kwargs,
                                         load_for_generation, prompt_ids, reference_nll, until_eos)
from titletune.generation.metrics import delta, score
from titletune.modeling import check_answer_room, load_formatted
from titletune.params import read_params
from titletune.splits import select_examples
from titletune.tracking import check_store, log_evaluation, register_evaluation

PLOTTED = [("perplexity", "perplexity (lower is better)"), ("rougeL", "ROUGE-L F1"),
           ("bleu", "BLEU"), ("chrf", "chrF"), ("degenerate_rate", "degenerate answers (share)"),
           ("mean_output_tokens", "answer length (tokens)")]


def answer_and_score(model, tokenizer, examples, ep) -> tuple[dict, dict]:
    """({base, tuned}: metrics, {base, tuned}: answers). The base model is the same weights with
    the adapter switched off."""
    pad, bs = tokenizer.pad_token_id, ep.slots()
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = prompt_ids(examples)
    results, answers = {}, {}
    for name in ("base", "tuned"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            nll_sum, n_tokens = reference_nll(model, examples, pad_token_id=pad, batch_size=bs,
                                              desc=f"{name}: scoring references")
            torch.manual_seed(SAMPLING_SEED)
            new_ids = generate(model, prompts, pad_token_id=pad, eos_ids=eos_ids,
                               desc=f"{name}: generating", **generation_kwargs(ep))
        answer_ids = [until_eos(ids, eos_ids) for ids in new_ids]
        answers[name] = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answer_ids]
        results[name] = score(answers[name], examples["content"], list(map(len, answer_ids)), nll_sum, n_tokens)
    return results, answers


def write_samples(path: Path, examples, answers: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"uid": ex["uid"], "title": ex["title"], "question": ex["question"],
                                "reference": ex["content"], "base": answers["base"][i],
                                "tuned": answers["tuned"][i]}, ensure_ascii=False) + "\n")


def plot_comparison(results: dict, n: int, path: Path) -> None:
    fig, axes = new_figure(nrows=2, ncols=3, figsize=(10, 5.5))
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        bars = ax.bar(["base", "tuned"], [results["base"][key], results["tuned"][key]],
                      color=["#9e9e9e", "#1f77b4"])
        ax.bar_label(bars, fmt="%.3g")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"titletune: base vs fine-tuned model on {n} test examples")
    fig.tight_layout()
    write_png(fig, path)


def main() -> None:
    data_dir, adapter_dir, metrics_dir = command_line(ARGUMENTS)
    params = read_params()
    model_params, fmt, ep = params.model, params.format, params.evaluate
    check_store()  # before the model loads: an unusable MLflow store fails in seconds
    examples = select_examples(load_formatted(data_dir)["test"], ep.max_samples)
    if len(examples) == 0:
        raise UserError(f"{data_dir}: the test split is empty; raise preprocess.test_fraction")

    model, tokenizer = load_for_generation(model_params, adapter_dir, merge=False)
    check_answer_room(model, max(map(len, prompt_ids(examples))), ep.max_new_tokens, "evaluate.max_new_tokens",
                      model_params.name)
    results, answers = answer_and_score(model, tokenizer, examples, ep)

    report = {"samples": len(examples), **results, "delta": delta(results["base"], results["tuned"])}
    files = [metrics_dir / "eval.json", metrics_dir / "eval_samples.jsonl", metrics_dir / "eval_compare.png"]
    write_json(files[0], report)
    write_samples(files[1], examples, answers)
    plot_comparison(results, len(examples), files[2])
    run_id = log_evaluation(params, report, files, metrics_dir / "train.json")  # the training run, as a rule

    b, t = results["base"], results["tuned"]
    print(f"evaluate: {len(examples)} test examples, base -> tuned: perplexity {b['perplexity']:.4g} -> "
          f"{t['perplexity']:.4g}, ROUGE-L {b['rougeL']:.3f} -> {t['rougeL']:.3f}, BLEU {b['bleu']:.2f} -> "
          f"{t['bleu']:.2f}, chrF {b['chrf']:.1f} -> {t['chrf']:.1f}, degenerate {b['degenerate_rate']:.0%} -> "
          f"{t['degenerate_rate']:.0%}; {files[0]}")
    failed = ep.require_improvement and not t["perplexity"] < b["perplexity"]
    if ep.registered_model and not failed:  # an adapter that fails the gate is not registered
        version = register_evaluation(ep.registered_model, adapter_dir, report, run_id, model_params.name)
        print(f"evaluate: MLflow model registry: {ep.registered_model} version {version.version} "
              f"(models:/{ep.registered_model}/{version.version})")
    if failed:
        raise UserError(
            f"the fine-tuned model is not better than the base model: perplexity {t['perplexity']:.6g} "
            f"(tuned) is not below {b['perplexity']:.6g} (base) on {len(examples)} test examples. "
            f"Check the adapter or train longer ({files[0]} has all metrics); to accept it anyway, "
            "set evaluate.require_improvement: false in params.yaml")


if __name__ == "__main__":
    run_main(main)
