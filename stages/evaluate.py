"""Stage `evaluate`: does fine-tuning help? Base + adapter against the base model, on the test split.

    python stages/evaluate.py data/formatted/test models/adapter metrics/eval_base.json \
        metrics/eval_base_samples.jsonl metrics

Reads params `model`, `format` and `evaluate`. The tuned model (base + adapter) answers the test
questions and scores the reference descriptions (titletune.generation.evaluation, as evaluate-base
does for the base model); the base model's results come from the stage evaluate-base (its
eval_base.json and eval_base_samples.jsonl, checked to be for the same settings and examples), so
a training change regenerates the tuned answers only. Writes, in the metrics folder:
    eval.json           {samples, base: {...}, tuned: {...}, delta: tuned - base}   (DVC metrics)
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

from titletune.cli import UserError, command_line, new_figure, run_main, write_json, write_png

ARGUMENTS = "TEST_DIR ADAPTER_DIR BASE_METRICS BASE_SAMPLES METRICS_DIR"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

from pathlib import Path

from titletune.generation.engine import load_for_generation
from titletune.generation.evaluation import (answer_and_score, base_settings, load_test_examples, read_base,
                                             write_samples)
from titletune.generation.metrics import delta
from titletune.params import read_params
from titletune.tracking import check_store, log_evaluation, register_evaluation

PLOTTED = [("perplexity", "perplexity (lower is better)"), ("rougeL", "ROUGE-L F1"),
           ("bleu", "BLEU"), ("chrf", "chrF"), ("degenerate_rate", "degenerate answers (share)"),
           ("mean_output_tokens", "answer length (tokens)")]


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
    test_dir, adapter_dir, base_metrics, base_samples, metrics_dir = command_line(ARGUMENTS)
    params = read_params()
    model_params, ep = params.model, params.evaluate
    check_store()  # before the model loads: an unusable MLflow store fails in seconds
    examples = load_test_examples(test_dir, ep.max_samples)
    base, base_answers = read_base(base_metrics, base_samples, examples, base_settings(ep))

    model, tokenizer = load_for_generation(model_params, adapter_dir)  # the adapter merged into a working copy
    tuned, tuned_answers = answer_and_score(model, tokenizer, examples, ep, "tuned", model_params.name)
    results, answers = {"base": base, "tuned": tuned}, {"base": base_answers, "tuned": tuned_answers}

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
