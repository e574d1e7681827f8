"""Stage `tokenize-format`: each split -> tokenised prompt/completion pairs for SFTTrainer.

    python -m stages.tokenize_format data/processed data/formatted metrics/format.json

Reads params `model` (the tokenizer of model.name) and `format`; writes data/formatted (a
`datasets` DatasetDict on disk with `input_ids`, `labels` and `completion_mask`: the trainer
takes the ids and labels as they are, with no tokenising or pass of its own) and
metrics/format.json. The prompt and completion are built by titletune.prompt.format_batch:
titles and descriptions are text (a `</s>` in a title stays characters) and are cut at
`format.max_chars` characters before tokenising (counted per split: `cut_at_max_chars`).

The full corpus (1.26 M examples) in ~2 minutes on 2 cores: batches of 1,000 records go through
the Rust tokenizer, one process per core, streamed to Arrow files; the metrics are computed on
Arrow columns, never on Python lists of every example (benchmarks/full_corpus.py measures it).
datasets' cache lives in the output's temp folder and goes with it: nothing is written to
~/.cache/huggingface.
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, run_main, write_json

ARGUMENTS = "IN_DIR OUT_DIR METRICS_JSON"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Features, List, Value, load_dataset

from titletune.modeling import load_tokenizer
from titletune.params import load_params
from titletune.prompt import format_batch

SPLITS = ("train", "val", "test")
# format_batch's columns, stored compactly: ids fit int32 (vocabularies < 2^31), masks int8.
COLUMNS = {"question": Value("string"), "prompt": Value("string"),
           "input_ids": List(Value("int32")), "completion_mask": List(Value("int8")), "labels": List(Value("int32")),
           "full_length": Value("int32"), "truncated": Value("bool"), "cut": Value("bool"),
           "prompt_only": Value("bool")}
STATS = ["full_length", "truncated", "cut", "prompt_only"]  # for the metrics only: not saved
# From one map batch (1,000 records) on, a second process has work of its own.
PARALLEL_FROM = 1_000


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


def column(split, name: str) -> np.ndarray:
    return split.data.column(name).to_numpy()


def split_metrics(split) -> dict:
    """One split's metrics, from its Arrow columns (never a Python list of 1 M token lists)."""
    kept = ~column(split, "prompt_only")
    # length_*: tokens of prompt + completion before the max_length cut (after the max_chars one).
    lengths = column(split, "full_length")[kept]
    tokens = pc.list_value_length(split.data.column("input_ids")).to_numpy()[kept]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]) if len(lengths) else (0, 0, 0)
    return {
        "examples": int(kept.sum()),
        "truncated": int(column(split, "truncated")[kept].sum()),
        "cut_at_max_chars": int(column(split, "cut").sum()),  # records whose title or description was cut
        # An example whose prompt alone fills max_length has nothing to learn from: dropped, counted.
        "dropped_prompt_too_long": int((~kept).sum()),
        "tokens": int(tokens.sum()),
        "length_p50": float(p50), "length_p90": float(p90), "length_p99": float(p99),
        "length_max": int(lengths.max()) if len(lengths) else 0,
    }


def main() -> None:
    in_dir, out_dir, metrics_path = command_line(ARGUMENTS)
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
        # Batches of 1,000 records through the Rust tokenizer, streamed to Arrow files on disk,
        # one process per core for a big corpus (the per-record Python work needs them too).
        cores = len(os.sched_getaffinity(0))
        formatted = raw.map(format_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "fmt": fmt},
                            features=Features({**raw["train"].features, **COLUMNS}), desc="Formatting",
                            num_proc=cores if cores > 1 and raw.num_rows["train"] >= PARALLEL_FROM else None)
        metrics = {"style": fmt.style, "max_length": fmt.max_length, "max_chars": fmt.text_cap(),
                   **{s: split_metrics(formatted[s]) for s in SPLITS}}
        if metrics["train"]["examples"] == 0:
            raise UserError(f"{in_dir}/train.parquet: no usable training example after formatting")
        if any(metrics[s]["dropped_prompt_too_long"] for s in SPLITS):
            formatted = formatted.filter(lambda prompt_only: [not p for p in prompt_only], input_columns="prompt_only",
                                         batched=True, desc="Dropping prompt-only")
        formatted.remove_columns(STATS).save_to_disk(str(tmp))
        pin_fingerprints(tmp)
    write_json(metrics_path, metrics)
    t = metrics["train"]
    print(f"tokenize-format: {' / '.join(str(metrics[s]['examples']) for s in SPLITS)} train/val/test "
          f"examples, {t['tokens']:,} train tokens, p50 {t['length_p50']:.0f} tokens, "
          f"{t['truncated']} truncated at {fmt.max_length}; "
          f"{sum(metrics[s]['cut_at_max_chars'] for s in SPLITS)} cut at {fmt.text_cap():,} characters")


if __name__ == "__main__":
    run_main(main)
