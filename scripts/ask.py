"""ask: put a free question about a product to the fine-tuned model; the answer streams as it is generated.

    python scripts/ask.py "What is Harry Potter and the Goblet of Fire?"
    python scripts/ask.py                    # interactive: a question a line; empty line or Ctrl-D ends
    python scripts/ask.py --base "..."       # the base model alone, to compare

Loads the base model (params.yaml `model`) + the adapter from models/adapter (`dvc repro` makes
it), wraps the question in the training prompt (titletune.prompt, `format.style`) and generates
with `evaluate`'s settings (max_new_tokens, do_sample, temperature, top_p).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from titletune.cli import run_main
from titletune.generation.engine import eos_token_ids, generate, generation_kwargs, load_for_generation
from titletune.params import load_params
from titletune.prompt import encode_prompts

ROOT = Path(__file__).resolve().parent.parent


def questions(first: str | None):
    """The one question from the command line, or lines from stdin until EOF or an empty line."""
    if first is not None:
        yield first
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("question> " if interactive else "").strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", help="e.g. \"What is <product title>?\"; none: read stdin")
    ap.add_argument("--base", action="store_true", help="answer with the base model, without the adapter")
    ap.add_argument("--adapter", type=Path, default=ROOT / "models" / "adapter")
    args = ap.parse_args()
    adapter = args.adapter.resolve()
    os.chdir(ROOT)  # params.yaml and the paths in it are relative to the repository root
    model_params, fmt, ep = load_params("model", "format", "evaluate")

    model, tokenizer = load_for_generation(model_params, None if args.base else adapter)
    from transformers import TextStreamer
    import torch
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    eos_ids = eos_token_ids(model, tokenizer)

    def show(_, token):  # the answer as it grows, without its end-of-answer token
        if token not in eos_ids:
            streamer.put(torch.tensor([token]))

    for question in questions(args.question):
        # the question is text, as the titles were in training: a `</s>` in it stays characters
        ids = encode_prompts(tokenizer, [question], fmt.style)[0]
        generate(model, [ids], pad_token_id=tokenizer.pad_token_id, eos_ids=eos_ids, progress=False,
                 on_token=show, **generation_kwargs(ep))
        streamer.end()
        sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
