"""Stage `tokenize-format`: each split -> tokenised prompt/completion pairs for SFTTrainer.

    python stages/tokenize_format.py data/processed data/formatted metrics/format.json

Reads params `model` (the tokenizer of model.name) and `format`; writes data/formatted (a
`datasets` DatasetDict on disk with `input_ids` and `completion_mask`, so SFTTrainer computes
the loss on the completion only and does no tokenising of its own) and metrics/format.json.
The prompt and completion are built by titletune.prompt.format_batch: titles and descriptions
are text (a `</s>` in a title stays characters) and are cut at `format.max_chars` characters
before tokenising (counted per split: `cut_at_max_chars`). datasets' cache lives in the output's
temp folder and goes with it: nothing is written to ~/.cache/huggingface.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_dataset

from titletune.cli import UserError, atomic_path, run_main, write_json
from titletune.modeling import load_tokenizer
from titletune.params import load_params
from titletune.prompt import format_batch

SPLITS = ("train", "val", "test")


def pin_fingerprints(saved: Path) -> None:
    """Make each split's `_fingerprint` (state.json) a hash of its saved Arrow data. datasets derives
    it from input file paths and mtimes, so the same data got another state.json, hence another
    DVC hash for data/formatted, in every clone or run."""
    for state_file in sorted(saved.glob("*/state.json")):
        digest = hashlib.sha256()
        for arrow in sorted(state_file.parent.glob("data-*.arrow")):
            with open(arrow, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        state = json.loads(state_file.read_text())
        state["_fingerprint"] = digest.hexdigest()[:16]
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True))


def split_metrics(split, dropped_prompt_too_long: int, cut: int) -> dict:
    # length_*: tokens of prompt + completion before the max_length cut (after the max_chars one).
    lengths = np.array(split["full_length"] or [0])
    return {
        "examples": len(split),
        "truncated": int(sum(split["truncated"])),
        "cut_at_max_chars": cut,  # records whose title or description was cut at format.max_chars
        "dropped_prompt_too_long": dropped_prompt_too_long,
        "tokens": int(sum(len(ids) for ids in split["input_ids"])),
        "length_p50": float(np.percentile(lengths, 50)),
        "length_p90": float(np.percentile(lengths, 90)),
        "length_p99": float(np.percentile(lengths, 99)),
        "length_max": int(lengths.max()),
    }


def main() -> None:
    in_dir, out_dir, metrics_path = map(Path, sys.argv[1:4])
    model, fmt = load_params("model", "format")
    tokenizer = load_tokenizer(model)
    if tokenizer.eos_token is None:
        raise UserError(f"model.name: the tokenizer of {model.name} has no EOS token")
    missing = [s for s in SPLITS if not (in_dir / f"{s}.parquet").is_file()]
    if missing:
        raise UserError(f"{in_dir}: missing split file(s) {missing}; run the preprocess stage first")

    with atomic_path(out_dir) as tmp:
        # datasets' cache (Arrow copies of the splits and of each map) beside the output, in
        # atomic_path's temp folder, which goes when the stage ends: not in ~/.cache/huggingface.
        cache = tmp.parent / "datasets-cache"
        raw = load_dataset("parquet", data_files={s: str(in_dir / f"{s}.parquet") for s in SPLITS},
                           cache_dir=str(cache))
        formatted = raw.map(format_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "fmt": fmt},
                            desc="Formatting")
        cut = {s: int(sum(formatted[s]["cut"])) for s in SPLITS}  # before dropping: every record counts
        # An example whose prompt alone fills max_length has nothing to learn from: drop and count it.
        no_room = {s: sum(1 for m in formatted[s]["completion_mask"] if not any(m)) for s in SPLITS}
        formatted = formatted.filter(lambda m: any(m), input_columns="completion_mask", desc="Dropping prompt-only")
        metrics = {"style": fmt.style, "max_length": fmt.max_length, "max_chars": fmt.text_cap(),
                   **{s: split_metrics(formatted[s], no_room[s], cut[s]) for s in SPLITS}}
        if metrics["train"]["examples"] == 0:
            raise UserError(f"{in_dir}/train.parquet: no usable training example after formatting")

        formatted = DatasetDict({s: formatted[s].remove_columns(["full_length", "truncated", "cut"]) for s in SPLITS})
        formatted.save_to_disk(str(tmp))
        pin_fingerprints(tmp)
    write_json(metrics_path, metrics)
    t = metrics["train"]
    print(f"tokenize-format: {' / '.join(str(metrics[s]['examples']) for s in SPLITS)} train/val/test "
          f"examples, {t['tokens']:,} train tokens, p50 {t['length_p50']:.0f} tokens, "
          f"{t['truncated']} truncated at {fmt.max_length}; "
          f"{sum(metrics[s]['cut_at_max_chars'] for s in SPLITS)} cut at {fmt.text_cap():,} characters")


if __name__ == "__main__":
    run_main(main)
