"""GGUF files of the merged model for llama.cpp, Ollama and LM Studio (stage `gguf`), checked
against the model they came from.

- Conversion: llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion/` package and its own
  `gguf-py`, taken from the pinned llama-cpp-python sdist by `make gguf`: converter()) writes
  f16, bf16 and q8_0; q4_k_m is quantized from an f16 file by llama.cpp's quantizer, through
  llama-cpp-python's binding. The tokenizer, the chat template of models/merged (the training
  prompt: titletune.export.merge) and the EOS go into the file's metadata.
- Metadata checks (metadata_problems): the chat template is models/merged's, the tokens llama.cpp
  ends generation on are the HF model's EOS ids (else a llama.cpp or Ollama answer never stops or
  stops early), the tokenizer has a pre-tokenizer llama.cpp knows, and llama.cpp tokenizes the
  training prompts of the gate into the token ids training saw.
- The parity gate (gate_problems): greedy answers and the reference answers' per-token NLL of
  each GGUF (llama_cpp.Llama, same prompt ids) against models/merged through transformers
  (titletune.export.merge.parity_scores), compared by titletune.export.merge.compare.
- The Ollama Modelfile (modelfile): a TEMPLATE that writes exactly the training prompt, a stop for
  every EOS, evaluate's generation settings.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from titletune.cli import UserError

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release pinned in pyproject.toml's `gguf` extra
INSTALL = "make gguf"  # installs llama-cpp-python and the converter, then runs the stage
# Where `make gguf` puts the sdist's converter tree: inside the venv, beside the package it came with.
TOOLS = Path(os.environ.get("TITLETUNE_LLAMA_CPP", Path(sys.prefix) / "share" / "llama.cpp"))
# Types the converter writes itself; any other is quantized from an f16 file (llama.cpp's ftype names).
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def file_name(gguf_type: str) -> str:
    return f"titletune-{gguf_type}.gguf"


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, after checking that llama-cpp-python is the pinned one."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"llama.cpp is not installed (llama-cpp-python {LLAMA_CPP_PYTHON}): run `{INSTALL}`") from None
    script = TOOLS / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"llama.cpp's converter is not installed ({script} is missing): run `{INSTALL}`")
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} is installed, the converter is "
                        f"{LLAMA_CPP_PYTHON}'s: run `{INSTALL}`")
    return script


def convert(merged_dir: Path, out_dir: Path, gguf_types: list[str]) -> dict[str, dict]:
    """Write out_dir/titletune-<type>.gguf for each type; per type, the seconds it took (and for a
    quantized one, the tensors kept wider). A q4_k_m file is quantized from the f16 one (written
    for it and removed after, unless f16 is asked for)."""
    script = converter()
    done = {}
    needed = list(dict.fromkeys([t for t in gguf_types if t in CONVERTER_TYPES]
                                + ["f16" for t in gguf_types if t in QUANTIZED]))
    for gguf_type in tqdm(needed + [t for t in gguf_types if t in QUANTIZED], desc="gguf: converting", unit="file"):
        start = time.perf_counter()
        if gguf_type in CONVERTER_TYPES:
            run_converter(script, merged_dir, out_dir / file_name(gguf_type), gguf_type)
            done[gguf_type] = {}
        else:
            fallback = quantize(out_dir / file_name("f16"), out_dir / file_name(gguf_type), QUANTIZED[gguf_type])
            done[gguf_type] = {"tensors_kept_wider": fallback}
        done[gguf_type]["convert_s"] = round(time.perf_counter() - start, 2)
    if "f16" not in gguf_types and "f16" in needed:
        (out_dir / file_name("f16")).unlink()
        done.pop("f16")
    return done


def run_converter(script: Path, merged_dir: Path, out_file: Path, gguf_type: str) -> None:
    """convert_hf_to_gguf.py in a subprocess (its imports, torch included, stay out of this one);
    a refusal becomes one line."""
    proc = subprocess.run([sys.executable, str(script), str(merged_dir), "--outfile", str(out_file),
                           "--outtype", gguf_type], capture_output=True, text=True)
    if proc.returncode == 0:
        return
    log = proc.stderr + proc.stdout
    if "pre-tokenizer was not recognized" in log:
        raise UserError(f"{merged_dir}: llama.cpp's converter does not know this tokenizer's pre-tokenizer "
                        f"(tokenizer.json: {tokenizer_description(merged_dir)}): llama.cpp knows a byte-level BPE "
                        "tokenizer only if it is one of the published models'; use such a base model, or one "
                        "with a SentencePiece tokenizer.model")
    last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
    raise UserError(f"{merged_dir}: llama.cpp's converter failed for {gguf_type} (exit {proc.returncode}): {last[0]}")


def tokenizer_description(model_dir: Path) -> str:
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        pre = (tok.get("pre_tokenizer") or {}).get("type", "none")
        return f"{tok['model']['type']} model, {pre} pre-tokenizer, {len(tok['model']['vocab']):,} tokens"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def quantize(source: Path, out_file: Path, ftype: str) -> int:
    """llama.cpp's quantizer (llama_model_quantize, what `llama-quantize` runs), every core; how
    many tensors it kept at a wider type than asked (a K-quant needs rows of 256: the tiny model's
    are 128 wide). Its per-tensor lines go to C's stderr: captured, not shown."""
    import ctypes
    import tempfile

    import llama_cpp
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile("w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = log.read().splitlines()
    if failed:
        raise UserError(f"{source}: llama.cpp's quantizer failed to write {out_file.name}: {(lines or ['no output'])[-1]}")
    return sum("falling back to" in line for line in lines)


def load(path: Path, n_ctx: int):
    """A GGUF through llama.cpp on CPU, keeping every position's logits (for the NLL)."""
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_gpu_layers=0,
                 n_threads=os.cpu_count(), seed=0, verbose=False)


def eog_ids(llm) -> set[int]:
    """Every token llama.cpp ends generation on (EOS, EOT and the like, from the GGUF's metadata)."""
    import llama_cpp
    vocab = llm._model.vocab  # the binding's handle of the loaded vocabulary
    return {t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def metadata_problems(llm, chat_template: str | None, eos_ids: set[int], examples, style: str) -> tuple[dict, list[str]]:
    """What the GGUF must carry to answer like the HF model outside this pipeline, and what it lacks."""
    meta = llm.metadata
    found = {"chat_template": meta.get("tokenizer.chat_template") == chat_template,
             "eog_ids": sorted(eog_ids(llm)), "tokenizer": meta.get("tokenizer.ggml.model"),
             "pre_tokenizer": meta.get("tokenizer.ggml.pre")}
    problems = []
    if chat_template and not found["chat_template"]:
        problems.append("the chat template is missing or not models/merged's")
    if set(found["eog_ids"]) != eos_ids:
        problems.append(f"llama.cpp ends answers on token ids {found['eog_ids']}, models/merged on {sorted(eos_ids)}")
    # SentencePiece ("llama") needs none; a byte-level BPE ("gpt2") with no known pre-tokenizer
    # falls back to "default", another split than the model's.
    if found["pre_tokenizer"] is None or (found["tokenizer"] == "gpt2" and found["pre_tokenizer"] == "default"):
        problems.append(f"no known pre-tokenizer (tokenizer.ggml.pre {found['pre_tokenizer']!r})")
    # Ollama and the server tokenize the prompt text themselves: it must give the ids training saw.
    from titletune.generation.engine import prompt_ids
    differ = [i for i, (text, ids) in enumerate(zip(examples["prompt"], prompt_ids(examples)))
              if llm.tokenize(text.encode("utf-8"), add_bos=style == "instruction", special=style == "chat") != ids]
    found["prompts_tokenized_alike"] = len(examples) - len(differ)
    if differ:
        problems.append(f"llama.cpp tokenizes {len(differ)} of {len(examples)} training prompts otherwise than "
                        f"transformers (first: {examples['prompt'][differ[0]]!r})")
    return found, problems


def llama_scores(llm, examples, max_new_tokens: int, eos_ids: set[int], name: str) -> dict:
    """Greedy answer ids (cut at EOS) and the mean NLL per reference token, per example, through
    llama.cpp, from the same token ids as the HF side (titletune.export.merge.parity_scores)."""
    import numpy as np
    import torch

    from titletune.generation.engine import prompt_ids
    from titletune.generation.metrics import completion_nll
    answers, nll = [], []
    for prompt, ids, mask in tqdm(list(zip(prompt_ids(examples), examples["input_ids"], examples["completion_mask"])),
                                  desc=f"{name}: scoring", unit="example"):
        answer = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in eos_ids or len(answer) == max_new_tokens:
                break
            answer.append(token)
        answers.append(answer)
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[:len(ids)]))
        total, n = completion_nll(logits[None], torch.tensor([ids]), torch.tensor([mask]))
        nll.append(total / n)
    return {"answers": answers, "nll": nll}


def gate_problems(result: dict, min_identical: float, max_nll_diff: float, keys: tuple[str, str]) -> list[str]:
    """What exceeds the tolerances (params export.<keys>); `not <=` fails a NaN too."""
    problems = []
    needed = math.ceil(min_identical * result["samples"] - 1e-9)
    if result["answers_identical"] < needed:
        problems.append(f"{result['answers_identical']} of {result['samples']} greedy answers identical "
                        f"(export.{keys[0]} {min_identical:g}: {needed} needed)")
    if not result["nll_max_abs_diff"] <= max_nll_diff:
        problems.append(f"per-token NLL differs by up to {result['nll_max_abs_diff']:.4g} nats > "
                        f"export.{keys[1]} {max_nll_diff:g}")
    return problems


# ---------------------------------------------------------------- Ollama

def go_template_text(text: str) -> str:
    """Text in a Go template (Ollama's TEMPLATE) as itself: literal where it can be, else a string
    action (`{{ "..." }}`, JSON escapes: Go's are the same for these)."""
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def modelfile(gguf_file: str, prefix: str, suffix: str, stops: list[str], evaluate) -> str:
    """An Ollama Modelfile: the GGUF, the training prompt around the user's message (Ollama adds the
    BOS itself, as the tokenizer did in training), a stop for every EOS, evaluate's settings
    (greedy: temperature 0; no repetition penalty; num_predict: max_new_tokens)."""
    lines = [f"FROM ./{gguf_file}",
             f'TEMPLATE """{go_template_text(prefix)}{{{{ .Prompt }}}}{go_template_text(suffix)}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += [f"PARAMETER temperature {evaluate.temperature if evaluate.do_sample else 0:g}",
              f"PARAMETER top_p {evaluate.top_p:g}",
              "PARAMETER repeat_penalty 1",  # none in evaluate (Ollama's default is 1.1)
              f"PARAMETER num_predict {evaluate.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def strip_bos(prefix: str, bos_token: str | None) -> str:
    """A chat template's prompt text starts with the BOS string; Ollama and llama.cpp add the BOS
    token themselves (the GGUF says add_bos_token): leave it out of the TEMPLATE."""
    return prefix[len(bos_token):] if bos_token and prefix.startswith(bos_token) else prefix


def size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)

