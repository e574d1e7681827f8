"""The evaluation metrics: pure functions of answers, references and model scores.

Add a metric here (and to `score`): it then appears in metrics/eval.json, MLflow and the plots.
"""
from __future__ import annotations

import math

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

# An answer is degenerate when it is empty or more than half of its word trigrams repeat an
# earlier one (the model loops: "on the best on the best on the best ...").
DEGENERATE_NGRAM = 3
DEGENERATE_SHARE = 0.5


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

