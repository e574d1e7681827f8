"""What the stages truly share: params, the prompt template, model loading, atomic writes.

Everything else lives in the stage that uses it.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"


class UserError(Exception):
    """A problem the user can fix (bad input, bad params). Stages print it without a traceback."""


def run_main(main) -> None:
    """Run a stage's main(); a UserError becomes one clear line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- params

# The type of every key in params.yaml. "float" accepts ints and numeric strings (YAML 1.1
# reads 1e-4 as a string); "int|auto" accepts an int or the word auto.
SCHEMA: dict[str, dict[str, str]] = {
    "data": {"source": "str"},
    "preprocess": {
        "min_title_chars": "int", "min_content_chars": "int", "boilerplate_patterns": "list[str]",
        "dedupe": "bool", "val_fraction": "float", "test_fraction": "float", "split_salt": "str",
        "max_records": "int", "max_bad_fraction": "float",
    },
    "model": {"name": "str", "load_in_4bit": "bool", "trust_remote_code": "bool"},
    "format": {"style": "str", "max_length": "int", "questions": "list[str]"},
    "train": {
        "gpus": "int|auto", "seed": "int", "lora_r": "int", "lora_alpha": "int",
        "lora_dropout": "float", "target_modules": "list[str]", "gradient_checkpointing": "bool|str",
        "batch_size": "int", "grad_accum": "int", "learning_rate": "float", "lr_scheduler": "str",
        "warmup_ratio": "float", "weight_decay": "float", "optimizer": "str", "max_steps": "int",
        "epochs": "float", "packing": "bool", "padding_free": "bool", "eval_steps": "int",
        "logging_steps": "int", "save_steps": "int", "save_total_limit": "int",
    },
    "evaluate": {
        "max_samples": "int", "batch_size": "int", "max_new_tokens": "int", "do_sample": "bool",
        "temperature": "float", "top_p": "float", "require_improvement": "bool",
    },
    "export": {"dtype": "str"},
}


def _check_value(where: str, kind: str, value):
    """Return value coerced to kind, or raise UserError naming the key."""
    def bad():
        return UserError(f"{PARAMS_FILE.name}: {where}: expected {kind}, got "
                         f"{type(value).__name__} {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if kind == "float":
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if kind == "int|auto":
        return value if value == "auto" else _check_value(where, "int", value)
    if kind == "bool|str":
        if not isinstance(value, (bool, str)):
            raise bad()
        return value
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        return value
    raise AssertionError(kind)


def load_params(*sections: str, path: Path | str = PARAMS_FILE) -> dict:
    """Read and type-check the given sections of params.yaml.

    Returns {section: {key: value}}, or one section's dict when one is asked for.
    Unknown, missing and wrongly typed keys are errors that name the key.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    unknown_sections = set(raw) - set(SCHEMA)
    if unknown_sections:
        raise UserError(f"{path.name}: unknown section(s) {sorted(unknown_sections)}; "
                        f"expected {sorted(SCHEMA)}")
    out = {}
    for section in sections:
        schema = SCHEMA[section]
        values = raw.get(section)
        if not isinstance(values, dict):
            raise UserError(f"{path.name}: section '{section}' is missing or not a mapping")
        for key in values:
            if key not in schema:
                hint = difflib.get_close_matches(key, schema, n=1)
                raise UserError(f"{path.name}: {section}.{key}: unknown key"
                                + (f" (did you mean {hint[0]}?)" if hint else ""))
        for key, kind in schema.items():
            if key not in values:
                raise UserError(f"{path.name}: {section}.{key}: missing")
        out[section] = {k: _check_value(f"{section}.{k}", schema[k], values[k]) for k in schema}
    return out[sections[0]] if len(sections) == 1 else out


# ---------------------------------------------------------------- atomic output

@contextlib.contextmanager
def atomic_path(final: Path | str):
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    Works for files and directories, so an interrupted stage never leaves a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- prompt template

# Our own wording for base models (the seed notebook used an Alpaca-style instruction).
INSTRUCTION_TEMPLATE = (
    "Below is a question about a product. Write a response that answers it.\n\n"
    "### Question:\n{question}\n\n### Response:\n"
)
STYLES = ("instruction", "chat")


def pick_question(questions: list[str], uid: str) -> str:
    """The question phrasing for a record: deterministic by uid, independent of order."""
    import zlib
    return questions[zlib.crc32(uid.encode("utf-8")) % len(questions)]


def build_prompt(tokenizer, question: str, style: str) -> str:
    """The text the model sees before its answer, for training, evaluation and `ask` alike."""
    if style == "instruction":
        return INSTRUCTION_TEMPLATE.format(question=question)
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("format.style is 'chat' but the tokenizer has no chat template; "
                            "use style: instruction for base models")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    raise UserError(f"format.style: expected one of {STYLES}, got {style!r}")


def encode_prompts(tokenizer, prompts, style: str, **kwargs):
    """Tokenise prompts from build_prompt as training does: the chat template writes its own BOS,
    the plain instruction template relies on the tokenizer adding it."""
    return tokenizer(prompts, add_special_tokens=style == "instruction", **kwargs)


# ---------------------------------------------------------------- model loading

def resolve_model_name(name: str) -> str:
    """A local folder (relative to the repo root) or a hub id. Fails fast when offline."""
    local = Path(name) if Path(name).is_absolute() else ROOT / name
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name: {local} has no config.json; not a Hugging Face model folder")
        return str(local)
    if name.startswith((".", "/", "models/")) or name.count("/") != 1:
        raise UserError(f"model.name: {name!r} is not a folder (looked in {local}) "
                        "and not a hub id of the form owner/name")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # downloaded before: loads from the local cache
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if offline or not _hub_reachable():
        raise UserError(f"model.name: {name!r} is a hub id, but the Hugging Face hub cannot be reached "
                        "(offline) and the model is not in the local cache. Download it on a connected "
                        "machine (`hf download NAME`) or point model.name at a local folder.")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(model_params: dict, max_seq_length: int, device_map=None):
    """Base model + tokenizer through Unsloth, as for training (the caller imported unsloth first).

    The same call serves the embedded tiny model and a hub model; safetensors only,
    remote code only when `model.trust_remote_code` says so.
    """
    import torch
    from unsloth import FastLanguageModel

    if model_params["load_in_4bit"] and not torch.cuda.is_available():
        raise UserError("model.load_in_4bit: 4-bit QLoRA needs a CUDA GPU; set it to false on CPU")
    extra = {"device_map": device_map} if device_map is not None else {}
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve_model_name(model_params["name"]),
        max_seq_length=max_seq_length,
        dtype=None,  # auto: bf16 where the GPU has it, else fp16 / fp32
        load_in_4bit=model_params["load_in_4bit"],
        trust_remote_code=model_params["trust_remote_code"],
        use_safetensors=True,
        **extra,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tuned_model(model_params: dict, max_seq_length: int, adapter_dir: Path | str):
    """Base model + the trained LoRA adapter (a PeftModel) + tokenizer, for evaluate, ask and export.

    `with model.disable_adapter():` gives the base model's answers from the same weights.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no trained adapter here; run `dvc repro` first "
                        "(the train stage writes it)")
    model, tokenizer = load_model(model_params, max_seq_length)
    from peft import PeftModel  # after load_model, which imported unsloth first
    # The base path inside adapter_config.json is where it was trained (maybe another machine):
    # the base comes from model.name instead.
    return PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer


def load_formatted(data_dir: Path | str):
    """The tokenize-format stage's DatasetDict, opened read-only for train, evaluate and benchmarks.

    data_dir is a DVC output: datasets' map/select would write cache-*.arrow files into it and
    change its hash (the next `dvc repro` would see tokenize-format as changed), so caching is
    turned off first and those files go to a temp dir instead.
    """
    from datasets import disable_caching, load_from_disk

    data_dir = Path(data_dir)
    if not (data_dir / "dataset_dict.json").is_file():
        raise UserError(f"{data_dir}: no formatted dataset; run `dvc repro` (tokenize-format) first")
    disable_caching()
    return load_from_disk(str(data_dir))


# ---------------------------------------------------------------- MLflow

def mlflow_setup():
    """Point MLflow at the team server named by MLFLOW_TRACKING_URI, else at a sqlite store in
    the repo (mlflow.db, git-ignored; `mlflow ui --backend-store-uri sqlite:///mlflow.db`)."""
    import mlflow
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "titletune"))
    return mlflow
