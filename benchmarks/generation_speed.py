"""Generation speed: today's evaluate path ("before") against the generation engine, in one run.

    python benchmarks/generation_speed.py                          # CPU: models/tiny-llama (+ models/adapter)
    python benchmarks/generation_speed.py --shape 1b --shape 8b    # GPU: random-init Llama shapes, bf16

Paths, each in a process of its own (loading through Unsloth patches transformers' Llama classes
for the whole process, so the two paths never share one):
  before   the evaluate stage before the engine: Unsloth's from_pretrained + for_inference, then
           model.generate() on batches of --batch-size prompts, left padded, sorted by length
  engine   titletune.generation.engine: static KV cache, one slot per sequence, refilled as
           answers end; on a GPU the decode step is a CUDA graph, captured once per model and
           step size (generate(keep=True): the timed run reuses the warm-up's engine, every step
           size's graph captured before the clock starts: a long run's steady state)

Every measurement is one JSON line appended to --out (fields: device, shape, path, adapter, eos,
prompts, new_tokens, output_tokens_per_s, peak_gb, command, ...; the engine's rows add `breakdown`:
the timed run's GPU time in prefill passes (and their share of padding) and in decode steps by
step size, graph captures, and the rest, the GPU idle). Greedy. With eos off, every prompt gets
exactly --new-tokens tokens. With eos on, answers end at an end-of-answer token: the tiny
model's own EOS; for random-init shapes, whose argmax almost never hits one EOS id, 1/64 of the
vocabulary is declared end-of-answer so that answers end at different lengths (mean ~40 of 64
tokens), and the figure counts only the tokens up to the end (useful tokens/s).

Prompts: the tiny model answers the evaluate stage's test prompts (data/formatted). Random-init
shapes get random token ids with the real test-prompt length distribution: the training prompt
(titletune.prompt) around the rotated questions for the titles of the embedded sample, at ~4
characters per Llama-3 token (Llama-3's average on English text).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24 B parameters (tied embeddings)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    # meta-llama/Llama-3.1-8B: 8.03 B parameters
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    # a CPU rehearsal of the GPU command (same code path, seconds instead of minutes)
    "mini": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=128256, tie_word_embeddings=True, head_dim=32),
}
LLAMA3 = dict(bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, max_position_embeddings=131072,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})
CHARS_PER_TOKEN = 4


def sample_prompt_lengths(n: int) -> list[int]:
    """Token lengths of n training prompts for the sample's titles (cycled), in Llama-3 tokens."""
    from titletune.params import load_params
    from titletune.prompt import INSTRUCTION_TEMPLATE, pick_question
    fmt = load_params("format")
    lengths = []
    with gzip.open(ROOT / "data/sample/trn.json.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            question = pick_question(fmt.questions, rec["uid"]).format(title=rec["title"])
            lengths.append(1 + math.ceil(len(INSTRUCTION_TEMPLATE.format(question=question)) / CHARS_PER_TOKEN))
    return [lengths[i % len(lengths)] for i in range(n)]


def build_shape(shape: str, folder: Path) -> None:
    """A random-init model of a real shape (bf16, safetensors) and a LoRA adapter for it (r 16,
    every linear layer, as train makes; B random instead of zero so that it changes the answers),
    and the same adapter with B = 0 (`adapter_b0`: it merges to the base's very weights).
    The tokenizer is the tiny model's: prompts are token ids already, the loaders want one for its
    pad id, and no Llama-3 tokenizer reaches the GPU machine."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from titletune.testing import zero_adapter
    if (folder / "adapter_b0" / "adapter_config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], **LLAMA3)).to(torch.bfloat16)
    model.save_pretrained(folder / "base")
    AutoTokenizer.from_pretrained(ROOT / "models/tiny-llama").save_pretrained(folder / "base")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(folder / "adapter")
    zero_adapter(folder / "adapter", folder / "adapter_b0")


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [[128000] + torch.randint(0, 128000, (length - 1,), generator=gen).tolist()
            for length in sample_prompt_lengths(n)]


def before_generate(model, prompts, *, pad_token_id, batch_size, eos_ids, max_new_tokens):
    """The evaluate stage's generation before the engine (titletune/generation.py, Dec 2026)."""
    import torch
    from titletune.generation.engine import pad_batch
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [[] for _ in prompts]
    hold = {} if eos_ids else {"min_new_tokens": max_new_tokens}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, attention = pad_batch([prompts[i] for i in batch], pad_token_id, side="left")
        with torch.inference_mode():
            generated = model.generate(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                                       pad_token_id=pad_token_id, use_cache=True, do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids) or None, **hold)
        for row, i in enumerate(batch):
            out[i] = generated[row, ids.shape[1]:].tolist()
    return out


def load(path: str, model_dir: Path, adapter: Path | None):
    """The model as each path loads it."""
    from titletune.params import load_params
    model_params = load_params("model")
    model_params = model_params.model_copy(update={"name": str(model_dir)})
    if path == "before":  # Unsloth's loader, the saved adapter on top (PEFT), Unsloth's inference mode
        from titletune.modeling import load_model, unsloth
        model, tokenizer = load_model(model_params, 4096)
        if adapter:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(adapter))
        unsloth().for_inference(model)
        return model.eval(), tokenizer
    from titletune.generation.engine import load_for_generation
    return load_for_generation(model_params, adapter)


def probe_engine(shape: str, work: Path, slots: int, n_prompts: int):
    """(engine, tokenizer, prompts) for the probes of single passes and steps (decode_step.py,
    prefill_passes.py, prefill_first_width.py): the shape's base model as the engine path loads it,
    n_prompts random prompts longest first, and an Engine of `slots` slots with room for the longest
    and 64 new tokens, greedy, EOS held off."""
    from titletune.generation.engine import Engine
    build_shape(shape, work / shape)
    model, tokenizer = load("engine", work / shape / "base", None)
    prompts = sorted(random_prompts(n_prompts), key=len, reverse=True)
    engine = Engine(model, slots, len(prompts[0]) + 64, max_new_tokens=64, eos_ids=set(), sample=None)
    return engine, tokenizer, prompts


def time_engine() -> list:
    """Time the engine's prefill passes, decode steps and graph captures as they run: CUDA events
    around each call on a GPU (no extra sync: the run's own pace is kept), the wall clock on a CPU.
    Returns the list that the timed run fills with (what, slots or prompts, start, end)."""
    import torch
    from titletune.generation.engine import Engine
    spans, cuda = [], torch.cuda.is_available()

    def timed(what, method, size):
        def wrapper(self, *args, **kwargs):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start = time.perf_counter()
            result = method(self, *args, **kwargs)
            if cuda:
                end.record()
            else:
                end = time.perf_counter()
            spans.append((what, size(self, *args), start, end))
            return result
        return wrapper
    # a pass's prompts, their tokens, and the tokens it computes (left padded to its longest prompt)
    Engine.prefill = timed("prefill", Engine.prefill,
                           lambda self, prompts, *_: (len(prompts), sum(map(len, prompts)),
                                                      len(prompts) * max(map(len, prompts))))
    Engine.decode = timed("decode", Engine.decode, lambda self: self.size)
    Engine.capture = timed("capture", Engine.capture, lambda self, n: n)
    return spans


def breakdown(spans: list, seconds: float) -> dict:
    """Where a timed run's time went: GPU time of the prefill passes and of the decode steps by step
    size (a step that captured its graph counts its capture too), and the rest (the GPU idle while
    Python works or waits); and of the prefill's computed tokens, the share that was left padding."""
    import torch
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    ms = lambda start, end: start.elapsed_time(end) if cuda else (end - start) * 1000  # noqa: E731
    steps: dict[int, list[float]] = {}
    prefill_ms, passes, capture_ms = 0.0, [], 0.0
    for what, size, start, end in spans:
        if what == "decode":
            steps.setdefault(size, []).append(ms(start, end))
        elif what == "prefill":
            prefill_ms, passes = prefill_ms + ms(start, end), passes + [size]
        else:
            capture_ms += ms(start, end)
    decode_ms = sum(sum(t) for t in steps.values())
    prompts, tokens, computed = (sum(column) for column in zip(*passes)) if passes else (0, 0, 0)
    return {"prefill_passes": len(passes), "prefill_prompts": prompts, "prefill_s": prefill_ms / 1000,
            "prefill_tokens": tokens, "prefill_padding": 1 - tokens / computed if computed else 0.0,
            "decode_steps": sum(map(len, steps.values())), "decode_s": decode_ms / 1000, "capture_s": capture_ms / 1000,
            "steps_by_slots": {n: {"steps": len(t), "ms_per_step": sum(t) / len(t)} for n, t in sorted(steps.items())},
            "other_s": seconds - (prefill_ms + decode_ms) / 1000}


def measure(args) -> dict:
    """One path, one model, one setting: a warm-up (up to 512 of the prompts, untimed), then the timed run."""
    import torch
    from titletune.generation.engine import eos_token_ids, generate, prompt_ids, until_eos
    if args.shape:
        folder = Path(args.work) / args.shape
        adapter = folder / ("adapter_b0" if args.adapter_b_zero else "adapter")
        model, tokenizer = load(args.path, folder / "base", adapter if args.adapter or args.adapter_b_zero else None)
        prompts = random_prompts(args.prompts)
        vocab = model.config.get_text_config().vocab_size
        eos_ids = set(range(0, vocab, 64)) if args.eos else set()
    else:
        from titletune.modeling import load_formatted
        from titletune.splits import select_examples
        model, tokenizer = load(args.path, ROOT / "models/tiny-llama", ROOT / "models/adapter" if args.adapter else None)
        prompts = prompt_ids(select_examples(load_formatted(ROOT / "data/formatted")["test"], 0))[:args.prompts]
        eos_ids = eos_token_ids(model, tokenizer) if args.eos else set()
    pad = tokenizer.pad_token_id

    if args.refill_share:
        import titletune.generation.engine as engine
        engine.REFILL_SHARE = args.refill_share

    def run(batch):
        if args.path == "before":
            return before_generate(model, batch, pad_token_id=pad, batch_size=args.batch_size,
                                   eos_ids=eos_ids, max_new_tokens=args.new_tokens)
        return generate(model, batch, pad_token_id=pad, max_new_tokens=args.new_tokens, eos_ids=eos_ids,
                        batch_size=args.slots, progress=False, keep=True)

    # warm-up: kernel selection, allocator, lazy init, and a GPU busy for a while (one full wave of
    # slots): with 64 prompts the tuned rows ran 1.17-1.53x the base rows on the same compute (H100).
    # It holds the longest prompt, so the timed run fits the engine it keeps (graphs captured once a model).
    run(prompts[:511] + [max(prompts, key=len)])
    captured = []
    if args.path == "engine":
        # The timed run is a kept engine's steady state (predict past its first part): every step size
        # has its graph. With EOS on, the warm-up's answers mostly stop together at --new-tokens and
        # its step never shrinks to the small sizes that a longer run's tail reaches.
        from titletune.generation.engine import KEPT_ENGINE
        kept = model.__dict__[KEPT_ENGINE]
        with torch.inference_mode():
            captured = [n for n in kept.sizes if kept.graph(n) is not None]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    spans = time_engine() if args.path == "engine" else None
    start = time.perf_counter()
    answers = run(prompts)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    useful = sum(len(until_eos(a, eos_ids)) for a in answers)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": device, "shape": args.shape or "tiny", "path": args.path,
            "adapter": args.adapter or args.adapter_b_zero, "adapter_b_zero": args.adapter_b_zero,
            "eos": args.eos, "prompts": len(prompts), "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "new_tokens": args.new_tokens, "output_tokens": useful, "seconds": seconds,
            "output_tokens_per_s": useful / seconds, "mean_answer_tokens": useful / len(prompts),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "attention": "engine: SDPA prefill + grouped matmul decode" if args.path == "engine" else
                         "Unsloth for_inference (its own decode attention)",
            "batch_size": args.batch_size if args.path == "before" else (args.slots or "auto"),
            "answer_hash": hash(tuple(map(tuple, answers))) & 0xFFFFFFFF, "refill_share": args.refill_share,
            "engine_kept": args.path == "engine",  # the warm-up's engine, its CUDA graphs captured there
            "graphs_before_timing": captured,      # the step sizes whose graphs the timed run replays
            "breakdown": breakdown(spans, seconds) if spans is not None else None,
            "command": "python benchmarks/generation_speed.py " + " ".join(args.argv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="random-init shape on the GPU (repeatable)")
    ap.add_argument("--paths", default="before,engine")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="the before path's batch (evaluate's default: 64)")
    ap.add_argument("--slots", type=int, help="the engine's slots (default: auto)")
    ap.add_argument("--split-prompts", type=int, default=0,
                    help="also time the engine (tuned, EOS held off and on) on this many prompts of the largest "
                         "shape: the basis for the time of evaluate.max_samples 0 on the full corpus's test split")
    ap.add_argument("--work", default="/tmp/titletune-bench", help="where random-init models are written")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generation_speed_cpu.jsonl")
    # one measurement (the driver runs each in a process of its own)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", action="store_true", help=argparse.SUPPRESS)
    # the tuned rows' slower prefill (benchmarks/README): the process's load and merge, or the weights' values?
    ap.add_argument("--adapter-b-zero", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eos", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--refill-share", type=int, help=argparse.SUPPRESS)  # engine.REFILL_SHARE, to measure it
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    if args.path:
        if args.shape:
            args.shape = args.shape[0]
        print(json.dumps(measure(args)), flush=True)
        return

    # (shape, path, adapter, eos, prompts): both paths on every shape; the tuned and EOS-on rows on the
    # last (largest) shape only, which the targets are about, to keep one GPU call under its time limit
    cases = []
    shapes = args.shape or [None]
    for shape in shapes:
        for path in args.paths.split(","):
            cases.append((shape, path, False, False, args.prompts))
            if path == "engine" and shape == shapes[-1]:
                cases += [(shape, "engine", True, False, args.prompts), (shape, "engine", True, True, args.prompts)]
        if shape:
            build_shape(shape, Path(args.work) / shape)
    if args.split_prompts:  # EOS held off (the full split's time) and on (the tail is a smaller part of a long run)
        cases += [((args.shape or [None])[-1], "engine", True, eos, args.split_prompts) for eos in (False, True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = []  # a failed measurement is reported and the others still run (one GPU call is precious)
    for shape, path, adapter, eos, prompts in cases:
        cmd = [sys.executable, __file__, "--path", path, "--prompts", str(prompts), "--new-tokens",
               str(args.new_tokens), "--batch-size", str(args.batch_size), "--work", args.work]
        cmd += (["--shape", shape] if shape else []) + (["--adapter"] if adapter else []) + (["--eos"] if eos else [])
        cmd += ["--slots", str(args.slots)] if args.slots else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        if proc.returncode != 0:
            failed.append(f"{shape} {path} adapter={adapter} eos={eos}")
            print(f"FAILED {failed[-1]}:\n{proc.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["eager_fallback"] = "without a CUDA graph" in proc.stderr  # the engine's one line when capture fails
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['device']:>24} {row['shape']:>4} {path:>6} adapter={adapter!s:5} eos={eos!s:5} {prompts:5} prompts "
              f"{row['output_tokens_per_s']:9,.0f} tok/s  {row['seconds']:6.1f} s  "
              f"answer {row['mean_answer_tokens']:.1f} tok  peak {row['peak_gb'] or 0:.1f} GB", flush=True)
        if row["breakdown"]:
            b = row["breakdown"]
            print(f"{'':>24} prefill {b['prefill_s']:.2f} s ({b['prefill_passes']} passes, "
                  f"{b['prefill_padding']:.0%} padding)  decode {b['decode_s']:.2f} s "
                  f"({b['decode_steps']} steps; " + ", ".join(f"{n}: {v['steps']} x {v['ms_per_step']:.1f} ms"
                                                     for n, v in b["steps_by_slots"].items()) +
                  f")  capture {b['capture_s']:.2f} s  other {b['other_s']:.2f} s", flush=True)
    if failed:
        sys.exit(f"{len(failed)} of {len(cases)} measurements failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
