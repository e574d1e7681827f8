"""Stage `export`: merge the LoRA adapter into the base weights; save a plain Hugging Face model,
after checking that it answers like base + adapter (the parity gate).

    python stages/export.py data/formatted models/adapter models/merged metrics/export.json

Reads params `model`, `format` (max_length, style) and `export`; writes models/merged (safetensors,
tokenizer with its SentencePiece tokenizer.model where it has one, a chat template that writes the
training prompt, generation_config.json whose EOS ends the answers: titletune.export.merge), which
loads with `AutoModelForCausalLM.from_pretrained`, without PEFT or Unsloth, for serving or sharing
(or the gguf stage's conversion), and metrics/export.json (the parity figures).

`export.dtype: auto` keeps the dtype base + adapter computes in (titletune.modeling.compute_dtype:
bf16 on GPUs that have it, else fp16; float32 on every CPU), so the merged model's greedy answers
are those of base + adapter. On CPU the tiny random model's next-token scores are nearly tied:
rounding its merged weights to fp16 changed 3 of 32 greedy 64-token answers, bf16 20. Set
export.dtype to float16 or bfloat16 to force a 16-bit file from a CPU machine.

The parity gate: base + adapter answers the first `export.parity_samples` test questions (greedy)
and scores their reference answers (per-token NLL) before the merge; the merged model, saved and
loaded back with plain transformers, does the same; beyond the tolerances in params the stage
fails with one line, models/merged is not written and metrics/export.json says by how much.
With export.register_merged, the merged model is logged to MLflow beside the adapter's version of
the registered model `evaluate.registered_model` (titletune.tracking.register_export).
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

from titletune.cli import UserError, atomic_path, run_main, write_json
from titletune.export.merge import (compare, parity_problems, parity_scores, save_tokenizer, set_chat_template,
                                    set_generation_eos)
from titletune.generation.engine import eos_token_ids
from titletune.modeling import load_formatted, load_tuned_model
from titletune.params import load_params
from titletune.splits import select_examples
from titletune.tracking import register_export


def main() -> None:
    data_dir, adapter_dir, out_dir, report_path = map(Path, sys.argv[1:5])
    model_params, fmt, export, registry = load_params("model", "format", "export", "evaluate")
    # Merge into full-precision weights: merging into a 4-bit base would round the adapter away.
    model_params = model_params.model_copy(update={"load_in_4bit": False})
    model, tokenizer = load_tuned_model(model_params, fmt.max_length, adapter_dir)
    model.eval()

    import torch  # after load_tuned_model, which imported unsloth first
    dtype = model.dtype if export.dtype == "auto" else getattr(torch, export.dtype)
    device = model.device
    eos_ids = eos_token_ids(model, tokenizer)
    data = load_formatted(data_dir)
    if export.parity_samples:
        examples = select_examples(data["test"], export.parity_samples)
        if len(examples) == 0:
            raise UserError(f"{data_dir}: the test split is empty; raise preprocess.test_fraction "
                            "or set export.parity_samples: 0")
        reference = parity_scores(model, tokenizer, examples, export, eos_ids, "base + adapter")

    merged = model.merge_and_unload()  # W + (alpha/r)·B·A in the loaded dtype; a plain transformers model
    merged = merged.to(dtype)
    set_chat_template(tokenizer, fmt.style, data["train"].select(range(min(64, len(data["train"])))))
    set_generation_eos(merged.generation_config, tokenizer)
    n_params = sum(p.numel() for p in merged.parameters())
    dtype_name = str(dtype).removeprefix("torch.")
    report = {"dtype": dtype_name, "parameters": n_params, "gate": bool(export.parity_samples)}
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        del merged, model
        gc.collect()
        problems = []
        if export.parity_samples:
            # What users load: the saved files, through plain transformers.
            from transformers import AutoModelForCausalLM
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
            result = compare(reference, parity_scores(reloaded, tokenizer, examples, export, eos_ids, "merged"))
            problems = parity_problems(result, export)
            report.update(result, passed=not problems)
        write_json(report_path, report)
        if problems:
            raise UserError(
                f"the merged model does not answer like base + adapter on {report['samples']} test examples: "
                f"{'; '.join(problems)}. {out_dir} was not written; {report_path} has the figures. "
                f"A 16-bit export.dtype ({dtype_name} here) rounds the merged weights: use export.dtype auto, "
                "or raise the tolerances in params.yaml if the difference is acceptable")
    gate = (f"parity with base + adapter on {report['samples']} test examples: {report['answers_identical']} "
            f"identical greedy answers, token mismatch {report['token_mismatch']:.3g}, per-token NLL within "
            f"{report['nll_max_abs_diff']:.2g}" if export.parity_samples else "no parity gate (export.parity_samples 0)")
    print(f"export: {n_params / 1e6:,.1f} M parameters merged, {dtype_name}, in {out_dir} "
          f"(AutoModelForCausalLM.from_pretrained loads it); {gate}")
    if export.register_merged and registry.registered_model:
        version = register_export(registry.registered_model, adapter_dir, out_dir, report)
        print(f"export: MLflow model registry: {registry.registered_model} version {version.version} "
              f"has the merged model (artifact `merged` of run {version.run_id})")


if __name__ == "__main__":
    run_main(main)
