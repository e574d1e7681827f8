"""The merged model (stage `export`): what its folder must carry to answer like the fine-tuned
model outside this pipeline, and the parity gate that checks it does.

- The chat template: with `format.style: instruction` the model was trained on our own prompt
  (titletune.prompt, as tokenize-format wrote it into data/formatted), not on the base tokenizer's
  chat template; the merged folder gets a chat template that writes exactly that prompt, so
  `tokenizer.apply_chat_template` gives the training prompt. With `chat` the tokenizer's own
  template was the training format and is kept.
- generation_config.json: its eos_token_id includes the EOS every training completion ended with
  (the tokenizer's), and pad_token_id is set, so `generate()` stops on it without arguments.
- Parity: greedy answers and per-token NLL of the merged model against base + adapter, computed
  with titletune.generation.engine's own generate / reference_nll (parity_scores) and compared
  here (compare, pure). The GGUF export (titletune.export.gguf) scores models/merged the same way.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from titletune.cli import UserError
from titletune.generation.engine import generate, prompt_ids, reference_nll, until_eos


def _jinja_string(text: str) -> str:
    """A Jinja string literal for any text (Jinja decodes literals with Python's unicode-escape)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def prompt_pieces(examples, what: str = "a chat template for the merged model") -> tuple[str, str]:
    """The training prompt's text before and after the question (each example's `prompt` is its
    `question` inside one fixed text), checked on every example given."""
    first = examples[0]
    at = first["prompt"].find(first["question"])
    prefix, suffix = first["prompt"][:at], first["prompt"][at + len(first["question"]):]
    if at < 0 or any(prefix + ex["question"] + suffix != ex["prompt"] for ex in examples):
        raise UserError(f"data/formatted: the prompts are not one text around the question; cannot write {what}")
    return prefix, suffix


def adds_bos(tokenizer, examples) -> bool:
    """Whether the training prompts' token ids start with a BOS that their text does not hold (the
    tokenizer added it, as Llama's does): a template of the text alone must add it back."""
    first = examples[0]
    return tokenizer.bos_token_id is not None and first["input_ids"][0] == tokenizer.bos_token_id \
        and not first["prompt"].startswith(tokenizer.bos_token)


def training_chat_template(tokenizer, examples) -> str:
    """A chat template that renders one user message as the prompt the training examples were
    formatted with (prompt_pieces; the BOS too where their token ids start with it:
    apply_chat_template adds no special tokens itself), and an assistant message as its text +
    EOS, like a training completion."""
    prefix, suffix = prompt_pieces(examples)
    bos = adds_bos(tokenizer, examples)
    return (("{{ bos_token }}" if bos else "") + "{% for message in messages %}"
            "{% if message['role'] == 'user' %}"
            f"{{{{ {_jinja_string(prefix)} }}}}{{{{ message['content'] }}}}{{{{ {_jinja_string(suffix)} }}}}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
            "{% endif %}{% endfor %}")


def set_chat_template(tokenizer, style: str, examples) -> None:
    """The training prompt as the tokenizer's chat template (style instruction); chat: unchanged."""
    if style == "instruction":
        tokenizer.chat_template = training_chat_template(tokenizer, examples)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.save_pretrained, plus the SentencePiece model the tokenizer was converted from
    (Llama 2's, Mistral's, the tiny model's): transformers 5 writes tokenizer.json alone, and
    llama.cpp's converter reads tokenizer.model for such a tokenizer (its merge scores)."""
    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and source.endswith(".model") and Path(source).is_file():
        shutil.copy(source, Path(folder) / "tokenizer.model")


def set_generation_eos(generation_config, tokenizer) -> None:
    """Make generate() stop where training completions stopped: the tokenizer's EOS among
    eos_token_id (kept first, with the base model's own end tokens after it), pad_token_id set."""
    eos = generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if generation_config.bos_token_id is None and tokenizer.bos_token_id is not None:
        generation_config.bos_token_id = tokenizer.bos_token_id


def parity_scores(model, tokenizer, examples, export, eos_ids: set[int], name: str) -> dict:
    """Greedy answer ids (cut at EOS) and the mean NLL per reference token, per example, of a
    transformers model (export's params: parity_max_new_tokens)."""
    pad = tokenizer.pad_token_id
    new_ids = generate(model, prompt_ids(examples), pad_token_id=pad, eos_ids=eos_ids, batch_size=len(examples),
                       desc=f"{name}: generating", max_new_tokens=export.parity_max_new_tokens)
    nll = []
    for i in range(len(examples)):  # one example at a time: its own mean
        total, n = reference_nll(model, examples.select([i]), pad_token_id=pad, batch_size=1, progress=False)
        nll.append(total / n)
    return {"answers": [until_eos(ids, eos_ids) for ids in new_ids], "nll": nll}


def token_mismatch(reference: list[list[int]], other: list[list[int]]) -> tuple[int, int]:
    """(answer tokens not reproduced, answer tokens) of `other` against `reference`, answer by
    answer over the longer of the two: greedy decoding takes another path after the first token
    that differs, so every position from there on counts as not reproduced."""
    missed = total = 0
    for ref, oth in zip(reference, other, strict=True):
        common = next((i for i, (a, b) in enumerate(zip(ref, oth)) if a != b), min(len(ref), len(oth)))
        n = max(len(ref), len(oth))
        missed, total = missed + n - common, total + n
    return missed, total


def compare(reference: dict, merged: dict, names: tuple[str, str] = ("adapter", "merged")) -> dict:
    """Parity of the merged model against base + adapter (or of any model against a reference:
    `names` name their mean NLLs). Each argument: {"answers": token ids per example (cut at EOS),
    "nll": mean NLL per reference token, per example}."""
    missed, total = token_mismatch(reference["answers"], merged["answers"])
    diffs = [abs(a - b) for a, b in zip(reference["nll"], merged["nll"], strict=True)]
    return {
        "samples": len(diffs),
        "answers_identical": sum(a == b for a, b in zip(reference["answers"], merged["answers"])),
        "answer_tokens": total,
        "token_mismatch": missed / total if total else 0.0,
        "nll_max_abs_diff": math.nan if any(map(math.isnan, diffs)) else max(diffs, default=0.0),
        f"nll_mean_{names[0]}": sum(reference["nll"]) / len(diffs) if diffs else 0.0,
        f"nll_mean_{names[1]}": sum(merged["nll"]) / len(diffs) if diffs else 0.0,
    }


def parity_problems(result: dict, export) -> list[str]:
    """What exceeds the tolerances in params' export section (empty: the merged model passes).
    `not <=`: a NaN score (an overflow in 16 bits) fails too."""
    problems = []
    if not result["token_mismatch"] <= export.parity_max_token_mismatch:
        problems.append(f"greedy token mismatch {result['token_mismatch']:.4g} > export.parity_max_token_mismatch "
                        f"{export.parity_max_token_mismatch:g} ({result['samples'] - result['answers_identical']} "
                        f"of {result['samples']} answers differ)")
    if not result["nll_max_abs_diff"] <= export.parity_max_nll_diff:
        problems.append(f"per-token NLL differs by up to {result['nll_max_abs_diff']:.4g} nats > "
                        f"export.parity_max_nll_diff {export.parity_max_nll_diff:g}")
    return problems
