"""ask: put a free question about a product to the fine-tuned model; the answer streams as it is generated.

    python scripts/ask.py "What is Harry Potter and the Goblet of Fire?"
    python scripts/ask.py                    # interactive: a question a line, until Ctrl-D (EOF)
    python scripts/ask.py --base "..."       # the base model alone, to compare

Loads the base model (params.yaml `model`) + the adapter from models/adapter (`dvc repro` makes
it), wraps the question in the training prompt (titletune.prompt, `format.style`) and generates
with `evaluate`'s settings (max_new_tokens, do_sample, temperature, top_p).

A question that cannot be asked (empty, not UTF-8, or too long for the model's positions with
max_new_tokens after it) is one line: the error of the one question on the command line, or a
skipped line of stdin (blank lines are skipped silently; a count ends the session).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from titletune.cli import UserError, run_main
from titletune.generation.engine import eos_token_ids, generate, generation_kwargs, load_for_generation
from titletune.modeling import prompt_room, prompt_too_long
from titletune.params import load_params
from titletune.prompt import encode_prompts

ROOT = Path(__file__).resolve().parent.parent


def questions(first: str | None):
    """(where, question): the one question from the command line, or the lines of stdin until EOF
    (Ctrl-D); blank lines are skipped."""
    if first is not None:
        yield "question", first.strip()
        return
    interactive = sys.stdin.isatty()
    number = 0
    while True:
        try:
            line = input("question> " if interactive else "").strip()
        except EOFError:
            return
        number += 1
        if line:
            yield f"line {number}", line


def check_question(where: str, question: str) -> None:
    if not question:
        raise UserError(f"{where}: empty; ask about a product, e.g. \"What is <product title>?\"")
    bad = next((ch for ch in question if "\udc80" <= ch <= "\udcff"), None)   # a byte surrogateescape kept
    if bad is not None:
        raise UserError(f"{where}: not UTF-8 (byte 0x{ord(bad) - 0xdc00:02x})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", help="e.g. \"What is <product title>?\"; none: read stdin")
    ap.add_argument("--base", action="store_true", help="answer with the base model, without the adapter")
    ap.add_argument("--adapter", type=Path, default=ROOT / "models" / "adapter")
    args = ap.parse_args()
    if args.question is not None:
        check_question("question", args.question.strip())   # before the model loads
    elif sys.stdin is None:
        raise UserError("no question given and no stdin to read questions from")
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

    if args.question is None:
        # Bytes that are not UTF-8 reach check_question as surrogates instead of failing the read.
        sys.stdin.reconfigure(errors="surrogateescape")
    answered = skipped = 0
    for where, question in questions(args.question):
        try:
            check_question(where, question)
            # the question is text, as the titles were in training: a `</s>` in it stays characters
            ids = encode_prompts(tokenizer, [question], fmt.style)[0]
            why = prompt_too_long(len(ids), prompt_room(model, ep.max_new_tokens), ep.max_new_tokens, model_params.name)
            if why:
                raise UserError(f"{where}: {why}")
        except UserError as err:
            if args.question is not None:
                raise
            print(f"ask: {err}; skipped", file=sys.stderr, flush=True)
            skipped += 1
            continue
        answered += 1
        generate(model, [ids], pad_token_id=tokenizer.pad_token_id, eos_ids=eos_ids, progress=False,
                 on_token=show, keep=True, **generation_kwargs(ep))  # keep: the next question reuses its engine
        streamer.end()
        sys.stdout.flush()
    if args.question is None:
        print(f"ask: {answered} question(s) answered, {skipped} skipped", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
