"""Models and tokenizers: where they come from, how they load, in which dtype.

Unsloth must be imported before transformers, TRL and PEFT: it patches them (and with Unsloth
installed but not imported, TRL fails on CPU). `unsloth()` is that first import; every loader
here and titletune.training.sft go through it. Importing this module is cheap: Unsloth (~16 s) is
imported only when a model is loaded, so tokenize-format, which needs a tokenizer alone, never
pays for it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from titletune.cli import UserError


def unsloth():
    """Import Unsloth (first: before transformers, TRL and PEFT) and return its FastLanguageModel."""
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel
    return FastLanguageModel


def resolve_model_name(name: str) -> str:
    """A local folder (relative to the repository root) or a hub id. Fails fast when offline."""
    local = Path(name)
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name: {local} has no config.json; not a Hugging Face model folder")
        return str(local)
    if name.startswith((".", "/", "models/")) or name.count("/") != 1:
        raise UserError(f"model.name: {name!r} is not a folder (looked in {local.absolute()}) "
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
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(model):
    """The base model's tokenizer alone (no weights, no Unsloth: enough to format the data)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_name(model.name),
                                         trust_remote_code=model.trust_remote_code)


def compute_dtype():
    """The dtype models load and compute in: float32 on every CPU; on a GPU what Unsloth's auto
    picks (bfloat16 where the GPU supports it, else float16). Unsloth's auto on CPU would be bfloat16 on
    CPUs that have it (AVX512-BF16, AMX) and float32 elsewhere: the same params would train,
    evaluate and export differently from one CPU type to another."""
    import torch
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(model, max_seq_length: int, device_map=None):
    """Base model + tokenizer through Unsloth, as for training; `model` is params' model section.

    The same call serves the embedded tiny model and a hub model; safetensors only,
    remote code only when `model.trust_remote_code` says so.
    """
    fast_language_model = unsloth()
    import torch

    if model.load_in_4bit and not torch.cuda.is_available():
        raise UserError("model.load_in_4bit: 4-bit QLoRA needs a CUDA GPU; set it to false on CPU")
    extra = {"device_map": device_map} if device_map is not None else {}
    loaded, tokenizer = fast_language_model.from_pretrained(
        model_name=resolve_model_name(model.name),
        max_seq_length=max_seq_length,
        dtype=compute_dtype(),
        load_in_4bit=model.load_in_4bit,
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,
        **extra,
    )
    return loaded, ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Batches need a pad token: the EOS where the tokenizer has none (padding is masked out)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tuned_model(model, max_seq_length: int, adapter_dir: Path | str):
    """Base model + the trained LoRA adapter (a PeftModel) + tokenizer, for evaluate, ask and export.

    `with tuned.disable_adapter():` gives the base model's answers from the same weights.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no trained adapter here; run `dvc repro` first "
                        "(the train stage writes it)")
    base, tokenizer = load_model(model, max_seq_length)
    from peft import PeftModel  # after load_model, which imported unsloth first
    # The base path inside adapter_config.json is where it was trained (maybe another machine):
    # the base comes from model.name instead.
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer


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
