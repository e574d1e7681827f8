"""ask: put a free question about a product to the fine-tuned model; the answer streams as it is generated.

    python scripts/ask.py "What is Harry Potter and the Goblet of Fire?"
    python scripts/ask.py                    # interactive: a question a line; empty line or Ctrl-D ends
    python scripts/ask.py --base "..."       # the base model alone, to compare

Loads the base model (params.yaml `model`) + the adapter from models/adapter (`dvc repro` makes
it), wraps the question in the training prompt (common.build_prompt, `format.style`) and
generates with `evaluate`'s settings (max_new_tokens, do_sample, temperature, top_p).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "stages"))

from common import build_prompt, encode_prompts, load_model, load_params, load_tuned_model, run_main  # noqa: E402
from evaluate import generation_kwargs  # noqa: E402  (the same settings as the evaluate stage)


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
    params = load_params("model", "format", "evaluate")
    style, max_length = params["format"]["style"], params["format"]["max_length"]

    # Both loaders import unsloth before transformers and PEFT.
    if args.base:
        model, tokenizer = load_model(params["model"], max_length)
    else:
        model, tokenizer = load_tuned_model(params["model"], max_length, args.adapter)
    from transformers import TextStreamer
    from unsloth import FastLanguageModel
    FastLanguageModel.for_inference(model)
    model.eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    for question in questions(args.question):
        prompt = build_prompt(tokenizer, question, style)
        inputs = encode_prompts(tokenizer, prompt, style, return_tensors="pt").to(model.device)
        model.generate(**inputs, streamer=streamer, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                       **generation_kwargs(params["evaluate"]))
        sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
