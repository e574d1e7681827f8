"""Model passes over many prompts: batched generation with the KV cache, and teacher-forced
scoring of the reference answers (evaluate, scripts/ask.py, benchmarks/generation_speed.py).
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from titletune.generation.metrics import completion_nll

SAMPLING_SEED = 0  # only matters with evaluate.do_sample: both models draw from the same seed


def pad_batch(seqs: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), padded on the left or the right."""
    rows = [torch.tensor(seq, dtype=torch.long) for seq in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id, padding_side=side)
    attention = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side=side)
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


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the tokenizer's EOS (training completions end on it) and
    the generation config's (an int, a list such as Llama 3 instruct's, or None)."""
    gen_eos = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}


def until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """The answer's tokens: up to the first end-of-sequence (after it, generate() pads)."""
    for pos, token in enumerate(ids):
        if token in eos_ids:
            return ids[:pos]
    return ids


def reference_nll(model, examples, *, pad_token_id: int, batch_size: int,
                  desc: str = "scoring", progress: bool = True) -> tuple[float, int]:
    """Summed NLL of the reference completions (as formatted for training) and their token count.

    Right padding: under causal attention no real token sees the padding after it.
    """
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = examples[start:start + batch_size]
        ids, attention = pad_batch(rows["input_ids"], pad_token_id, side="right")
        mask, _ = pad_batch(rows["completion_mask"], 0, side="right")
        ids, attention, mask = ids.to(model.device), attention.to(model.device), mask.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits
        nll, n = completion_nll(logits, ids, mask)
        total, count = total + nll, count + n
    return total, count


def generation_kwargs(ep) -> dict:
    """model.generate arguments from params' evaluate section (also used by scripts/ask.py)."""
    kwargs = {"max_new_tokens": ep.max_new_tokens, "do_sample": ep.do_sample}
    if ep.do_sample:
        kwargs.update(temperature=ep.temperature, top_p=ep.top_p)
    return kwargs


def prompt_ids(examples) -> list[list[int]]:
    """Each example's prompt tokens exactly as training saw them: input_ids before the completion."""
    return [ids[:mask.index(1)] for ids, mask in zip(examples["input_ids"], examples["completion_mask"])]

