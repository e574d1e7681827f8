"""params.yaml as typed sections with ranges: one pydantic model per section.

`load_params("train")` checks the WHOLE file (a misspelled section or key anywhere is an error,
whichever stage reads it first) and returns the sections asked for, as frozen models
(`params.train.learning_rate`). A bad value stops the stage before any work with one line that
names the file, the key, the value and what is allowed:

    params.yaml: train.learning_rate: -1 is not allowed (must be a number > 0)

The train keys that become SFTConfig arguments carry SFTConfig's names (training.sft_config
passes them through); the others are ours (LoRA, gpus, `optim: auto`).

A stage checks the file only when it runs, and `dvc repro` runs a stage only when something it
depends on changed: a misspelled section (`trian:`) that no stage declares changes nothing, so
`dvc repro` runs nothing and says nothing. Check the whole file at any time with

    python -m titletune.params            # or: python -m titletune.params path/to/params.yaml
"""
from __future__ import annotations

import difflib
import json
import re
import string
import sys
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from titletune.cli import UserError, run_main

PARAMS_FILE = Path("params.yaml")  # relative to the repository root, where DVC runs the stages
# format.max_chars: auto: more characters than a token of any tokenizer spans on average (about 4
# for English with Llama's), so the cut falls far beyond format.max_length tokens.
CHARS_PER_TOKEN = 16
# train keys renamed after their SFTConfig arguments: named in the error for an old params file.
RENAMED = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
           "lr_scheduler": "lr_scheduler_type", "warmup_ratio": "warmup_steps", "optimizer": "optim",
           "epochs": "num_train_epochs"}


# The GGUF types the gguf stage writes: the converter's f16, bf16 and q8_0, and llama.cpp's 4-bit K-quant.
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")


class Allowed(str):
    """What a key accepts, in words: the end of its error message ("must be ...")."""


def _number(value):
    """YAML 1.1 reads 1e-4 as a string (`dvc exp run -S train.learning_rate=1e-4`): accept it."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def number(allowed: str, **bounds):
    return Annotated[float, BeforeValidator(_number), Field(**bounds), Allowed(allowed)]


def whole(allowed: str, **bounds):
    return Annotated[int, Field(**bounds), Allowed(allowed)]


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"must be a valid regular expression: {err}") from None
    return pattern


def _unique(items: list) -> list:
    if len(set(items)) != len(items):
        raise ValueError("must not repeat an item")
    return items


def _question(question: str) -> str:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(question) if name is not None}
    except ValueError as err:
        raise ValueError(f"must be a question with {{title}} ({err})") from None
    if "title" not in names or names != {"title"}:
        raise ValueError("must contain {title} and no other {...} placeholder")
    return question


Flag = Annotated[bool, Allowed("true or false")]
Text = Annotated[str, Field(min_length=1), Allowed("a non-empty string")]
Count = whole("a whole number >= 0", ge=0)
Size = whole("a whole number >= 1", ge=1)
Fraction = number("a number in [0, 1)", ge=0, lt=1)
Positive = number("a number > 0", gt=0)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Data(Section):
    source: Text  # .json.gz, .json (JSON lines) or the corpus .zip


class Preprocess(Section):
    min_title_chars: Count
    min_content_chars: Count
    boilerplate_patterns: Annotated[list[Annotated[str, AfterValidator(_regex)]],
                                    Allowed("a list of regular expressions")]
    dedupe: Flag
    val_fraction: Fraction
    test_fraction: Fraction
    split_salt: Annotated[str, Allowed("a string")]
    max_records: Count
    max_bad_fraction: number("a number in [0, 1]", ge=0, le=1)

    @model_validator(mode="after")
    def _room_for_train(self):
        total = self.val_fraction + self.test_fraction
        if total >= 1:
            raise ValueError(f"val_fraction + test_fraction: {total:g} is not allowed (must be < 1)")
        return self


class Model(Section):
    name: Text  # a local folder or a hub id (owner/name)
    load_in_4bit: Flag
    trust_remote_code: Flag


class Format(Section):
    style: Annotated[Literal["instruction", "chat"], Allowed("instruction or chat")]
    max_length: Size
    # Characters of a title or a description kept before tokenising (auto: CHARS_PER_TOKEN x max_length).
    max_chars: Annotated[Union[Literal["auto"], Annotated[int, Field(ge=1)]], Allowed("auto or a whole number >= 1")]
    questions: Annotated[list[Annotated[str, AfterValidator(_question)]], Field(min_length=1),
                         Allowed("a list of at least one question, each with {title}")]

    def text_cap(self) -> int:
        """max_chars as a number: auto keeps far more characters than max_length tokens hold."""
        return CHARS_PER_TOKEN * self.max_length if self.max_chars == "auto" else self.max_chars


class Train(Section):
    gpus: Annotated[Union[Literal["auto"], Annotated[int, Field(ge=0)]], Allowed("auto or a whole number >= 0")]
    seed: Count
    lora_r: Size
    lora_alpha: Size
    lora_dropout: Fraction
    target_modules: Annotated[list[Text], Field(min_length=1), Allowed("a list of module names")]
    gradient_checkpointing: Annotated[Union[bool, Literal["unsloth"]], Allowed("false, true or unsloth")]
    # 0: per_device_train_batch_size examples a step; N: packed rows of at most N tokens (titletune.training.batching).
    tokens_per_step: Count
    # N > 0: stop once the validation loss has not improved for N evaluations; keep the best checkpoint.
    early_stopping_patience: Count
    # Validation examples evaluated every eval_steps (a fixed sample, titletune.splits); 0 = all.
    val_samples: Count
    # SFTConfig's own names from here on (see training.sft_config).
    per_device_train_batch_size: Size
    gradient_accumulation_steps: Size
    learning_rate: Positive
    lr_scheduler_type: Text  # a transformers scheduler name; training checks it
    # A whole number of steps, or a fraction of all steps (transformers 5 reads a float in [0, 1) so).
    warmup_steps: Annotated[Union[Annotated[int, Field(ge=0)], Fraction],
                            Allowed("a whole number of steps >= 0, or a fraction of all steps in [0, 1)")]
    weight_decay: number("a number >= 0", ge=0)
    optim: Text  # auto (adamw_8bit on a GPU, adamw_torch on CPU) or a transformers optimizer name
    max_steps: Count  # 0: num_train_epochs decides
    num_train_epochs: Positive
    packing: Flag
    padding_free: Flag
    eval_steps: Size
    logging_steps: Size
    save_steps: Size
    save_total_limit: Size

    @model_validator(mode="after")
    def _best_step_has_a_checkpoint(self):
        # transformers keeps the best model only from steps it saved (load_best_model_at_end).
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps: {self.save_steps} is not allowed with early_stopping_patience "
                             f"{self.early_stopping_patience} (must be a multiple of eval_steps, {self.eval_steps}, "
                             "so that an evaluated step has a checkpoint to go back to)")
        return self


class Evaluate(Section):
    max_samples: Count  # 0 = all
    batch_size: Size
    max_new_tokens: Size
    do_sample: Flag
    temperature: Positive
    top_p: number("a number in (0, 1]", gt=0, le=1)
    require_improvement: Flag
    # MLflow model registry: each evaluated adapter is a version of this registered model; "" = none.
    registered_model: Annotated[str, Field(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$"),
                                Allowed("a name of letters, digits, '.', '_' and '-', or empty (no registry)")]


class Export(Section):
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"],
                     Allowed("auto, bfloat16, float16 or float32")]
    # The parity gate (titletune.export.merge): the merged model against base + adapter.
    parity_samples: Count  # test examples re-scored; 0 = no gate
    parity_max_new_tokens: Size
    parity_max_token_mismatch: number("a number in [0, 1]", ge=0, le=1)
    parity_max_nll_diff: number("a number >= 0", ge=0)
    register_merged: Flag  # log models/merged to MLflow with the adapter's registry version
    # GGUF files (stage gguf, titletune.export.gguf); [] = none. The first is the Modelfile's.
    gguf: Annotated[list[Literal[GGUF_TYPES]], AfterValidator(_unique),
                    Allowed(f"a list of GGUF types, each one of {', '.join(GGUF_TYPES)} (or [] for none)")]
    gguf_min_identical: number("a number in [0, 1]", ge=0, le=1)  # share of identical greedy answers
    gguf_max_nll_diff: number("a number >= 0", ge=0)
    gguf_q4_min_identical: number("a number in [0, 1]", ge=0, le=1)  # the same for q4_k_m
    gguf_q4_max_nll_diff: number("a number >= 0", ge=0)
    register_gguf: Flag  # log models/gguf to MLflow with the adapter's registry version


class Params(Section):
    data: Data
    preprocess: Preprocess
    model: Model
    format: Format
    train: Train
    evaluate: Evaluate
    export: Export


def load_params(*sections: str, path: Path | str = PARAMS_FILE):
    """Check the whole params file; return the section asked for, or a tuple of several."""
    params = read_params(path)
    picked = tuple(getattr(params, s) for s in sections)
    return picked[0] if len(picked) == 1 else picked


def read_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stages from the repository root)") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path.name}: expected sections ({', '.join(Params.model_fields)}), "
                        f"got {type(raw).__name__}")
    for name in raw:
        if name not in Params.model_fields:
            raise UserError(f"{path.name}: {name}: unknown section{_hint(name, Params.model_fields)}; "
                            f"the sections are {', '.join(Params.model_fields)}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        # One line per key (a union reports each of its members), the first of them in the message,
        # unknown keys first: `lerning_rate` is more to the point than `learning_rate: missing`.
        problems = sorted(err.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
        lines = list(dict.fromkeys(_describe(problem) for problem in problems))
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UserError(f"{path.name}: {lines[0]}{more}") from None


def _hint(name, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(problem: dict) -> str:
    """One pydantic error as `key: value is not allowed (must be ...)`."""
    # Union members add their own entries to loc ("literal['auto']", "int"): keep the path.
    loc = [p for p in problem["loc"] if isinstance(p, int) or not _member_tag(p)]
    section = loc[0]
    names = [str(p) for p in loc if isinstance(p, str)]
    key = ".".join(names) + "".join(f"[{p}]" for p in loc if isinstance(p, int))
    fields = Params.model_fields[section].annotation.model_fields
    kind = problem["type"]
    if kind == "missing":
        return f"{key}: missing"
    if kind == "extra_forbidden":
        if section == "train" and names[-1] in RENAMED:
            return f"{key}: unknown key (renamed {RENAMED[names[-1]]})"
        return f"{key}: unknown key{_hint(names[-1], fields)}"
    if len(names) == 1:  # the section itself
        if kind == "value_error":
            return f"{section}.{problem['ctx']['error']}"
        return f"{section}: expected a mapping of keys, got {_show(problem['input'])}"
    if kind == "value_error" and "must" in str(problem["ctx"]["error"]):
        return f"{key}: {_show(problem['input'])} is not allowed ({problem['ctx']['error']})"
    allowed = next(m for m in fields[names[1]].metadata if isinstance(m, Allowed))
    return f"{key}: {_show(problem['input'])} is not allowed (must be {allowed})"


def _member_tag(part: str) -> bool:
    return part in ("int", "float", "bool", "str") or part.startswith(("literal[", "constrained-",
                                                                       "function-"))


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def main() -> None:
    """Check a params file whole (params.yaml by default); one line either way."""
    if len(sys.argv) > 2:
        raise UserError("usage: python -m titletune.params [PARAMS_YAML]")
    path = Path(sys.argv[1]) if len(sys.argv) == 2 else PARAMS_FILE
    read_params(path)
    print(f"{path}: OK (sections {', '.join(Params.model_fields)})")


if __name__ == "__main__":
    run_main(main)
