"""titletune/generation/engine.py: padding, batched generation order and caching, prompt ids
(a stand-in model, no weights)."""
from __future__ import annotations

import torch
from datasets import Dataset

from titletune.generation.engine import generate, generation_kwargs, pad_batch, prompt_ids, until_eos
from titletune.params import load_params


def test_until_eos():
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


def test_generation_kwargs_pass_sampling_settings_only_when_sampling():
    ep = load_params("evaluate").model_copy(update=dict(max_new_tokens=16, do_sample=False, temperature=0.7,
                                                        top_p=0.9))
    assert generation_kwargs(ep) == {"max_new_tokens": 16, "do_sample": False}
    sampled = ep.model_copy(update={"do_sample": True})
    assert generation_kwargs(sampled) == {"max_new_tokens": 16, "do_sample": True, "temperature": 0.7,
                                          "top_p": 0.9}


def test_prompt_ids_are_the_tokens_before_the_completion():
    rows = [{"uid": f"U{i:03d}", "input_ids": [1, 10 + i, 2], "completion_mask": [0, 0, 1]} for i in range(2)]
    assert prompt_ids(Dataset.from_list(rows)) == [[1, 10], [1, 11]]
