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
The export params and the parity figures are logged to the adapter's training run in MLflow
(titletune.tracking.stage_run). With export.register_merged, the merged model is logged to MLflow
beside the adapter's version of the registered model `evaluate.registered_model`
(titletune.tracking.register_export).
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, run_main, write_json

ARGUMENTS = "DATA_DIR ADAPTER_DIR OUT_DIR REPORT_JSON"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import gc
from pathlib import Path

from titletune.export.merge import (compare, parity_problems, parity_scores, save_tokenizer, set_chat_template,
                                    set_generation_eos)
from titletune.generation.engine import eos_token_ids, load_for_generation, prompt_ids
from titletune.modeling import check_answer_room, load_formatted
from titletune.params import read_params
from titletune.splits import select_examples
from titletune.tracking import check_store, log_export, register_export


def load_base_and_adapter(model_params, adapter_dir: Path):
    """Base + adapter in full precision: merging into a 4-bit base would round the adapter away."""
    model_params = model_params.model_copy(update={"load_in_4bit": False})
    # merge=False: base + adapter as trained, the reference the merged model is compared with
    return load_for_generation(model_params, adapter_dir, merge=False)


def export_dtype(model, export):
    """export.dtype as a torch dtype; auto: the dtype base + adapter computes in."""
    import torch
    return model.dtype if export.dtype == "auto" else getattr(torch, export.dtype)


def parity_examples(data, data_dir: Path, export):
    """The gate's test examples (evaluate's fixed order), or None without a gate."""
    if not export.parity_samples:
        return None
    examples = select_examples(data["test"], export.parity_samples)
    if len(examples) == 0:
        raise UserError(f"{data_dir}: the test split is empty; raise preprocess.test_fraction "
                        "or set export.parity_samples: 0")
    return examples


def merge(model, tokenizer, data, fmt, dtype):
    """W + (alpha/r)·B·A in the loaded dtype, cast to `dtype`: a plain transformers model, whose
    tokenizer writes the training prompt and whose generation config stops on the training EOS."""
    merged = model.merge_and_unload().to(dtype)
    set_chat_template(tokenizer, fmt.style, data["train"].select(range(min(64, len(data["train"])))))
    set_generation_eos(merged.generation_config, tokenizer)
    return merged


def reloaded_parity(folder: Path, dtype, device, tokenizer, examples, export, eos_ids, reference) -> dict:
    """The saved files, loaded as users load them (plain transformers), against base + adapter."""
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return compare(reference, parity_scores(reloaded, tokenizer, examples, export, eos_ids, "merged"))


def summary(report: dict, out_dir: Path) -> str:
    gate = (f"parity with base + adapter on {report['samples']} test examples: {report['answers_identical']} "
            f"identical greedy answers, token mismatch {report['token_mismatch']:.3g}, per-token NLL within "
            f"{report['nll_max_abs_diff']:.2g}" if report["gate"] else "no parity gate (export.parity_samples 0)")
    return (f"export: {report['parameters'] / 1e6:,.1f} M parameters merged, {report['dtype']}, in {out_dir} "
            f"(AutoModelForCausalLM.from_pretrained loads it); {gate}")


def record(params, report: dict, adapter_dir: Path, out_dir: Path) -> None:
    """The export params and parity figures on the training run; the merged model in the registry."""
    run_id = log_export(params, report)
    registry = params.evaluate.registered_model
    if params.export.register_merged and registry:
        version = register_export(registry, adapter_dir, out_dir, report, run_id)
        print(f"export: MLflow model registry: {registry} version {version.version} "
              f"has the merged model (artifact `merged` of run {version.run_id})")


def main() -> None:
    data_dir, adapter_dir, out_dir, report_path = command_line(ARGUMENTS)
    params = read_params()
    fmt, export = params.format, params.export
    check_store()  # before the model loads: an unusable MLflow store fails in seconds
    model, tokenizer = load_base_and_adapter(params.model, adapter_dir)
    dtype, device, eos_ids = export_dtype(model, export), model.device, eos_token_ids(model, tokenizer)
    data = load_formatted(data_dir)
    examples = parity_examples(data, data_dir, export)
    if examples is not None:
        check_answer_room(model, max(map(len, prompt_ids(examples))), export.parity_max_new_tokens,
                          "export.parity_max_new_tokens", params.model.name)
    reference = None if examples is None else parity_scores(model, tokenizer, examples, export, eos_ids,
                                                            "base + adapter")

    merged = merge(model, tokenizer, data, fmt, dtype)
    report = {"dtype": str(dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in merged.parameters()),
              "gate": examples is not None}
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        del merged, model
        gc.collect()
        problems = []
        if examples is not None:
            result = reloaded_parity(tmp, dtype, device, tokenizer, examples, export, eos_ids, reference)
            problems = parity_problems(result, export)
            report.update(result, passed=not problems)
        write_json(report_path, report)
        if problems:
            raise UserError(
                f"the merged model does not answer like base + adapter on {report['samples']} test examples: "
                f"{'; '.join(problems)}. {out_dir} was not written; {report_path} has the figures. "
                f"A 16-bit export.dtype ({report['dtype']} here) rounds the merged weights: use export.dtype auto, "
                "or raise the tolerances in params.yaml if the difference is acceptable")
    print(summary(report, out_dir))
    record(params, report, adapter_dir, out_dir)


if __name__ == "__main__":
    run_main(main)
