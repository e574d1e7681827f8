"""Stage `evaluate-base`: the base model's answers and scores on the test questions, once.

    python stages/evaluate_base.py data/formatted/test metrics/eval_base.json metrics/eval_base_samples.jsonl

Reads params `model` and the evaluate settings that change the answers
(titletune.generation.evaluation.BASE_SETTINGS); dvc.yaml declares exactly those, so training
changes never re-run it: `dvc exp run -S train.learning_rate=...` reuses these results, and the
run-cache restores them wherever the same model, test split and settings were evaluated before.
The base model answers the same fixed sample of test questions as evaluate's tuned model
(titletune.generation.evaluation); writes its metrics (eval_base.json: {samples, settings, base})
and answers (eval_base_samples.jsonl), which evaluate reads.
"""
from __future__ import annotations

from titletune.cli import command_line, run_main

ARGUMENTS = "TEST_DIR BASE_METRICS BASE_SAMPLES"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

from titletune.generation.engine import load_for_generation
from titletune.generation.evaluation import answer_and_score, base_settings, load_test_examples, write_base
from titletune.params import load_params


def main() -> None:
    test_dir, metrics_path, samples_path = command_line(ARGUMENTS)
    model_params, ep = load_params("model", "evaluate")
    examples = load_test_examples(test_dir, ep.max_samples)

    model, tokenizer = load_for_generation(model_params)
    metrics, answers = answer_and_score(model, tokenizer, examples, ep, "base", model_params.name)
    write_base(metrics_path, samples_path, examples, base_settings(ep), metrics, answers)
    print(f"evaluate-base: {len(examples)} test examples, base model {model_params.name}: perplexity "
          f"{metrics['perplexity']:.4g}, ROUGE-L {metrics['rougeL']:.3f}, BLEU {metrics['bleu']:.2f}, "
          f"chrF {metrics['chrf']:.1f}, degenerate {metrics['degenerate_rate']:.0%}; {metrics_path}")


if __name__ == "__main__":
    run_main(main)
