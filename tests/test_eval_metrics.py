"""The evaluate stage's metric and batching helpers on tiny cases computed by hand (no model)."""
from __future__ import annotations

import math
import random

import pytest
import torch
from datasets import Dataset

from evaluate import (bleu, chrf, completion_nll, delta, generate, is_degenerate, pad_batch, perplexity,
                      prompt_ids, repeated_ngram_share, rouge_l, select_examples, until_eos)


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


def test_delta_and_until_eos():
    assert delta({"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 2.0}) == {"a": 2.0, "b": -3.0}
    assert until_eos([5, 6, 2, 0, 0], {2}) == [5, 6]
    assert until_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert until_eos([9, 5], {9, 2}) == []


def test_pad_batch_sides():
    ids, att = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and att.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, att = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and att.tolist() == [[1, 1, 1], [1, 0, 0]]


class EchoModel:
    """Stands in for a causal LM: 'generates' the last prompt token twice; records the calls."""
    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.tolist(), attention_mask.tolist(), kwargs))
        last = input_ids[:, -1:]
        return torch.cat([input_ids, last, last], dim=1)


def test_generate_batches_left_padded_with_cache_and_keeps_order():
    model = EchoModel()
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    out = generate(model, prompts, pad_token_id=0, batch_size=2, max_new_tokens=2)
    assert out == [[3, 3], [4, 4], [6, 6], [10, 10]]  # prompt order, whatever the batching
    # Shortest prompts batched together, LEFT padded, cache on, params passed through.
    (ids0, att0, kw0), (ids1, _, _) = model.calls
    assert ids0 == [[0, 4], [5, 6]] and att0 == [[0, 1], [1, 1]]
    assert ids1 == [[0, 1, 2, 3], [7, 8, 9, 10]]
    assert kw0["use_cache"] is True and kw0["max_new_tokens"] == 2 and kw0["pad_token_id"] == 0


def test_sample_selection_is_deterministic_and_order_free():
    rows = [{"uid": f"U{i:03d}", "input_ids": [1, 10 + i, 2], "completion_mask": [0, 0, 1]} for i in range(50)]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    a = select_examples(Dataset.from_list(rows), 10)["uid"]
    b = select_examples(Dataset.from_list(shuffled), 10)["uid"]
    assert a == b and len(set(a)) == 10
    assert a != [r["uid"] for r in rows[:10]]  # spread over the split, not its first rows
    assert len(select_examples(Dataset.from_list(rows), 0)) == 50  # 0 = all
    assert prompt_ids(Dataset.from_list(rows[:2])) == [[1, 10], [1, 11]]
