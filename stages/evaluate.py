"""evaluate: does fine-tuning help? The base model against base + adapter, on the test split.

    python stages/evaluate.py data/formatted models/adapter metrics

Both models answer the same test questions (batched, left padding, KV cache; greedy unless
evaluate.do_sample) and score the reference descriptions (teacher-forced NLL and perplexity of
the completion tokens). Writes, in the metrics folder:
    eval.json           {base: {...}, tuned: {...}, delta: tuned - base}   (DVC metrics)
    eval_samples.jsonl  title, question, reference and both answers, one test example a line
    eval_compare.png    base vs tuned, one pair of bars per metric
and logs them to the training run in MLflow. With evaluate.require_improvement (the default)
the stage fails when the tuned model's perplexity is not below the base model's.

Unsloth is not imported at the top: common.load_model imports it before transformers and PEFT.
It takes ~16 s, and the metric functions and generate() below (used by the tests and the
generation-speed benchmark) don't need it.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import zlib
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm import tqdm

from common import (UserError, atomic_path, load_formatted, load_params, load_tuned_model, mlflow_setup,
                    run_main, write_json)

# An answer is degenerate when it is empty or more than half of its word trigrams repeat an
# earlier one (the model loops: "on the best on the best on the best ...").
DEGENERATE_NGRAM = 3
DEGENERATE_SHARE = 0.5
SAMPLING_SEED = 0  # only matters with evaluate.do_sample: both models draw from the same seed


# ---------------------------------------------------------------- metrics (pure functions)

def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (0-1), with rouge-score's tokenisation (lower-cased alphanumeric words)."""
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score(ref, pred)["rougeL"].fmeasure
               for pred, ref in zip(predictions, references, strict=True)) / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100), sacrebleu defaults (13a tokenisation, one reference)."""
    return sacrebleu.corpus_bleu(predictions, [references]).score


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100), sacrebleu defaults: character n-gram F-score, robust on short texts."""
    return sacrebleu.corpus_chrf(predictions, [references]).score


def repeated_ngram_share(text: str, n: int = DEGENERATE_NGRAM) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one: 0 = none, near 1 = a loop."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def is_degenerate(text: str) -> bool:
    return not text.strip() or repeated_ngram_share(text) > DEGENERATE_SHARE


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the completion tokens, and how many there are.

    Teacher forcing: the logits at position t predict token t+1. Prompt and padding positions
    (completion_mask 0) don't count. Row by row, and only the counted positions cast to float32:
    memory stays small with 128k-token vocabularies.
    """
    total, count = 0.0, 0
    for row_logits, row_ids, row_mask in zip(logits, input_ids, completion_mask):
        mask = row_mask[1:].bool()
        total += F.cross_entropy(row_logits[:-1][mask].float(), row_ids[1:][mask], reduction="sum").item()
        count += int(mask.sum())
    return total, count


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean NLL per token: the model's average branching factor on the references."""
    return math.exp(nll_sum / n_tokens)


def score(answers: list[str], references: list[str], answer_lengths: list[int],
          nll_sum: float, n_tokens: int) -> dict:
    """All metrics of one model."""
    n = len(answers)
    return {
        "rougeL": rouge_l(answers, references),
        "bleu": bleu(answers, references),
        "chrf": chrf(answers, references),
        "nll": nll_sum / n_tokens,
        "perplexity": perplexity(nll_sum, n_tokens),
        "empty_rate": sum(not a.strip() for a in answers) / n,
        "degenerate_rate": sum(map(is_degenerate, answers)) / n,
        "mean_output_tokens": sum(answer_lengths) / n,
    }


def delta(base: dict, tuned: dict) -> dict:
    return {k: tuned[k] - base[k] for k in base}


# ---------------------------------------------------------------- model passes

def pad_batch(seqs: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), padded on the left or the right."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention[row, span] = 1
    return ids, attention


def generate(model, prompts: list[list[int]], *, pad_token_id: int, batch_size: int,
             desc: str = "generating", **generate_kwargs) -> list[list[int]]:
    """The new token ids for each prompt (in prompt order), generated batch by batch.

    LEFT padding makes every prompt of a batch end in the same column, so each step appends one
    column for the whole batch and reuses the KV cache (one forward pass over one new token per
    step, instead of a full re-run of the text per token and per prompt). Prompts are grouped by
    length to keep padding small. The ids run to max_new_tokens: cut them with until_eos().
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = order[start:start + batch_size]
        ids, attention = pad_batch([prompts[i] for i in batch], pad_token_id, side="left")
        with torch.inference_mode():
            generated = model.generate(input_ids=ids.to(model.device),
                                       attention_mask=attention.to(model.device),
                                       pad_token_id=pad_token_id, use_cache=True, **generate_kwargs)
        for row, i in enumerate(batch):
            out[i] = generated[row, ids.shape[1]:].tolist()
    return out


def until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """The answer's tokens: up to the first end-of-sequence (after it, generate() pads)."""
    for pos, token in enumerate(ids):
        if token in eos_ids:
            return ids[:pos]
    return ids


def reference_nll(model, examples, *, pad_token_id: int, batch_size: int,
                  desc: str = "scoring") -> tuple[float, int]:
    """Summed NLL of the reference completions (as formatted for training) and their token count.

    Right padding: under causal attention no real token sees the padding after it.
    """
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        rows = examples[start:start + batch_size]
        ids, attention = pad_batch(rows["input_ids"], pad_token_id, side="right")
        mask, _ = pad_batch(rows["completion_mask"], 0, side="right")
        ids, attention, mask = ids.to(model.device), attention.to(model.device), mask.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits
        nll, n = completion_nll(logits, ids, mask)
        total, count = total + nll, count + n
    return total, count


def generation_kwargs(ep: dict) -> dict:
    """model.generate arguments from params' evaluate section (also used by scripts/ask.py)."""
    kwargs = {"max_new_tokens": ep["max_new_tokens"], "do_sample": ep["do_sample"]}
    if ep["do_sample"]:
        kwargs.update(temperature=ep["temperature"], top_p=ep["top_p"])
    return kwargs


def select_examples(test, max_samples: int):
    """The first max_samples test examples in a fixed pseudo-random order (crc32 of uid), so the
    sample is the same whatever the row order of the split, and spread over the whole split."""
    uids = test["uid"]
    order = sorted(range(len(uids)), key=lambda i: (zlib.crc32(uids[i].encode("utf-8")), uids[i]))
    return test.select(order[:max_samples] if max_samples > 0 else order)


def prompt_ids(examples) -> list[list[int]]:
    """Each example's prompt tokens exactly as training saw them: input_ids before the completion."""
    return [ids[:mask.index(1)] for ids, mask in zip(examples["input_ids"], examples["completion_mask"])]


# ---------------------------------------------------------------- outputs

PLOTTED = [("perplexity", "perplexity (lower is better)"), ("rougeL", "ROUGE-L F1"),
           ("bleu", "BLEU"), ("chrf", "chrF"), ("degenerate_rate", "degenerate answers (share)"),
           ("mean_output_tokens", "answer length (tokens)")]


def plot_comparison(results: dict, n: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        bars = ax.bar(["base", "tuned"], [results["base"][key], results["tuned"][key]],
                      color=["#9e9e9e", "#1f77b4"])
        ax.bar_label(bars, fmt="%.3g")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"titletune: base vs fine-tuned model on {n} test examples")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def log_to_mlflow(adapter_dir: Path, report: dict, files: list[Path], ep: dict) -> str:
    """Log the metrics and files to the training run (models/adapter/training_run.json); if that
    run is not in this tracking store (trained elsewhere), to a new run tagged with its id."""
    mlflow = mlflow_setup()
    from mlflow.exceptions import MlflowException
    run_file = adapter_dir / "training_run.json"
    train_run_id = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
    try:
        run_args = {"run_id": mlflow.get_run(train_run_id).info.run_id} if train_run_id else None
    except MlflowException:
        run_args = None
    if run_args is None:
        run_args = {"run_name": "evaluate",
                    "tags": {"stage": "evaluate", **({"train_run_id": train_run_id} if train_run_id else {})}}
    with mlflow.start_run(**run_args) as run:
        mlflow.log_metrics({f"eval_{model}_{k}": float(v) for model in ("base", "tuned", "delta")
                            for k, v in report[model].items()})
        mlflow.log_metric("eval_samples", report["samples"])
        # Tags, not params: evaluate may be re-run with other settings on the same training run.
        mlflow.set_tags({f"evaluate.{k}": str(v) for k, v in ep.items()})
        for f in files:
            mlflow.log_artifact(str(f), "eval")
        return run.info.run_id


# ---------------------------------------------------------------- main

def main() -> None:
    data_dir, adapter_dir, metrics_dir = map(Path, sys.argv[1:4])
    params = load_params("model", "format", "evaluate")
    ep = params["evaluate"]
    if ep["batch_size"] < 1 or ep["max_new_tokens"] < 1:
        raise UserError("params.yaml: evaluate.batch_size and evaluate.max_new_tokens must be >= 1")
    examples = select_examples(load_formatted(data_dir)["test"], ep["max_samples"])
    if len(examples) == 0:
        raise UserError(f"{data_dir}: the test split is empty; raise preprocess.test_fraction")

    model, tokenizer = load_tuned_model(params["model"], params["format"]["max_length"], adapter_dir)
    from unsloth import FastLanguageModel
    FastLanguageModel.for_inference(model)  # Unsloth's fast generation on GPU; no training state
    model.eval()
    pad, bs = tokenizer.pad_token_id, ep["batch_size"]
    gen_eos = model.generation_config.eos_token_id  # an int, a list (e.g. Llama 3 instruct) or None
    eos_ids = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    prompts = prompt_ids(examples)
    references = examples["content"]

    results, answers = {}, {}
    for name in ("base", "tuned"):
        # The base model is the same weights with the adapter switched off.
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            nll_sum, n_tokens = reference_nll(model, examples, pad_token_id=pad, batch_size=bs,
                                              desc=f"{name}: scoring references")
            torch.manual_seed(SAMPLING_SEED)
            new_ids = generate(model, prompts, pad_token_id=pad, batch_size=bs,
                               desc=f"{name}: generating", **generation_kwargs(ep))
        answer_ids = [until_eos(ids, eos_ids) for ids in new_ids]
        answers[name] = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answer_ids]
        results[name] = score(answers[name], references, list(map(len, answer_ids)), nll_sum, n_tokens)

    report = {"samples": len(examples), **results, "delta": delta(results["base"], results["tuned"])}
    eval_json, samples_jsonl, plot_png = (metrics_dir / "eval.json", metrics_dir / "eval_samples.jsonl",
                                          metrics_dir / "eval_compare.png")
    write_json(eval_json, report)
    with atomic_path(samples_jsonl) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"uid": ex["uid"], "title": ex["title"], "question": ex["question"],
                                "reference": ex["content"], "base": answers["base"][i],
                                "tuned": answers["tuned"][i]}, ensure_ascii=False) + "\n")
    plot_comparison(results, len(examples), plot_png)
    log_to_mlflow(adapter_dir, report, [eval_json, samples_jsonl, plot_png], ep)

    b, t = results["base"], results["tuned"]
    print(f"evaluate: {len(examples)} test examples, base -> tuned: perplexity {b['perplexity']:.4g} -> "
          f"{t['perplexity']:.4g}, ROUGE-L {b['rougeL']:.3f} -> {t['rougeL']:.3f}, BLEU {b['bleu']:.2f} -> "
          f"{t['bleu']:.2f}, chrF {b['chrf']:.1f} -> {t['chrf']:.1f}, degenerate {b['degenerate_rate']:.0%} -> "
          f"{t['degenerate_rate']:.0%}; {eval_json}")
    if ep["require_improvement"] and not t["perplexity"] < b["perplexity"]:
        raise UserError(
            f"the fine-tuned model is not better than the base model: perplexity {t['perplexity']:.6g} "
            f"(tuned) is not below {b['perplexity']:.6g} (base) on {len(examples)} test examples. "
            f"Check the adapter or train longer ({eval_json} has all metrics); to accept it anyway, "
            "set evaluate.require_improvement: false in params.yaml")


if __name__ == "__main__":
    run_main(main)
