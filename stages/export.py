"""Stage `export`: merge the LoRA adapter into the base weights; save a plain Hugging Face model.

    python stages/export.py models/adapter models/merged

Reads params `model`, `format` (max_length) and `export`; writes models/merged (safetensors +
tokenizer), which loads with `AutoModelForCausalLM.from_pretrained("models/merged")`, without
PEFT or Unsloth, for serving or sharing. `export.dtype: auto` keeps the dtype base + adapter
computes in (titletune.modeling.compute_dtype: bf16 on GPUs that have it, else fp16; float32 on
every CPU), so the merged model's greedy answers are those of base + adapter. On CPU the tiny
random model's next-token scores are nearly tied: rounding its merged weights to fp16 changed 3
of 32 greedy 64-token answers, bf16 20. Set export.dtype to float16 or bfloat16 to force a
16-bit file from a CPU machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

from titletune.cli import atomic_path, run_main
from titletune.modeling import load_tuned_model
from titletune.params import load_params


def main() -> None:
    adapter_dir, out_dir = map(Path, sys.argv[1:3])
    model_params, fmt, export = load_params("model", "format", "export")
    # Merge into full-precision weights: merging into a 4-bit base would round the adapter away.
    model_params = model_params.model_copy(update={"load_in_4bit": False})
    model, tokenizer = load_tuned_model(model_params, fmt.max_length, adapter_dir)

    import torch  # after load_tuned_model, which imported unsloth first
    dtype = model.dtype if export.dtype == "auto" else getattr(torch, export.dtype)
    merged = model.merge_and_unload()  # W + (alpha/r)·B·A in the loaded dtype; a plain transformers model
    merged = merged.to(dtype)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in merged.parameters())
    print(f"export: {n_params / 1e6:,.1f} M parameters merged, {str(dtype).removeprefix('torch.')}, "
          f"in {out_dir} (AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    run_main(main)
