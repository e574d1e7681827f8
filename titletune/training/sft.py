"""LoRA / QLoRA training with Unsloth and TRL: the SFTConfig, the adapter, the losses, measuring.

sft_config passes the train params that carry SFTConfig's own names straight through (SFT_KEYS,
derived from the two classes' fields) and adds what the hardware decides (hardware_settings:
precision, `optim: auto`), the batching (titletune.training.batching) and early stopping
(titletune.training.early_stopping). Resuming a killed run: titletune.training.resuming; the
per-step loss log and plot: titletune.training.loss_log.
"""
from __future__ import annotations

import unsloth  # noqa: F401  (first: it patches transformers, TRL and PEFT; see titletune.modeling)
from unsloth import FastLanguageModel

import dataclasses
import difflib
import json
import time
from pathlib import Path

import torch
from trl import SFTConfig

from titletune.cli import UserError, atomic_path, write_json
from titletune.params import Train
from titletune.splits import select_examples
from titletune.training.batching import batching_args, describe_batching, tokens_per_optimizer_step
from titletune.training.early_stopping import early_stopping_args
from titletune.launch import is_rank0
from titletune.training.profiling import Throughput, peak_memory_gb
from titletune.training.resuming import LOSS_BEFORE, checkpoint_dir

LOSS_SUBSET = 256  # at most this many training examples measure the train loss (the full set is too slow)
# The train params named like SFTConfig arguments (fields of titletune.params.Train that SFTConfig
# declares too). sft_config passes each one through as it is, unless it decides that argument itself.
SFT_KEYS = tuple(key for key in Train.model_fields if key in {field.name for field in dataclasses.fields(SFTConfig)})


def check_names(tp) -> None:
    """train.optim and train.lr_scheduler_type must be names transformers knows (checked here, not
    in titletune.params, which every stage imports: importing transformers takes seconds)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    for key, names in (("optim", ["auto", *(o.value for o in OptimizerNames)]),
                       ("lr_scheduler_type", [s.value for s in SchedulerType])):
        value = getattr(tp, key)
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            raise UserError(f"params.yaml: train.{key}: {json.dumps(value)} is not allowed (must be one of "
                            f"{', '.join(names)})" + (f"; did you mean {close[0]}?" if close else ""))


def hardware_settings(optim: str) -> dict:
    """Precision and optimizer from what this machine has; logged so the choice is visible."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"device": torch.cuda.get_device_name(0), "bf16": bf16, "fp16": not bf16, "use_cpu": False,
                "optim": "adamw_8bit" if optim == "auto" else optim}
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        print(f"train: optimizer {optim} needs a GPU; using adamw_torch on CPU")
    cpu_optim = "adamw_torch" if optim in ("auto", "adamw_8bit", "paged_adamw_8bit") else optim
    return {"device": "cpu", "bf16": False, "fp16": False, "use_cpu": True, "optim": cpu_optim}


def sft_config(tp, max_length: int, hw: dict, world_size: int, output_dir: Path) -> SFTConfig:
    """The SFTConfig of a run, from the train params and the hardware (also used by benchmarks/)."""
    decided = dict(
        output_dir=str(output_dir),
        **batching_args(tp, max_length, on_gpu=not hw["use_cpu"]),  # batch size, packing, padding-free
        max_steps=tp.max_steps if tp.max_steps > 0 else -1,  # 0: num_train_epochs decides
        data_seed=tp.seed,
        optim=hw["optim"], bf16=hw["bf16"], fp16=hw["fp16"], use_cpu=hw["use_cpu"],
        # TRL defaults to HF checkpointing; ours is train.gradient_checkpointing (Unsloth applies it on a GPU).
        gradient_checkpointing=bool(tp.gradient_checkpointing),
        completion_only_loss=True,
        eval_strategy="steps", save_strategy="steps",
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False if world_size > 1 else None,
        report_to=["mlflow"] if is_rank0() else [],
        **early_stopping_args(tp),
    )
    return SFTConfig(**{key: getattr(tp, key) for key in SFT_KEYS if key not in decided}, **decided)


def fit_packed_rows(model, tp) -> None:
    """Let a packed row hold the whole token budget. Unsloth caps packed rows at the max_seq_length
    the model was loaded with (format.max_length: the longest document, which RoPE is sized for;
    loading with more would rescale RoPE); each document in a row keeps its own positions, so the
    row itself may be longer."""
    if tp.tokens_per_step and torch.cuda.is_available():
        model.max_seq_length = max(model.max_seq_length, tp.tokens_per_step)


def train_val_sets(data, data_dir: Path, val_samples: int):
    """The formatted train split and train.val_samples examples of the val split, as the trainer
    takes them: token ids and labels (-100 on the prompt), built by tokenize-format."""
    columns = ["input_ids", "labels"]
    if len(data["val"]) == 0:
        raise UserError(f"{data_dir}: the validation split is empty; raise preprocess.val_fraction")
    val_set = select_examples(data["val"], val_samples).select_columns(columns)
    return data["train"].select_columns(columns), val_set


def check_lora(model, tp) -> None:
    """train.target_modules name layers of this model that LoRA can wrap, and train.lora_r is at most
    its hidden size (a wider rank adds nothing a full-rank update would not, and its matrices grow
    without bound); checked here because PEFT says either with a traceback, or runs out of memory."""
    from transformers.pytorch_utils import Conv1D
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    layers = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    missing = [target for target in tp.target_modules
               if not any(name == target or name.endswith(f".{target}") for name in layers)]  # PEFT's match
    model_name = getattr(model, "name_or_path", "") or "the model"
    if missing:
        names = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise UserError(f"params.yaml: train.target_modules: {json.dumps(missing)} is not allowed (must name "
                        f"layers of {model_name}: {', '.join(names)})")
    config = model.config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if hidden and tp.lora_r > hidden:
        raise UserError(f"params.yaml: train.lora_r: {tp.lora_r} is not allowed with {model_name} (must be at "
                        f"most its hidden size, {hidden})")


def add_lora(model, tp):
    """The LoRA adapter on every `train.target_modules` layer, through Unsloth."""
    check_lora(model, tp)
    return FastLanguageModel.get_peft_model(
        model, r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
        target_modules=list(tp.target_modules), bias="none",
        use_gradient_checkpointing=tp.gradient_checkpointing, random_state=tp.seed)


# ---------------------------------------------------------------- measuring

def timed_train(trainer, resume: bool) -> float:
    """Train (from the last checkpoint when resuming); the seconds it took."""
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    return time.perf_counter() - started


def eval_sets(train_set, val_set) -> dict:
    """What the trainer evaluates, every eval_steps and before/after training: the validation
    examples (train.val_samples) and the first training examples, LOSS_SUBSET of them or as many as
    the validation ones if fewer (a train loss need not be more precise than the val loss beside it).
    Handed to SFTTrainer at construction, so TRL prepares (packs) both exactly like the training data."""
    return {"val": val_set, "train_subset": train_set.select(range(min(LOSS_SUBSET, len(val_set), len(train_set))))}


def losses(trainer) -> dict:
    """Validation loss and the loss on the fixed subset of training examples."""
    metrics = trainer.evaluate()
    return {"val_loss": metrics["eval_val_loss"], "train_loss": metrics["eval_train_subset_loss"]}


def losses_before(trainer, resume: bool, fingerprint: str) -> dict:
    """The losses before training: measured now, or those of the run being resumed."""
    saved = checkpoint_dir(fingerprint) / LOSS_BEFORE
    if resume and saved.is_file():
        print(f"train: resuming from the last checkpoint in {checkpoint_dir(fingerprint)}", flush=True)
        return json.loads(saved.read_text())
    before = losses(trainer)
    if is_rank0():
        write_json(saved, before)
    return before


def rank_step_times(throughput: Throughput) -> list[float]:
    """Every rank's mean step time (collective: all ranks call it); [own] without torchrun."""
    mine = throughput.mean_step_s()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [mine]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def run_metrics(trainer, before: dict, after: dict, runtime: float, throughput: Throughput, tp,
                max_length: int, world_size: int, attention: str, rank_steps: list[float]) -> dict:
    """metrics/train.json."""
    return {
        "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
        "train_loss_before": before["train_loss"], "train_loss_after": after["train_loss"],
        "steps": trainer.state.global_step,
        "train_runtime_s": runtime,
        # Real (non-padding) tokens of all ranks per second, after the first steps (warm-up) and
        # over the whole run (warm-up, compilation and in-training evaluation included).
        "tokens_per_s": throughput.tokens_per_s(),
        "tokens_per_s_overall": trainer.state.num_input_tokens_seen / runtime,
        "real_tokens_per_step": throughput.tokens / throughput.steps if throughput.steps else 0.0,
        "peak_memory_gb": peak_memory_gb(),
        "attention": attention,  # the kernel padding-free rows ran on (titletune.training.attention)
        "tokens_per_step": tp.tokens_per_step,  # 0: examples per step, below (auto: resolved for this machine)
        "batching": describe_batching(trainer.args),
        # Rows (token budget) or examples per optimizer step, all ranks.
        "effective_batch_size": trainer.args.per_device_train_batch_size * tp.gradient_accumulation_steps * world_size,
        "tokens_per_optimizer_step": tokens_per_optimizer_step(tp, max_length, world_size),  # at most
        "world_size": world_size,
        # Each rank's mean step time (s, after warm-up) and their max / min: 1.0 = balanced ranks.
        "rank_step_s": rank_steps,
        "rank_step_spread": max(rank_steps) / min(rank_steps) if rank_steps and min(rank_steps) > 0 else None,
    }


# ---------------------------------------------------------------- outputs

def save_adapter(model, tokenizer, adapter_dir: Path, base_model: str) -> None:
    """The LoRA weights (safetensors) and the tokenizer, the same bytes for the same weights in
    every run and clone: PEFT writes target_modules in set order (which changes from one process to
    the next) and the base model as the path it was loaded from (maybe absolute) into
    adapter_config.json and its model card (README.md), so both get the modules sorted and
    `base_model`, model.name as written in params.yaml. The MLflow run id is not in here (it would
    change the adapter's hash on every run): it is in metrics/train.json."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model
        if isinstance(config.target_modules, (set, list, tuple)):
            config.target_modules = sorted(config.target_modules)
    with atomic_path(adapter_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


