"""Stage `gguf`: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, with an Ollama
Modelfile, after checking that each file answers like models/merged (the GGUF parity gate).

    python stages/gguf.py data/formatted models/adapter models/merged models/gguf metrics/gguf.json

Reads params `export` (gguf: the types; the gguf_* tolerances; parity_samples and
parity_max_new_tokens, shared with export's gate), `format.style` and `evaluate` (the Modelfile's
settings, and the registered model); writes models/gguf (titletune-<type>.gguf for each type of
export.gguf, and a Modelfile whose FROM is the first) and metrics/gguf.json (a section per type).

llama.cpp comes from the pinned llama-cpp-python (`make gguf` installs it: titletune.export.gguf).
On the first export.parity_samples test examples, models/merged (through transformers) and each
GGUF (through llama.cpp, from the same token ids) answer greedily and score the reference answers;
the file's metadata is checked too (chat template, the tokens it stops on, the tokenizer). A type
beyond its tolerances fails the stage with one line: models/gguf is not written (nor changed);
models/merged and models/adapter are only read (the adapter names its registry version). With export.register_gguf the files go to MLflow
beside the adapter's registry version (titletune.tracking.register_gguf).
"""
from __future__ import annotations

import sys
from pathlib import Path

from titletune.cli import UserError, atomic_path, run_main, write_json
from titletune.export import gguf
from titletune.export.merge import compare, parity_scores, prompt_pieces
from titletune.generation.engine import eos_token_ids
from titletune.modeling import load_formatted
from titletune.params import load_params
from titletune.splits import select_examples
from titletune.tracking import register_gguf


def main() -> None:
    data_dir, adapter_dir, merged_dir, out_dir, report_path = map(Path, sys.argv[1:6])
    export, fmt, evaluate = load_params("export", "format", "evaluate")
    if not export.gguf:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
        write_json(report_path, {"types": {}})
        print(f"gguf: no GGUF files (export.gguf is empty); {out_dir} is empty")
        return
    gguf.converter()  # llama.cpp installed? (one line with the install command if not)
    if not (merged_dir / "config.json").is_file():
        raise UserError(f"{merged_dir}: no merged model; run `dvc repro export` first")

    data = load_formatted(data_dir)
    examples = select_examples(data["test"], export.parity_samples)
    if len(examples) == 0:
        raise UserError(f"{data_dir}: the test split is empty (or export.parity_samples is 0): the GGUF gate "
                        "needs test examples; raise preprocess.test_fraction")
    # The reference: models/merged as users load it, plain transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").eval()
    eos_ids = eos_token_ids(model, tokenizer)
    reference = parity_scores(model, tokenizer, examples, export, eos_ids, "merged (transformers)")
    del model
    prefix, suffix = prompt_pieces(examples, "an Ollama Modelfile")

    n_ctx = max(len(ids) for ids in examples["input_ids"]) + export.parity_max_new_tokens
    report, problems = {"llama_cpp_python": gguf.LLAMA_CPP_PYTHON, "samples": len(examples), "types": {}}, []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        converted = gguf.convert(merged_dir, tmp, export.gguf)
        for gguf_type in export.gguf:
            path = tmp / gguf.file_name(gguf_type)
            llm = gguf.load(path, n_ctx)
            metadata, type_problems = gguf.metadata_problems(llm, tokenizer.chat_template, eos_ids, examples, fmt.style)
            result = compare(reference, gguf.llama_scores(llm, examples, export.parity_max_new_tokens, eos_ids,
                                                          gguf_type), names=("hf", "gguf"))
            del llm
            keys = (("gguf_q4_min_identical", "gguf_q4_max_nll_diff") if gguf_type in gguf.QUANTIZED
                    else ("gguf_min_identical", "gguf_max_nll_diff"))
            type_problems += gguf.gate_problems(result, getattr(export, keys[0]), getattr(export, keys[1]), keys)
            report["types"][gguf_type] = {"file": path.name, "size_mb": gguf.size_mb(path), **converted[gguf_type],
                                          **metadata, **result, "passed": not type_problems}
            problems += [f"{gguf_type}: {p}" for p in type_problems]
        stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(eos_ids)]
        (tmp / "Modelfile").write_text(gguf.modelfile(gguf.file_name(export.gguf[0]), gguf.strip_bos(
            prefix, tokenizer.bos_token), suffix, stops, evaluate), encoding="utf-8")
        report["passed"] = not problems
        write_json(report_path, report)
        if problems:
            raise UserError(f"the GGUF files do not answer like {merged_dir} on {len(examples)} test examples: "
                            f"{'; '.join(problems)}. {out_dir} was not written; {report_path} has the figures "
                            "(relax export.gguf_* in params.yaml if the difference is acceptable)")
    summary = ", ".join(f"{t} {r['size_mb']:g} MB ({r['answers_identical']}/{r['samples']} identical answers, "
                        f"NLL within {r['nll_max_abs_diff']:.2g})" for t, r in report["types"].items())
    print(f"gguf: {summary} in {out_dir}, with an Ollama Modelfile (FROM {gguf.file_name(export.gguf[0])}); "
          f"metadata and tokenizer match {merged_dir}")
    if export.register_gguf and evaluate.registered_model:
        version = register_gguf(evaluate.registered_model, adapter_dir, out_dir, report)
        print(f"gguf: MLflow model registry: {evaluate.registered_model} version {version.version} has the GGUF "
              f"files (artifact `gguf` of run {version.run_id})")


if __name__ == "__main__":
    run_main(main)
