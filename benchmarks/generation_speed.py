"""Generation speed: the evaluate stage's generation against the seed notebook's loop, in one run.

    python benchmarks/generation_speed.py                         # CPU: models/tiny-llama (+ models/adapter)
    python benchmarks/generation_speed.py --shape llama-3.2-1b    # GPU: random-init Llama-3.2-1B shape, bf16

Same model, same prompts, same number of new tokens for both paths:
  evaluate   titletune.generation.engine.generate() (the evaluate stage's): batches, left padding, KV cache
  seed loop  one prompt at a time, model.generate(use_cache=False): every new token re-runs the text
Greedy, and end-of-sequence is held off (min_new_tokens = max_new_tokens) so that both generate
exactly --new-tokens tokens per prompt. Each path runs once untimed first (warm-up), then both
run in turn --repeats times and the best time of each counts.

--model: a local model folder; the trained adapter is applied when --adapter exists; prompts are
the evaluate stage's test prompts from --data. --shape: a random-init model built on the GPU from
a LlamaConfig, prompts of random token ids (fixed seed) of 32-48 tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import unsloth  # noqa: F401  (first, as in the stages: it patches transformers and PEFT)
import torch
from tqdm import tqdm

from titletune.cli import UserError, run_main
from titletune.generation.engine import generate, prompt_ids
from titletune.modeling import load_formatted, load_model, load_tuned_model
from titletune.params import load_params
from titletune.splits import select_examples

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24 B parameters (tied embeddings)
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=128000, eos_token_id=128001, pad_token_id=128004),
}


def seed_loop(model, prompts: list[list[int]], pad_token_id: int, **generate_kwargs) -> list[list[int]]:
    """The seed notebook's way: one prompt at a time, without the KV cache."""
    out = []
    for ids in tqdm(prompts, desc="seed loop", unit="prompt"):
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       pad_token_id=pad_token_id, use_cache=False, **generate_kwargs)
        out.append(generated[0, len(ids):].tolist())
    return out


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def local_model(args, model, fmt):
    """The tiny (or any local) model, with the trained adapter if there is one, and the test prompts."""
    model_params = model.model_copy(update={"name": args.model})
    max_length = fmt.max_length
    if (args.adapter / "adapter_config.json").is_file():
        model, tokenizer = load_tuned_model(model_params, max_length, args.adapter)
        label = f"{args.model} + adapter"
    else:
        model, tokenizer = load_model(model_params, max_length)
        label = f"{args.model} (no adapter at {args.adapter})"
    from unsloth import FastLanguageModel
    FastLanguageModel.for_inference(model)  # as the evaluate stage does
    prompts = prompt_ids(select_examples(load_formatted(args.data)["test"], args.prompts))
    return model.eval(), prompts, tokenizer.pad_token_id, label


def shape_model(args):
    """A random-init model of a real shape on the GPU, in bf16, and random-token prompts."""
    if not torch.cuda.is_available():
        raise UserError("--shape builds a model on the GPU; no CUDA device here")
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 49, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in lengths]
    n_params = sum(p.numel() for p in model.parameters())
    return model.eval(), prompts, config.pad_token_id, f"random-init {args.shape} ({n_params / 1e9:.2f} B, bf16)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-llama", help="local model folder (default: %(default)s)")
    ap.add_argument("--adapter", type=Path, default=ROOT / "models" / "adapter")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "formatted")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape on the GPU")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, help="evaluate's batch size (default: params evaluate.batch_size)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path; the best counts")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    model_params, fmt, ep = load_params("model", "format", "evaluate")
    batch_size = args.batch_size or ep.batch_size

    model, prompts, pad, label = shape_model(args) if args.shape else local_model(args, model_params, fmt)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({torch.get_num_threads()} threads)")

    # Warm-up: first calls pay one-time costs (kernel selection, allocator, lazy init).
    generate(model, prompts[:batch_size], pad_token_id=pad, batch_size=batch_size, desc="warm-up",
             **dict(kwargs, max_new_tokens=2, min_new_tokens=2))
    seed_loop(model, prompts[:1], pad, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))

    # Both paths in turn, --repeats times; the best time of each counts (the least disturbed by
    # other jobs on a shared machine).
    fast_times, slow_times = [], []
    for _ in range(args.repeats):
        fast, fast_s = timed(lambda: generate(model, prompts, pad_token_id=pad, batch_size=batch_size,
                                              desc="evaluate", **kwargs))
        slow, slow_s = timed(lambda: seed_loop(model, prompts, pad, **kwargs))
        fast_times.append(fast_s)
        slow_times.append(slow_s)
        print(f"  evaluate {fast_s:.2f} s, seed loop {slow_s:.2f} s", flush=True)
    fast_s, slow_s = min(fast_times), min(slow_times)
    fast_tokens, slow_tokens = sum(map(len, fast)), sum(map(len, slow))
    result = {
        "model": label, "device": device, "prompts": len(prompts),
        "mean_prompt_tokens": statistics.mean(map(len, prompts)), "new_tokens": args.new_tokens,
        "batch_size": batch_size,
        "evaluate_tokens_per_s": fast_tokens / fast_s, "evaluate_s": fast_s,
        "seed_loop_tokens_per_s": slow_tokens / slow_s, "seed_loop_s": slow_s,
        "speedup": (fast_tokens / fast_s) / (slow_tokens / slow_s),
        "repeats": args.repeats, "evaluate_times_s": fast_times, "seed_loop_times_s": slow_times,
        "same_greedy_output": sum(a == b for a, b in zip(fast, slow)),
        "command": " ".join(["python", "benchmarks/generation_speed.py", *sys.argv[1:]]),
    }
    print(f"\ngeneration speed: {label} on {device}; {len(prompts)} prompts of "
          f"{result['mean_prompt_tokens']:.0f} tokens on average, {args.new_tokens} new tokens each, greedy; "
          f"best of {args.repeats}")
    print(f"  evaluate  (batches of {batch_size}, left padding, KV cache): {fast_tokens:,} tokens in "
          f"{fast_s:7.2f} s = {result['evaluate_tokens_per_s']:9,.1f} tokens/s")
    print(f"  seed loop (one prompt at a time, use_cache=False):  {slow_tokens:,} tokens in "
          f"{slow_s:7.2f} s = {result['seed_loop_tokens_per_s']:9,.1f} tokens/s")
    print(f"  speed-up: {result['speedup']:.1f}x  (identical greedy tokens for "
          f"{result['same_greedy_output']}/{len(prompts)} prompts; padding and caching change rounding)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
