"""titletune/generation/engine.py: the slot engine answers exactly as transformers' generate()
does (greedy, float32, the tiny model), in prompt order, with slots refilled as answers end; it
survives running out of GPU memory by halving its slots; a kept engine answers later calls as a
new one would; padding and prompt ids."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from titletune.generation.engine import (KEPT_ENGINE, eos_token_ids, generate, generation_kwargs, load_for_generation,
                                         pad_batch, prompt_ids, reference_nll, release_engine, until_eos)
from titletune.params import load_params
from titletune.testing import ROOT


def test_until_eos():
    assert until_eos([5, 6, 2, 0, 0], {2}) == [5, 6]
    assert until_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert until_eos([9, 5], {9, 2}) == []


def test_pad_batch_sides():
    ids, att = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and att.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, att = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and att.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_missing_adapter_says_run_dvc_repro_before_the_model_loads(tmp_path):
    from titletune.cli import UserError
    model_params = load_params("model").model_copy(update={"name": str(tmp_path / "no-model-either")})
    with pytest.raises(UserError, match=r"adapter: no trained adapter here; run `dvc repro` first"):
        load_for_generation(model_params, tmp_path / "adapter")


def reference_answers(model, prompts, pad_token_id, eos_ids, max_new_tokens):
    """transformers' own generate(), one prompt at a time (no padding, its own cache): the answer
    every faster path must reproduce."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad_token_id, eos_token_id=sorted(eos_ids))
        out.append(until_eos(y[0, len(ids):].tolist(), eos_ids))
    return out


def tiny_prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 2048, (int(length),), generator=gen).tolist()
            for length in torch.randint(3, 40, (n,), generator=gen)]


@pytest.fixture(scope="module")
def tiny():
    model_params = load_params("model").model_copy(update={"name": str(ROOT / "models/tiny-llama")})
    return load_for_generation(model_params)


def test_engine_answers_like_transformers_generate_with_slots_refilled(tiny):
    model, tok = tiny
    prompts = tiny_prompts(12)
    # Frequent ends: answers of many lengths, so that slots free up and are refilled mid-way.
    eos_ids = set(range(0, 2048, 16)) | eos_token_ids(model, tok)
    expected = reference_answers(model, prompts, tok.pad_token_id, eos_ids, max_new_tokens=12)
    assert len({len(a) for a in expected}) > 3  # the case really has answers of different lengths
    got = generate(model, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=12, eos_ids=eos_ids,
                   batch_size=3, progress=False)
    assert [until_eos(a, eos_ids) for a in got] == expected


class WatchesPasses(torch.nn.Module):
    """The tiny model, noting how many slots each decode step (one token a slot) ran on, and whether
    cuDNN's attention was allowed in each pass of several tokens (prefill, scoring)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.decode_rows, self.cudnn_allowed = model, [], []
        self.config, self.generation_config = model.config, model.generation_config

    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] == 1:
            self.decode_rows.append(input_ids.shape[0])
        else:
            self.cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return self.inner(input_ids=input_ids, **kwargs)


def test_once_no_prompt_waits_the_step_shrinks_to_the_busy_slots_moved_to_the_front(tiny):
    model, tok = tiny
    prompts = tiny_prompts(40, seed=3)
    eos_ids = set(range(0, 2048, 8)) | eos_token_ids(model, tok)
    expected = reference_answers(model, prompts, tok.pad_token_id, eos_ids, max_new_tokens=16)
    counting = WatchesPasses(model)
    got = generate(counting, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=16, eos_ids=eos_ids,
                   batch_size=32, progress=False)
    assert [until_eos(a, eos_ids) for a in got] == expected  # moved slots go on with their own sequences
    sizes = counting.decode_rows
    assert sizes[0] == 32 and {16, 8} <= set(sizes) and sizes == sorted(sizes, reverse=True)


def test_a_few_prompts_get_as_many_slots_not_a_full_batch(tiny):
    model, tok = tiny
    counting = WatchesPasses(model)
    generate(counting, tiny_prompts(3, seed=2), pad_token_id=tok.pad_token_id, max_new_tokens=4, eos_ids=set(),
             progress=False)  # batch_size auto: 64 slots on a CPU
    assert set(counting.decode_rows) == {3}


def test_prefill_and_scoring_passes_never_use_cudnn_attention(tiny):
    # cuDNN's SDPA plans every new prompt width anew: 1.4-1.7 s each for the 8B on an H200
    model, tok = tiny
    watching = WatchesPasses(model)
    prompts = tiny_prompts(6, seed=4)
    generate(watching, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=3, eos_ids=set(), batch_size=2,
             progress=False)
    examples = Dataset.from_dict({"input_ids": prompts, "completion_mask": [[0] + [1] * (len(p) - 1) for p in prompts]})
    reference_nll(watching, examples, pad_token_id=tok.pad_token_id, batch_size=3, progress=False)
    assert len(watching.cudnn_allowed) >= 3 + 2 and not any(watching.cudnn_allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process's own setting is left as it was


class RunsOutOfMemory(torch.nn.Module):
    """The tiny model on a 'GPU' that holds at most `limit` sequences a pass: larger passes raise
    the error torch raises when CUDA memory runs out."""

    def __init__(self, model, limit: int):
        super().__init__()
        self.inner, self.limit, self.largest = model, limit, 0
        self.config, self.generation_config = model.config, model.generation_config

    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.largest = max(self.largest, input_ids.shape[0])
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_frozen_model_takes_its_last_positions_logits_in_one_matrix_product(tiny):
    """A merged adapter's weights are frozen (PEFT sets requires_grad False). torch.matmul then does
    not fold a sliced [prompts, 1, hidden] input into one matrix product but runs a batched one over
    lm_head expanded to every prompt: it reads the whole lm_head once per prompt (on the H100 the
    tuned rows' prefill passes took 27 % (8B) and 55 % (1B) longer than the base's)."""
    model, tok = tiny
    vocab = model.config.vocab_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        with torch.profiler.profile(record_shapes=True) as prof:
            generate(model, tiny_prompts(8), pad_token_id=tok.pad_token_id, max_new_tokens=1, eos_ids=set(),
                     batch_size=8, progress=False)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    products = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                and any(vocab in shape for shape in e.input_shapes if shape)]
    assert products == [("aten::mm", [[8, model.config.hidden_size], [model.config.hidden_size, vocab]])], products


def test_out_of_memory_halves_the_slots_says_so_once_and_finishes(tiny, capsys):
    model, tok = tiny
    prompts = tiny_prompts(10, seed=1)
    expected = generate(model, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=8, eos_ids=set(),
                        batch_size=8, progress=False)
    small = RunsOutOfMemory(model, limit=2)
    got = generate(small, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=8, eos_ids=set(),
                   batch_size=8, progress=False)
    assert got == expected and small.largest == 2
    err = capsys.readouterr().err
    assert err.count("GPU out of memory") == 1 and "with 8 slots; finished with 2" in err  # 8 -> 4 -> 2


def test_a_kept_engine_serves_the_next_call_that_fits_and_answers_as_a_new_one(tiny):
    # predict's parts and ask's questions: the engine, with its cache and (on a GPU) its CUDA
    # graphs, is made once; a call cut short leaves busy slots, which the next call must not see
    model, tok = tiny
    eos_ids = set(range(0, 2048, 16)) | eos_token_ids(model, tok)
    kwargs = dict(pad_token_id=tok.pad_token_id, max_new_tokens=12, eos_ids=eos_ids, batch_size=4, progress=False)
    first, second = tiny_prompts(10, seed=5), tiny_prompts(7, seed=6)
    expected = [generate(model, prompts, **kwargs) for prompts in (first, second)]
    assert KEPT_ENGINE not in model.__dict__
    try:
        assert generate(model, first, keep=True, **kwargs) == expected[0]
        engine = model.__dict__[KEPT_ENGINE]

        def stop(index, ids):
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            generate(model, second, keep=True, on_answer=stop, **kwargs)
        assert generate(model, second, keep=True, **kwargs) == expected[1]
        assert model.__dict__[KEPT_ENGINE] is engine  # the same engine ran all three calls

        generate(model, second, keep=True, **kwargs | {"max_new_tokens": 5})  # does not fit: a new engine
        assert model.__dict__[KEPT_ENGINE] is not engine
        generate(model, second, **kwargs)  # keep=False frees a kept engine
        assert KEPT_ENGINE not in model.__dict__
    finally:
        release_engine(model)


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    model, tok = tiny
    prompts = tiny_prompts(6, seed=2)
    kwargs = dict(pad_token_id=tok.pad_token_id, max_new_tokens=10, eos_ids=set(), batch_size=4, progress=False)
    greedy = generate(model, prompts, **kwargs)
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled.append(generate(model, prompts, do_sample=True, temperature=1.5, top_p=0.95, **kwargs))
    assert sampled[0] == sampled[1] and sampled[0] != greedy


def test_generation_kwargs_pass_sampling_settings_only_when_sampling():
    ep = load_params("evaluate").model_copy(update=dict(max_new_tokens=16, do_sample=False, temperature=0.7,
                                                        top_p=0.9, batch_size="auto"))
    assert generation_kwargs(ep) == {"max_new_tokens": 16, "do_sample": False, "batch_size": None}
    sampled = ep.model_copy(update={"do_sample": True, "batch_size": 8})
    assert generation_kwargs(sampled) == {"max_new_tokens": 16, "do_sample": True, "temperature": 0.7,
                                          "top_p": 0.9, "batch_size": 8}


def test_prompt_ids_are_the_tokens_before_the_completion():
    rows = [{"uid": f"U{i:03d}", "input_ids": [1, 10 + i, 2], "completion_mask": [0, 0, 1]} for i in range(2)]
    assert prompt_ids(Dataset.from_list(rows)) == [[1, 10], [1, 11]]


@pytest.mark.slow
def test_engine_equals_the_evaluate_path_before_it_on_every_test_prompt(pipeline_repo):
    """Issue #20's parity: on the sample's whole test split, base and tuned, the engine's greedy
    answers are those of the path evaluate used before it (transformers' generate on batches of
    64 left-padded prompts, sorted by length)."""
    from titletune.modeling import load_formatted
    model_params = load_params("model").model_copy(update={"name": str(pipeline_repo / "models/tiny-llama")})
    model, tok = load_for_generation(model_params, pipeline_repo / "models/adapter", merge=False)
    prompts = prompt_ids(load_formatted(pipeline_repo / "data/formatted")["test"])
    eos_ids = eos_token_ids(model, tok)
    for adapter_on in (False, True):
        with (model.disable_adapter() if not adapter_on else torch.inference_mode()):
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            before = [None] * len(prompts)
            for start in range(0, len(order), 64):
                batch = order[start:start + 64]
                ids, att = pad_batch([prompts[i] for i in batch], tok.pad_token_id, side="left")
                with torch.inference_mode():
                    y = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=64, do_sample=False,
                                       pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids))
                for row, i in enumerate(batch):
                    before[i] = until_eos(y[row, ids.shape[1]:].tolist(), eos_ids)
            engine = generate(model, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=64, eos_ids=eos_ids,
                              progress=False)
            assert [until_eos(a, eos_ids) for a in engine] == before, f"adapter on: {adapter_on}"
