"""titletune/generation/metrics.py on tiny cases computed by hand (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from titletune.generation.metrics import (bleu, chrf, completion_nll, delta, is_degenerate, perplexity, repeated_ngram_share,
                                          rouge_l, score)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: P = 3/3, R = 3/6, F1 = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # Mean over examples; no common word scores 0; an empty answer scores 0.
    assert rouge_l(["the cat sat", "red fox", ""], ["the cat sat on the mat", "blue whale", "x"]) == \
        pytest.approx(2 / 9)
    assert rouge_l([], []) == 0.0


def test_bleu_and_chrf_bounds():
    refs = ["a classic family movie about a boy and his dog", "sturdy steel kitchen knife"]
    assert bleu(refs, refs) == pytest.approx(100)
    assert chrf(refs, refs) == pytest.approx(100)
    assert bleu(["zzz qqq", "yyy"], refs) == 0
    assert chrf(["", ""], refs) == 0
    assert 0 < bleu(["a classic family movie about a cat", "steel kitchen knife"], refs) < 100


def test_repeated_ngrams_and_degenerate():
    # trigrams of "a b c a b c": abc bca cab abc -> 4, of which 3 distinct -> 1/4 repeat
    assert repeated_ngram_share("a b c a b c") == pytest.approx(0.25)
    # 7 trigrams, 3 distinct -> 4/7 > 0.5: a loop
    loop = "on the best on the best on the best"
    assert repeated_ngram_share(loop) == pytest.approx(4 / 7)
    assert repeated_ngram_share("too short") == 0.0
    assert is_degenerate(loop)
    assert is_degenerate("")
    assert is_degenerate(" \n\n ")
    assert not is_degenerate("A sturdy steel knife for the kitchen.")


def test_completion_nll_by_hand():
    # Vocabulary of 4, uniform scores: every predicted token costs ln 4 nats.
    # Row 0: tokens [1 2 3 3], completion = last two tokens -> 2 scored tokens.
    # Row 1: tokens [1 2 pad pad], completion = token 2 only (padding masked out) -> 1 scored token.
    ids = torch.tensor([[1, 2, 3, 3], [1, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    nll, n = completion_nll(torch.zeros(2, 4, 4), ids, mask)
    assert n == 3
    assert nll == pytest.approx(3 * math.log(4))
    assert perplexity(nll, n) == pytest.approx(4.0)

    # A peaked prediction: scores (0, 0, 0, ln 3) give the token 3 probability 3/6 = 1/2.
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 3] = math.log(3)
    nll, n = completion_nll(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 0, 1]]))
    assert (nll, n) == (pytest.approx(math.log(2)), 1)


def test_delta():
    assert delta({"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 2.0}) == {"a": 2.0, "b": -3.0}


def test_score_of_one_model():
    answers, refs = ["the cat sat", ""], ["the cat sat", "a dog"]
    s = score(answers, refs, [3, 0], nll_sum=2 * math.log(4), n_tokens=2)
    assert s["rougeL"] == pytest.approx(0.5) and s["perplexity"] == pytest.approx(4.0)
    assert s["nll"] == pytest.approx(math.log(4))
    assert s["empty_rate"] == 0.5 and s["degenerate_rate"] == 0.5 and s["mean_output_tokens"] == 1.5
    assert set(s) == {"rougeL", "bleu", "chrf", "nll", "perplexity", "empty_rate", "degenerate_rate",
                      "mean_output_tokens"}
