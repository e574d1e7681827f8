"""predict: the fine-tuned model's answers for a file of products.

    python scripts/predict.py products.jsonl answers.jsonl                  # base + models/adapter
    python scripts/predict.py products.csv answers.jsonl --model models/merged
    python scripts/predict.py products.jsonl base_answers.jsonl --base      # the base model alone

INPUT: JSON lines, objects with `title` (optional `uid`, `question`), or CSV with a header naming
a `title` column (optional `uid`, `question`); any size: it is streamed. OUTPUT: JSON lines
{uid, title, answer, tokens} in input order; uid is the row's own, else its line number. Each row
is asked its own `question` (a `{title}` in it becomes the title), else the training phrasing
(params.yaml `format.questions`, rotated by uid as in training), in the training prompt
(`format.style`), with evaluate's generation settings (max_new_tokens, do_sample, temperature,
top_p, batch_size). Malformed lines are skipped, counted and listed (the first 20) with their line
numbers, as are rows whose prompt is too long for the model's positions (listed as they come); a
missing, empty or non-UTF-8 file, or a CSV without a title column, stops it before anything is
written.

Interrupted (Ctrl-C, kill, a crash), it resumes: run the same command again. Finished chunks of
`predict.chunk_rows` rows are kept in OUTPUT.parts/ until OUTPUT is written, all at once.
An existing OUTPUT is replaced only with --overwrite. With several GPUs (`predict.gpus`) it
relaunches itself under torchrun, one process a GPU; the output order is the input's
(titletune.generation.predict).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from titletune.cli import run_main
from titletune.generation.predict import check_input, predict
from titletune.launch import relaunch, resolve_gpus, world_size
from titletune.params import load_params

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="products: .jsonl or .csv, with a title field")
    ap.add_argument("output", type=Path, help="answers: .jsonl")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=ROOT / "models" / "adapter",
                       help="a LoRA adapter folder (default: models/adapter) or a full model folder (models/merged)")
    which.add_argument("--base", action="store_true", help="the base model (params.yaml model.name), no adapter")
    ap.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = ap.parse_args()
    source = None if args.base else args.model.resolve()
    # params.yaml and the model paths in it are relative to the repository root; INPUT and OUTPUT
    # to where the command runs (its messages name them as given)
    params = load_params("model", "format", "evaluate", "predict", path=ROOT / "params.yaml")
    found = check_input(args.input, args.output, source, args.overwrite)   # bad input stops here, before any model

    n_gpus = resolve_gpus(params[3].gpus, "predict.gpus")
    if n_gpus > 1 and world_size() == 1:   # not yet under torchrun: there, one process a GPU
        relaunch(n_gpus, "predict")
    predict(args.input, args.output, source, found, params, ROOT)


if __name__ == "__main__":
    run_main(main)
