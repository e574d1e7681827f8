"""tokenize-format: turn each split into tokenised prompt/completion pairs for SFTTrainer.

    python stages/tokenize_format.py data/processed data/formatted metrics/format.json

The prompt asks about the product by its title, in a phrasing picked deterministically by uid
from `format.questions`; the completion is the description followed by the tokenizer's EOS.
The output (a `datasets` DatasetDict saved to disk) carries `input_ids` and `completion_mask`,
so SFTTrainer computes the loss on the completion only and does no tokenising of its own.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer

from common import (UserError, atomic_path, build_prompt, encode_prompts, load_params, pick_question,
                    resolve_model_name, run_main, write_json)

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


def load_tokenizer(model: dict):
    """The base model's tokenizer alone (no weights needed to format data)."""
    return AutoTokenizer.from_pretrained(resolve_model_name(model["name"]),
                                         trust_remote_code=model["trust_remote_code"])


def format_batch(batch: dict, tokenizer, fmt: dict) -> dict:
    """Prompt/completion text and token ids for a batch of records (uid, title, content)."""
    questions = [pick_question(fmt["questions"], uid).format(title=title)
                 for uid, title in zip(batch["uid"], batch["title"])]
    prompts = [build_prompt(tokenizer, q, fmt["style"]) for q in questions]
    completions = [content + tokenizer.eos_token for content in batch["content"]]
    prompt_ids = encode_prompts(tokenizer, prompts, fmt["style"])["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    input_ids, masks, lengths, truncated = [], [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids = (p + c)[: fmt["max_length"]]
        input_ids.append(ids)
        masks.append([0] * len(p) + [1] * (len(ids) - len(p)))
        lengths.append(len(p) + len(c))
        truncated.append(len(p) + len(c) > fmt["max_length"])
    return {"question": questions, "prompt": prompts, "completion": completions,
            "input_ids": input_ids, "completion_mask": masks,
            "full_length": lengths, "truncated": truncated}


def main() -> None:
    in_dir, out_dir, metrics_path = map(Path, sys.argv[1:4])
    params = load_params("model", "format")
    fmt = params["format"]
    if fmt["style"] not in ("instruction", "chat"):
        raise UserError(f"params.yaml: format.style: expected instruction or chat, got {fmt['style']!r}")
    if not fmt["questions"] or any("{title}" not in q for q in fmt["questions"]):
        raise UserError("params.yaml: format.questions: need at least one question, each with {title}")
    tokenizer = load_tokenizer(params["model"])
    if tokenizer.eos_token is None:
        raise UserError(f"model.name: the tokenizer of {params['model']['name']} has no EOS token")

    missing = [s for s in SPLITS if not (in_dir / f"{s}.parquet").is_file()]
    if missing:
        raise UserError(f"{in_dir}: missing split file(s) {missing}; run the preprocess stage first")
    raw = load_dataset("parquet", data_files={s: str(in_dir / f"{s}.parquet") for s in SPLITS})
    formatted = raw.map(format_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "fmt": fmt},
                        desc="Formatting")
    # An example whose prompt alone fills max_length has nothing to learn from: drop and count it.
    no_room = {s: sum(1 for m in formatted[s]["completion_mask"] if not any(m)) for s in SPLITS}
    formatted = formatted.filter(lambda m: any(m), input_columns="completion_mask", desc="Dropping prompt-only")

    metrics = {"style": fmt["style"], "max_length": fmt["max_length"]}
    for split in SPLITS:
        lengths = np.array(formatted[split]["full_length"] or [0])
        metrics[split] = {
            "examples": len(formatted[split]),
            "truncated": int(sum(formatted[split]["truncated"])),
            "dropped_prompt_too_long": no_room[split],
            "tokens": int(sum(len(ids) for ids in formatted[split]["input_ids"])),
            "length_p50": float(np.percentile(lengths, 50)),
            "length_p90": float(np.percentile(lengths, 90)),
            "length_p99": float(np.percentile(lengths, 99)),
            "length_max": int(lengths.max()),
        }
    if metrics["train"]["examples"] == 0:
        raise UserError(f"{in_dir}/train.parquet: no usable training example after formatting")
    formatted = DatasetDict({s: formatted[s].remove_columns(["full_length", "truncated"]) for s in SPLITS})
    with atomic_path(out_dir) as tmp:
        formatted.save_to_disk(str(tmp))
        pin_fingerprints(tmp)
    write_json(metrics_path, metrics)
    t = metrics["train"]
    print(f"tokenize-format: {' / '.join(str(metrics[s]['examples']) for s in SPLITS)} train/val/test "
          f"examples, {t['tokens']:,} train tokens, p50 {t['length_p50']:.0f} tokens, "
          f"{t['truncated']} truncated at {fmt['max_length']}")


if __name__ == "__main__":
    run_main(main)
