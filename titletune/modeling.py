"""Models and tokenizers: where they come from, how they load, in which dtype.

Unsloth must be imported before transformers, TRL and PEFT: it patches them (and with Unsloth
installed but not imported, TRL fails on CPU). `unsloth()` is that first import; every loader
here and titletune.training.sft go through it. Importing this module is cheap: Unsloth (~16 s) is
imported only when a model is loaded, so tokenize-format, which needs a tokenizer alone, never
pays for it.
"""
from __future__ import annotations

import json
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


# Weights torch.load unpickles: loading them can run code the file carries.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_model_folder(name: str, trust_remote_code: bool, what: str = "model.name",
                       weights: str = "model") -> None:
    """A local folder (a base model, or an adapter with weights="adapter_model") loads safely, else
    one line: its config is JSON; code of its own (`auto_map`) only with model.trust_remote_code;
    safetensors weights, never a pickle checkpoint (`pytorch_model.bin` only). Every loader calls
    it; for a hub id transformers itself keeps to safetensors and asks before running its code."""
    folder = Path(name)
    if not folder.is_dir():
        return
    needs_code = {}
    for config in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        if (folder / config).is_file():
            try:
                data = json.loads((folder / config).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise UserError(f"{what}: {folder / config}: not valid JSON ({err})") from None
            if isinstance(data, dict) and data.get("auto_map"):
                needs_code[config] = data["auto_map"]
    if needs_code and not trust_remote_code:
        config, auto_map = next(iter(needs_code.items()))
        raise UserError(f"{what}: {folder} needs code of its own (auto_map in {config}: "
                        f"{', '.join(map(str, auto_map.values() if isinstance(auto_map, dict) else auto_map))}), "
                        "which is not run unless params.yaml model.trust_remote_code is true (only for a model "
                        "you trust)")
    if not list(folder.glob(f"{weights}*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickles:
            raise UserError(f"{what}: {folder} has pickle weights only ({', '.join(pickles[:3])}), which could "
                            "run code when loaded: only safetensors are loaded. Convert them on a machine you "
                            "trust (save_pretrained(..., safe_serialization=True)) and use that folder")
        raise UserError(f"{what}: {folder} has no {weights}.safetensors (no weights to load)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_source(model) -> str:
    """model.name, resolved (resolve_model_name) and checked safe to load (check_model_folder):
    what every loader passes to from_pretrained."""
    name = resolve_model_name(model.name)
    check_model_folder(name, model.trust_remote_code)
    return name


def require_cuda_for_4bit(model) -> None:
    import torch
    if model.load_in_4bit and not torch.cuda.is_available():
        raise UserError("model.load_in_4bit: 4-bit QLoRA needs a CUDA GPU; set it to false on CPU")


def load_tokenizer(model):
    """The base model's tokenizer alone (no weights, no Unsloth: enough to format the data)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_source(model), trust_remote_code=model.trust_remote_code)


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
    require_cuda_for_4bit(model)
    extra = {"device_map": device_map} if device_map is not None else {}
    loaded, tokenizer = fast_language_model.from_pretrained(
        model_name=model_source(model),
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


def max_positions(model) -> int | None:
    """The positions the model was built for (config.max_position_embeddings; None if it does not
    say). A prompt and its answer must fit them: past them a model answers noise or fails, and a
    generate() asked for more tokens would run on and on."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def prompt_room(model, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave max_new_tokens of the model's positions for the answer
    (None: the model sets no limit)."""
    positions = max_positions(model)
    return None if positions is None else positions - max_new_tokens


def prompt_too_long(prompt_tokens: int, room: int | None, max_new_tokens: int, model_name: str) -> str | None:
    """Why a prompt of prompt_tokens cannot be answered (room: prompt_room), or None if it fits
    (scripts/ask.py refuses the question, predict skips the row)."""
    if room is None or prompt_tokens <= room:
        return None
    return (f"too long: {prompt_tokens:,} tokens with the prompt, where {model_name} holds {room + max_new_tokens:,} "
            f"positions, {max_new_tokens:,} of them for the answer (evaluate.max_new_tokens): at most {room:,}")


def check_answer_room(model, longest_prompt: int, max_new_tokens: int, key: str, model_name: str) -> None:
    """The longest test prompt and max_new_tokens more fit the model's positions (evaluate, export)."""
    room = prompt_room(model, max_new_tokens)
    if room is not None and longest_prompt > room:
        positions = room + max_new_tokens
        raise UserError(f"params.yaml: {key}: {max_new_tokens} is not allowed with {model_name} (must be at most "
                        f"{positions - longest_prompt:,}: its {positions:,} positions less the longest test prompt, "
                        f"{longest_prompt:,} tokens)")


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
