"""GGUF figures of benchmarks/README.md: the file size of each GGUF type, and CPU generation speed
through llama.cpp against transformers on the same prompts.

    python benchmarks/gguf_figures.py [--merged models/merged] [--data data/formatted] [--prompts 16] [--new 64]

After `make gguf` (models/merged and data/formatted exist, llama.cpp is installed). Each type is
converted into a scratch folder with the gguf stage's own code (titletune.export.gguf.convert).
Speed: greedy decoding of --new tokens for each of the first --prompts test prompts (evaluate's
fixed order), EOS held off so every prompt yields the same count; one prompt at a time on both
sides (a chat user's case), and transformers batched as evaluate runs it; tokens/s = generated
tokens / wall seconds, prompt processing included. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from titletune.export import gguf
from titletune.generation.engine import generate, prompt_ids
from titletune.modeling import load_formatted
from titletune.params import GGUF_TYPES
from titletune.splits import select_examples


def llama_cpp_speed(path: Path, prompts: list[list[int]], new: int) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=max(map(len, prompts)) + new, n_threads=os.cpu_count(), verbose=False)
    start, count = time.perf_counter(), 0
    for prompt in prompts:
        for _ in zip(range(new), llm.generate(prompt, temp=0.0, reset=True)):
            count += 1
    return count / (time.perf_counter() - start)


def hf_speed(model, pad: int, prompts: list[list[int]], new: int, batch_size: int) -> float:
    start = time.perf_counter()
    out = generate(model, prompts, pad_token_id=pad, batch_size=batch_size, desc="transformers",
                   max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return sum(map(len, out)) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged", type=Path, default=Path("models/merged"))
    ap.add_argument("--data", type=Path, default=Path("data/formatted"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompts = prompt_ids(select_examples(load_formatted(args.data)["test"], args.prompts))
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    model = AutoModelForCausalLM.from_pretrained(args.merged, dtype="auto").eval()
    results = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "prompts": len(prompts), "new_tokens": args.new,
               "merged_mb": round(sum(p.stat().st_size for p in args.merged.glob("*.safetensors")) / 2**20, 3),
               "hf_dtype": str(model.dtype).removeprefix("torch."),
               "hf_tok_s_one_prompt": hf_speed(model, tokenizer.pad_token_id, prompts, args.new, 1),
               "hf_tok_s_batched": hf_speed(model, tokenizer.pad_token_id, prompts, args.new, len(prompts))}
    with tempfile.TemporaryDirectory() as tmp:
        converted = gguf.convert(args.merged, Path(tmp), list(GGUF_TYPES))
        for gguf_type in GGUF_TYPES:
            path = Path(tmp) / gguf.file_name(gguf_type)
            results[gguf_type] = {"size_mb": gguf.size_mb(path), **converted[gguf_type],
                                  "llama_cpp_tok_s_one_prompt": llama_cpp_speed(path, prompts, args.new)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
