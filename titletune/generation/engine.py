"""The generation engine: every model pass over many prompts (evaluate, scripts/ask.py,
scripts/predict.py, export's parity gate, benchmarks/generation_speed.py).

Generation runs on a fixed set of `slots`, one sequence each, over a static KV cache:

- A prompt is prefilled into a free slot (several at a time, left padded, by a token budget) and
  its first token is taken from the prefill's last position.
- Each decode step is one forward pass of one token for every slot: the new token's key and
  value are written at that slot's own column, and a boolean mask lets each slot attend to its
  own columns only. Slots are independent, so a slot whose answer ended (EOS or max_new_tokens)
  is refilled with the next prompt while the others go on: no finished row keeps costing.
- Every tensor of the step has a fixed shape, so on a GPU the step is captured as a CUDA graph
  and replayed: one launch per token instead of a few thousand kernel launches from Python.
- Once no prompt waits, the busy slots are moved to the front and the step runs on the smallest
  power-of-two share of the slots that holds them (its own graph): the last answers' tail costs
  what they need, not a full batch.
- Decode attention is grouped-query attention as two batched matmuls over the cache (no copy of
  the key/value heads per query head); the prefill and scoring passes use PyTorch's SDPA
  (without cuDNN's kernel, whose plan for each new width costs more than the pass).

The number of slots is `batch_size`, or on a GPU as many as fit in free memory ("auto"), and never
more than there are prompts. If the GPU runs out of memory, the engine halves its slots, says so
once, and finishes.
generate(keep=True) keeps the engine (its cache and its captured graphs) on the model for the
next call that fits it: a CUDA graph is then captured once per model and step size, not once per
call (predict answers a file in parts, ask one question at a time).
On a CPU the same code runs without graphs.
"""
from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from titletune.cli import UserError
from titletune.generation.metrics import completion_nll
from titletune.launch import local_rank

SAMPLING_SEED = 0  # only matters with evaluate.do_sample: both models draw from the same seed
ATTENTION = "titletune_decode"  # the attention implementation models are loaded with (registered below)
CPU_SLOTS = 64          # slots on a CPU when batch_size is auto
MAX_GPU_SLOTS = 512     # beyond this a decode step is compute-bound: more slots add latency, not speed
PREFILL_TOKENS = 16384  # prompt tokens per prefill pass (padding included)
MIN_STEP_SLOTS = 8      # the smallest decode step the busy slots shrink to (below it a step costs the same)
REFILL_SHARE = 8        # refill once 1/REFILL_SHARE of the slots are free: a pass's own cost (~7 ms, 8B) against
                        # slots idling (8B, H100, 4,096 prompts, EOS on: 1.03x faster than at 1/3, benchmarks/README)
LENGTH_STEP = 64        # cache columns come in steps of this, so that a kept engine fits later calls' prompts too


def pad_batch(seqs: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), padded on the left or the right."""
    rows = [torch.tensor(seq, dtype=torch.long) for seq in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id, padding_side=side)
    attention = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side=side)
    return ids, attention


# --- attention ---------------------------------------------------------------------------------

def sdpa_without_cudnn():
    """SDPA's kernels other than cuDNN's, for prefill and scoring passes. cuDNN's (PyTorch's first
    choice on Hopper for a masked bf16 pass) builds an execution plan for every new sequence length:
    1.4-1.7 s a new prompt width for the 8B on an H200, measured, where the pass itself takes 0.1 s,
    and passes come in many widths. The memory-efficient kernel that then runs has no such cost
    (benchmarks/README)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query token per slot against the whole static cache: grouped-query attention without
    repeating the key/value heads. Anything else (prefill, scoring) goes to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling or dim ** -0.5)
    scores = scores.masked_fill(~attention_mask.view(batch, 1, 1, length), float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (batch, kv_heads, group, dim)
    return out.reshape(batch, 1, heads, dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_engine_attention(model) -> None:
    """Switch a loaded model (e.g. export's merged model, reloaded with plain transformers) to the
    engine's attention: the decode step's boolean mask means nothing to eager attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != ATTENTION:
        _register_attention()
        base.set_attn_implementation(ATTENTION)


# --- loading -----------------------------------------------------------------------------------

def load_for_generation(model_params, adapter_dir: Path | str | None = None, merge: bool = True):
    """(model, tokenizer) for generation and scoring: the base model, plus the trained adapter when
    adapter_dir is given, through plain transformers + PEFT (Unsloth's inference patches keep a
    growing cache of their own, which a static-shape step cannot use). Safetensors only; remote
    code only when model.trust_remote_code says so; the dtype of training (modeling.compute_dtype).

    merge: the adapter is merged into this working copy of the weights (W + BA), so that the tuned
    model generates as fast as the base; merge=False keeps a PeftModel (export compares the merged
    model against it; `disable_adapter()` then gives the base). A 4-bit base is never merged."""
    from titletune.modeling import (check_model_folder, compute_dtype, ensure_pad_token, model_source,
                                    require_cuda_for_4bit)
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise UserError(f"{adapter_dir}: no trained adapter here; run `dvc repro` first (the train stage writes it)")
        check_model_folder(str(adapter_dir), model_params.trust_remote_code, what="adapter", weights="adapter_model")
    require_cuda_for_4bit(model_params)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    _register_attention()
    name, dtype = model_source(model_params), compute_dtype()
    extra = {}
    if model_params.load_in_4bit:  # as Unsloth loads it for QLoRA training
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, trust_remote_code=model_params.trust_remote_code, use_safetensors=True,
        attn_implementation=ATTENTION, device_map={"": local_rank()} if torch.cuda.is_available() else None, **extra)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(name, trust_remote_code=model_params.trust_remote_code))
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge and not model_params.load_in_4bit:
            model = model.merge_and_unload()
    return model.eval(), tokenizer


# --- the engine --------------------------------------------------------------------------------

class SlotCache:
    """A static KV cache of `slots` rows x `length` columns per layer. `update` (called by each
    attention layer during a decode step) writes the new key and value at each slot's own column."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor, rows: torch.Tensor):
        self.keys, self.values = keys, values
        self.column = column  # where each slot's next token goes
        self.rows = rows      # 0, 1, ..., slots - 1

    @classmethod
    def allocate(cls, config, slots: int, length: int, dtype, device) -> SlotCache:
        layers, heads, dim = cls.layout(config)
        return cls([torch.zeros(slots, heads, length, dim, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(slots, heads, length, dim, dtype=dtype, device=device) for _ in range(layers)],
                   torch.zeros(slots, dtype=torch.long, device=device), torch.arange(slots, device=device))

    def first(self, n: int) -> SlotCache:
        """The first n slots: views into the same memory. Nothing new is allocated: a CUDA graph
        captured over a view reads these addresses on every replay, after the view is gone."""
        return SlotCache([k[:n] for k in self.keys], [v[:n] for v in self.values], self.column[:n], self.rows[:n])

    def update(self, key, value, layer_idx, cache_kwargs=None):
        self.keys[layer_idx][self.rows, :, self.column] = key[:, :, 0]
        self.values[layer_idx][self.rows, :, self.column] = value[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.column]

    @staticmethod
    def layout(config) -> tuple[int, int, int]:
        """(layers, key-value heads, head dim) of the model's attention."""
        config = config.get_text_config()
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, config.num_key_value_heads, dim

    @classmethod
    def bytes_per_slot(cls, config, length: int, dtype) -> int:
        layers, heads, dim = cls.layout(config)
        return 2 * layers * heads * dim * length * dtype.itemsize


class PrefillCache:
    """The cache a prefill pass runs with: each attention layer writes the pass's keys and values
    (columns 0..width-1) straight into the slots' rows of the static cache and attends over the
    pass's own. Nothing is held per layer and nothing copied afterwards (a DynamicCache of a
    16k-token 8B pass holds 2 GB until the pass ends)."""

    def __init__(self, cache: SlotCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def update(self, key, value, layer_idx, cache_kwargs=None):
        width = key.shape[2]
        self.cache.keys[layer_idx][self.rows, :, :width] = key
        self.cache.values[layer_idx][self.rows, :, :width] = value
        return key, value


class Slots:
    """Each slot's sequence: its cache rows, first real column (left padding), last token, tokens
    generated so far, whether it is still answering, and the answer (last column: a sink that
    inactive slots write into)."""

    def __init__(self, cache: SlotCache, start, tokens, count, active, out):
        self.cache, self.start, self.tokens = cache, start, tokens
        self.count, self.active, self.out = count, active, out

    @classmethod
    def allocate(cls, model, slots: int, length: int, max_new_tokens: int) -> Slots:
        device = model.device
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(SlotCache.allocate(model.config, slots, length, model.dtype, device), zeros(slots), zeros(slots),
                   zeros(slots), zeros(slots, dtype=torch.bool), zeros(slots, max_new_tokens + 1))

    def first(self, n: int) -> Slots:
        """The first n slots: views, so that a step over them writes into the whole engine's state."""
        return Slots(self.cache.first(n), self.start[:n], self.tokens[:n], self.count[:n], self.active[:n],
                     self.out[:n])

    def tensors(self) -> list[torch.Tensor]:
        return [*self.cache.tensors(), self.start, self.tokens, self.count, self.active, self.out]

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the sequences of slots src into slots dst (src's slots then count as ended)."""
        src_rows, dst_rows = (torch.tensor(rows, device=self.start.device) for rows in (src, dst))
        for t in self.tensors():
            t[dst_rows] = t[src_rows]
        self.active[src_rows] = False


class Engine:
    """The slots, their cache and the decode step of a generate() call (and of later calls that
    fit it, with keep=True). The step runs on the first `size` slots: all of them while prompts
    wait; once none waits, the busy slots are moved to the front and the step shrinks to the
    smallest of `sizes` that holds them, so that an answer's tail costs what its busy slots need,
    not the whole batch. On a GPU each size's greedy step is captured as a CUDA graph the first
    time it runs (vLLM captures per batch size the same way)."""

    def __init__(self, model, slots: int, length: int, max_new_tokens: int, eos_ids: set[int], sample,
                 requested: int | None = None, cut: bool = False):
        self.model, self.slots, self.length, self.max_new, self.eos_ids = model, slots, length, max_new_tokens, eos_ids
        self.requested, self.cut = requested, cut  # the batch_size asked for; whether the prompt count cut it
        self.state = Slots.allocate(model, slots, length, max_new_tokens)
        self.columns = torch.arange(length, device=model.device)
        self.eos = torch.tensor(sorted(eos_ids) or [-1], device=model.device)
        self.sample = sample  # None: greedy, inside the step; else a function of the logits
        self.size = slots
        self.sizes = [n for n in (slots >> k for k in range(slots.bit_length())) if n >= MIN_STEP_SLOTS] or [slots]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = model.device.type == "cuda"  # until a capture fails

    def fits(self, requested: int | None, n_prompts: int, length: int, max_new_tokens: int, eos_ids: set[int]) -> bool:
        """Whether a call can run on this engine as a new one would: the same cache length,
        answer length, end-of-answer ids and batch_size, and at least as many slots."""
        return ((self.length, self.max_new, self.eos_ids, self.requested) == (length, max_new_tokens, eos_ids, requested)
                and (self.slots >= n_prompts or not self.cut))

    def begin(self, sample) -> None:
        """Start a call: every slot free (a call cut short may have left some busy), the full step."""
        self.sample, self.size = sample, self.slots
        self.state.active.zero_()

    # the step over the first n slots (views of the engine's state)
    def step(self, slots: Slots) -> torch.Tensor | None:
        """One token for every slot (inactive slots compute too, and write only into their own row).
        Greedy: recorded inside the step (so a CUDA graph holds it all); sampling: the logits returned."""
        cache = slots.cache
        mask = (self.columns >= slots.start[:, None]) & (self.columns <= cache.column[:, None])
        logits = self.model(input_ids=slots.tokens[:, None], attention_mask=mask[:, None, None, :],
                            position_ids=(cache.column - slots.start)[:, None], past_key_values=cache,
                            use_cache=True).logits[:, -1]
        if self.sample is not None:
            return logits
        self.record(slots, logits.argmax(-1))
        return None

    def record(self, slots: Slots, new: torch.Tensor) -> None:
        """Append the new tokens of the active slots; a slot that reached EOS or max_new_tokens ends."""
        new = torch.where(slots.active, new, slots.tokens)
        slots.out[slots.cache.rows, torch.where(slots.active, slots.count, self.max_new)] = new
        slots.tokens.copy_(new)
        slots.cache.column.add_(slots.active.long())
        slots.count.add_(slots.active.long())
        ended = self.is_eos(new) | (slots.count >= self.max_new)
        slots.active.logical_and_(~ended)

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """A comparison with every end-of-answer id (torch.isin may sort, and sync, on long lists)."""
        return (tokens[:, None] == self.eos[None, :]).any(-1)

    def capture(self, n: int) -> torch.cuda.CUDAGraph:
        """Record the step over the first n slots as a CUDA graph, after warm-up runs on a side stream
        (two before the first graph, one before each later one); all graphs share one memory pool."""
        slots = self.state.first(n)
        # what the step changes besides the cache (whose writes at each slot's next column are rewritten
        # by the real step before anything reads them)
        state = [slots.cache.column, slots.tokens, slots.count, slots.active, slots.out]
        saved = [t.clone() for t in state]
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(1 if self.graphs else 2):
                    self.step(slots)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.step(slots)
            return graph
        finally:
            for t, s in zip(state, saved):
                t.copy_(s)  # the warm-up and capture ran the step: undo its writes

    def graph(self, n: int) -> torch.cuda.CUDAGraph | None:
        """The captured step over n slots, captured now if it is new; None where it runs eagerly
        (a CPU, sampling, a model whose step cannot be captured)."""
        if self.sample is not None:
            return None
        if self.use_graphs and n not in self.graphs:
            try:
                self.graphs[n] = self.capture(n)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # a model whose forward cannot be captured still generates, eagerly
                self.use_graphs = False
                tqdm.write(f"generation: the decode step runs without a CUDA graph "
                           f"({str(err).splitlines()[0][:200]})", file=sys.stderr)
        return self.graphs.get(n)

    def decode(self) -> None:
        graph = self.graph(self.size)
        if graph is not None:
            graph.replay()
            return
        slots = self.state.first(self.size)
        logits = self.step(slots)
        if self.sample is not None:
            self.record(slots, self.sample(logits))

    def shrink(self, busy: list[int]) -> list[tuple[int, int]]:
        """Once no prompt waits: the step's size becomes the smallest that holds the busy slots, the
        busy slots beyond it moved into free slots before it. Returns the moves (from, to)."""
        size = min((n for n in self.sizes if n >= len(busy)), default=self.size)
        if size >= self.size:
            return []
        src = [s for s in busy if s >= size]
        dst = sorted(set(range(size)) - set(busy))[:len(src)]
        if src:
            self.state.move(src, dst)
        self.size = size
        return list(zip(src, dst))

    def prefill(self, prompts: list[list[int]], slots: list[int], pad_token_id: int) -> None:
        """Run the prompts (left padded) through the model and start them in these slots."""
        device = self.model.device
        ids, attention = pad_batch(prompts, pad_token_id, side="left")
        ids, real = ids.to(device), attention.to(device).bool()
        width = ids.shape[1]
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        # causal over the real tokens; a padding position sees itself only: a row with nothing to attend
        # to comes out NaN on some SDPA kernels, and a NaN value in the cache poisons decode's matmul
        # even where it is masked
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = causal & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=device))
        rows, state = torch.tensor(slots, device=device), self.state
        # The last position's logits only, kept by index: lm_head gets a contiguous input. With
        # logits_to_keep=1 it gets a slice, and once the weights are frozen (a merged adapter: PEFT sets
        # requires_grad False) torch.matmul runs it as a batched matmul that reads the whole lm_head
        # once per prompt (the tuned rows' slower prefill, benchmarks/README).
        last = torch.tensor([width - 1], device=device)
        with sdpa_without_cudnn():
            logits = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions,
                                past_key_values=PrefillCache(state.cache, rows), use_cache=True,
                                logits_to_keep=last).logits[:, -1]
        first = logits.argmax(-1) if self.sample is None else self.sample(logits)
        state.start[rows] = width - real.sum(-1)
        state.cache.column[rows] = width  # the first new token's key and value go here
        state.tokens[rows] = first
        state.out[rows, 0] = first
        state.count[rows] = 1
        state.active[rows] = ~(self.is_eos(first) | (self.max_new <= 1))


def sampler(do_sample: bool, temperature: float, top_p: float):
    """None for greedy decoding; else a function from logits to sampled token ids (transformers'
    own temperature and top-p warpers, as generate() applies them)."""
    if not do_sample:
        return None
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
              ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def sample(logits):
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0]
    return sample


def auto_slots(model, requested: int | None, length: int) -> int:
    """Slots: as requested; or on a GPU as many as 60 % of its free memory holds (the rest: the
    step's activations and prefill passes), up to MAX_GPU_SLOTS; CPU_SLOTS on a CPU."""
    if requested:
        return requested
    if model.device.type != "cuda":
        return CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(model.device)
    per_slot = SlotCache.bytes_per_slot(model.config, length, model.dtype) + 4 * model.config.get_text_config().vocab_size
    return max(1, min(MAX_GPU_SLOTS, int(0.6 * free) // per_slot))


def generate(model, prompts: list[list[int]], *, pad_token_id: int, max_new_tokens: int,
             eos_ids: set[int] | None = None, batch_size: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, desc: str = "generating",
             progress: bool = True, on_answer=None, on_token=None, keep: bool = False) -> list[list[int]]:
    """The new token ids for each prompt, in prompt order: up to and including its first EOS
    (eos_ids; None: the model's generation_config), at most max_new_tokens (cut with until_eos()).
    on_answer(index, ids), if given, is called as each answer ends (predict streams with it);
    on_token(index, id) as each token comes (scripts/ask.py prints the answer as it grows).
    keep: the engine stays on the model (its GPU memory held) for the next keep=True call that
    fits it; any other call releases it first."""
    if not prompts:
        return []
    if eos_ids is None:
        eos_ids = eos_token_ids(model, None)
    use_engine_attention(model)
    length = -(-(max(map(len, prompts)) + max_new_tokens) // LENGTH_STEP) * LENGTH_STEP
    engine = model.__dict__.get(KEPT_ENGINE)
    if engine is not None and not (keep and engine.fits(batch_size, len(prompts), length, max_new_tokens, eos_ids)):
        release_engine(model)  # before sizing a new one: its memory counts as free
        engine = None
    results: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    with torch.inference_mode():
        if engine is None:
            wanted = auto_slots(model, batch_size, length)
            # never more slots than prompts: a question to scripts/ask.py needs one slot's cache, not 512
            engine = Engine(model, min(wanted, len(prompts)), length, max_new_tokens, eos_ids, None,
                            requested=batch_size, cut=wanted > len(prompts))
        first_slots = engine.slots
        while True:
            try:
                _run(engine, prompts, results, sampler(do_sample, temperature, top_p), pad_token_id, bar,
                     on_answer, on_token)
                break
            except torch.OutOfMemoryError:
                if engine.slots == 1:
                    raise
                # answers already finished are kept; the others start again on half the slots
                slots, cut = engine.slots // 2, engine.cut
                del engine
                release_engine(model)
                torch.cuda.empty_cache()  # the failed engine's memory, kept or not
                engine = Engine(model, slots, length, max_new_tokens, eos_ids, None, requested=batch_size, cut=cut)
    if engine.slots < first_slots:
        tqdm.write(f"{desc}: GPU out of memory with {first_slots} slots; finished with {engine.slots} "
                   f"(evaluate.batch_size: {engine.slots} skips the retries)", file=sys.stderr)
    if keep:
        model.__dict__[KEPT_ENGINE] = engine
    bar.close()
    return results


KEPT_ENGINE = "_titletune_engine"  # where generate(keep=True) leaves the engine, in the model's __dict__


def release_engine(model) -> None:
    """Free the engine a generate(keep=True) call left on the model (its cache and graphs)."""
    if model.__dict__.pop(KEPT_ENGINE, None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(engine, prompts, results, sample, pad_token_id, bar, on_answer, on_token):
    """Fill slots with the prompts not answered yet, longest first, until every prompt has its answer."""
    pending = deque(sorted((i for i, r in enumerate(results) if r is None), key=lambda i: -len(prompts[i])))
    engine.begin(sample)
    slots = engine.slots
    owner = [-1] * slots  # the prompt each slot is answering
    shown = [0] * slots   # tokens of its answer passed to on_token
    refill_at = max(1, slots // REFILL_SHARE)  # refill when this many slots are free (or none is busy)
    while pending or any(o >= 0 for o in owner):
        free = [s for s in range(slots) if owner[s] < 0]
        if pending and (len(free) >= refill_at or len(free) == slots):
            while free and pending:
                width = len(prompts[pending[0]])  # the longest waiting prompt sets the padded width
                take = [pending.popleft() for _ in range(min(len(free), len(pending), max(1, PREFILL_TOKENS // width)))]
                into, free = free[:len(take)], free[len(take):]
                engine.prefill([prompts[i] for i in take], into, pad_token_id)
                for s, i in zip(into, take):
                    owner[s], shown[s] = i, 0
        else:
            if not pending:
                for src, dst in engine.shrink([s for s in range(slots) if owner[s] >= 0]):
                    owner[dst], shown[dst], owner[src] = owner[src], shown[src], -1
            engine.decode()
        state = engine.state
        active = state.active.tolist()  # the one sync a step
        if on_token is not None:
            counts, tokens = state.count.tolist(), state.tokens.tolist()
            for s in range(slots):
                if owner[s] >= 0 and counts[s] > shown[s]:
                    shown[s] = counts[s]
                    on_token(owner[s], tokens[s])
        ended = [s for s in range(slots) if owner[s] >= 0 and not active[s]]
        if ended:
            counts, out = state.count.tolist(), state.out
            for s in ended:
                i, owner[s] = owner[s], -1
                results[i] = out[s, :counts[s]].tolist()
                if on_answer is not None:
                    on_answer(i, results[i])
            bar.update(len(ended))


# --- helpers shared by the stages --------------------------------------------------------------

def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the tokenizer's EOS (training completions end on it) and
    the generation config's (an int, a list such as Llama 3 instruct's, or None)."""
    gen_eos = model.generation_config.eos_token_id
    tokenizer_eos = tokenizer.eos_token_id if tokenizer is not None else None
    return {tokenizer_eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}


def until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """The answer's tokens: up to the first end-of-sequence."""
    for pos, token in enumerate(ids):
        if token in eos_ids:
            return ids[:pos]
    return ids


def reference_nll(model, examples, *, pad_token_id: int, batch_size: int | None = None,
                  desc: str = "scoring", progress: bool = True) -> tuple[float, int]:
    """Summed NLL of the reference completions (as formatted for training) and their token count.

    Right padding: under causal attention no real token sees the padding after it.
    batch_size None (evaluate.batch_size auto): CPU_SLOTS examples a pass.
    """
    total, count, batch_size = 0.0, 0, batch_size or CPU_SLOTS
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = examples[start:start + batch_size]
        ids, attention = pad_batch(rows["input_ids"], pad_token_id, side="right")
        mask, _ = pad_batch(rows["completion_mask"], 0, side="right")
        ids, attention, mask = ids.to(model.device), attention.to(model.device), mask.to(model.device)
        with torch.inference_mode(), sdpa_without_cudnn():
            logits = model(input_ids=ids, attention_mask=attention).logits
        nll, n = completion_nll(logits, ids, mask)
        total, count = total + nll, count + n
    return total, count


def generation_kwargs(ep) -> dict:
    """generate() arguments from params' evaluate section (evaluate, ask, predict)."""
    kwargs = {"max_new_tokens": ep.max_new_tokens, "do_sample": ep.do_sample, "batch_size": ep.slots()}
    if ep.do_sample:
        kwargs.update(temperature=ep.temperature, top_p=ep.top_p)
    return kwargs


def prompt_ids(examples) -> list[list[int]]:
    """Each example's prompt tokens exactly as training saw them: input_ids before the completion."""
    return [ids[:mask.index(1)] for ids, mask in zip(examples["input_ids"], examples["completion_mask"])]
