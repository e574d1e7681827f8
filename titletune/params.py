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
import string
from pathlib import Path
from typing import Annotated, Literal, Union

import regex
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from titletune.cli import UserError, command_line, run_main

PARAMS_FILE = Path("params.yaml")  # relative to the repository root, where DVC runs the stages
# format.max_chars: auto: more characters than a token of any tokenizer spans on average (about 4
# for English with Llama's), so the cut falls far beyond format.max_length tokens.
CHARS_PER_TOKEN = 16
MAX_SEED = 2**32 - 1
MAX_LENGTH = 2**20
# The widest hidden size of released LLMs (Llama 3.1 405B): no model has room for a larger LoRA rank.
MAX_LORA_R = 16384
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
    # .nan and .inf are YAML floats: no range holds them (an infinite weight decay trains to NaN).
    return Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False, **bounds), Allowed(allowed)]


def whole(allowed: str, **bounds):
    return Annotated[int, Field(**bounds), Allowed(allowed)]


def _regex(pattern: str) -> str:
    try:  # as titletune.data.cleaning compiles it
        regex.compile(pattern, regex.IGNORECASE)
    except regex.error as err:
        raise ValueError(f"must be a valid regular expression: {err}") from None
    return pattern


def _unique(items: list) -> list:
    if len(set(items)) != len(items):
        raise ValueError("must not repeat an item")
    return items


def _question(question: str) -> str:
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(question)
                  if name is not None]
    except ValueError as err:
        raise ValueError(f"must be a question with {{title}} ({err})") from None
    if {name for name, _, _ in fields} != {"title"}:
        raise ValueError("must contain {title} and no other {...} placeholder")
    # str.format runs a spec: {title:>200000000} pads to 200 MB, {title:{title}} fails on every title.
    if any(spec or conversion for _, spec, conversion in fields):
        raise ValueError("must write the title as a bare {title}, without a format spec or conversion")
    return question


Flag = Annotated[bool, Allowed("true or false")]
Text = Annotated[str, Field(min_length=1), Allowed("a non-empty string")]
Count = whole("a whole number >= 0", ge=0)
Size = whole("a whole number >= 1", ge=1)
Fraction = number("a number in [0, 1)", ge=0, lt=1)
Positive = number("a number > 0", gt=0)
AutoOrCount = Annotated[Union[Literal["auto"], Annotated[int, Field(ge=0)]], Allowed("auto or a whole number >= 0")]
AutoOrSize = Annotated[Union[Literal["auto"], Annotated[int, Field(ge=1)]], Allowed("auto or a whole number >= 1")]


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
    # It becomes the models' max_seq_length: 2**20 tokens is more context than any released model has.
    max_length: whole(f"a whole number in [1, {MAX_LENGTH}]", ge=1, le=MAX_LENGTH)
    # Characters of a title or a description kept before tokenising (auto: CHARS_PER_TOKEN x max_length).
    max_chars: AutoOrSize
    questions: Annotated[list[Annotated[str, AfterValidator(_question)]], Field(min_length=1),
                         Allowed("a list of at least one question, each with {title}")]

    def text_cap(self) -> int:
        """max_chars as a number: auto keeps far more characters than max_length tokens hold."""
        return CHARS_PER_TOKEN * self.max_length if self.max_chars == "auto" else self.max_chars


class Train(Section):
    gpus: AutoOrCount
    seed: whole(f"a whole number in [0, {MAX_SEED}]", ge=0, le=MAX_SEED)  # numpy's seeds are 32-bit
    # At most MAX_LORA_R here; train also refuses a rank above the model's hidden size (full rank).
    lora_r: whole(f"a whole number in [1, {MAX_LORA_R}]", ge=1, le=MAX_LORA_R)
    lora_alpha: Size
    lora_dropout: Fraction
    target_modules: Annotated[list[Text], Field(min_length=1), Allowed("a list of module names")]
    gradient_checkpointing: Annotated[Union[bool, Literal["unsloth"]], Allowed("false, true or unsloth")]
    # auto: a token budget on a GPU, examples per step on a CPU; 0: per_device_train_batch_size examples
    # a step; N: packed rows of at most N tokens (titletune.training.batching).
    tokens_per_step: AutoOrCount
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
    # The generation engine's slots (sequences decoded together); auto: as many as fit in 60 % of
    # free GPU memory (up to 512), 64 on a CPU.
    batch_size: AutoOrSize
    max_new_tokens: Size
    do_sample: Flag
    # Logits are divided by it: 1e-300 is 0 in float32 and every probability NaN. Below 0.01 sampling
    # is greedy decoding anyway (do_sample: false).
    temperature: number("a number >= 0.01 (for greedy answers set do_sample: false)", ge=0.01)
    top_p: number("a number in (0, 1]", gt=0, le=1)
    require_improvement: Flag
    # MLflow model registry: each evaluated adapter is a version of this registered model; "" = none.
    registered_model: Annotated[str, Field(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$"),
                                Allowed("a name of letters, digits, '.', '_' and '-', or empty (no registry)")]

    def slots(self) -> int | None:
        """batch_size as the engine takes it: None (auto) lets it size itself."""
        return None if self.batch_size == "auto" else self.batch_size


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


class Predict(Section):
    # scripts/predict.py (not a pipeline stage): its share of work and of GPUs.
    chunk_rows: Size  # rows per part file: the unit of resuming and of the data-parallel split
    gpus: AutoOrCount  # auto: every visible GPU


class Params(Section):
    data: Data
    preprocess: Preprocess
    model: Model
    format: Format
    train: Train
    evaluate: Evaluate
    export: Export
    predict: Predict


def load_params(*sections: str, path: Path | str = PARAMS_FILE):
    """Check the whole params file; return the section asked for, or a tuple of several."""
    params = read_params(path)
    picked = tuple(getattr(params, s) for s in sections)
    return picked[0] if len(picked) == 1 else picked


def read_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stages from the repository root)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
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


def read_yaml(path: Path):
    """The YAML file's data. A key given twice in one mapping is an error naming both lines (PyYAML
    keeps the last one silently, DVC refuses the file); so is an alias (`*name`): a params file
    needs none, and nested ones expand exponentially ("billion laughs")."""
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(path, node, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_nodes(path: Path, node, keys: tuple, seen: set) -> None:
    """No node twice (an alias), no key twice in a mapping."""
    if id(node) in seen:
        raise UserError(f"{path.name}: {'.'.join(map(str, keys)) or 'the file'}: a YAML alias (*name) refers to "
                        f"line {node.start_mark.line + 1}; write the value out")
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key, value in node.value:
            where = ".".join(map(str, (*keys, key.value)))
            if key.value in lines:
                raise UserError(f"{path.name}: line {key.start_mark.line + 1}: {where}: duplicate key "
                                f"(also at line {lines[key.value]}); keep one")
            lines[key.value] = key.start_mark.line + 1
            _check_nodes(path, key, keys, seen)
            _check_nodes(path, value, (*keys, key.value), seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_nodes(path, item, (*keys, index), seen)


def _hint(name, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(problem: dict) -> str:
    """One pydantic error as `key: value is not allowed (must be ...)`."""
    # params.yaml is two levels deep: loc is (section, key, then list indexes and whatever pydantic
    # adds for the member of a union that failed, "int" or "literal['auto']": not part of the key).
    loc = problem["loc"]
    section = loc[0]
    names = [str(p) for p in loc[:2]]
    key = ".".join(names) + "".join(f"[{p}]" for p in loc[2:] if isinstance(p, int))
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


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def main() -> None:
    """Check a params file whole (params.yaml by default); one line either way."""
    (path,) = command_line("[PARAMS_YAML]")
    path = path or PARAMS_FILE
    read_params(path)
    print(f"{path}: OK (sections {', '.join(Params.model_fields)})")


if __name__ == "__main__":
    run_main(main)
