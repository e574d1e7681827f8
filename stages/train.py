"""Stage `train`: LoRA / QLoRA fine-tuning with Unsloth's FastLanguageModel and TRL's SFTTrainer.

    python stages/train.py data/formatted models/adapter metrics

Reads params `model`, `format` (max_length) and `train`; writes models/adapter (LoRA weights +
tokenizer, the same bytes for the same training), metrics/train.json (with the MLflow run id),
metrics/train_log.csv, metrics/loss_curve.png and an MLflow run. Checkpoints go to
.titletune/checkpoints/<run fingerprint> (not a DVC output: a killed run resumes from the last one,
a finished run deletes them). Ctrl-C or SIGTERM stops it with one line that says which step it
reached and which checkpoint is kept; the MLflow run then ends KILLED (FAILED on an error).
The same code runs on CPU (the embedded tiny model), one GPU and N GPUs: with `train.gpus` > 1
it relaunches itself under torchrun (DDP); only rank 0 writes files and MLflow records.
"""
from titletune.cli import EXIT_INTERRUPTED, Interrupted, command_line, run_main, write_json, writing

ARGUMENTS = "DATA_DIR ADAPTER_DIR METRICS_DIR"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

from titletune.training.sft import (Throughput, add_lora, check_names, eval_sets,  # first: imports Unsloth
                                    fit_packed_rows, hardware_settings, losses, losses_before, rank_step_times,
                                    run_metrics, save_adapter, sft_config, timed_train, train_val_sets)

import os
import sys
from pathlib import Path

import torch
from trl import SFTTrainer

from titletune.modeling import load_formatted, load_model
from titletune.params import read_params
from titletune.tracking import check_store, ended_if_failed, finish_training_run, start_training_run
from titletune.training.attention import install_varlen_compat
from titletune.training.batching import resolve_tokens_per_step
from titletune.training.early_stopping import early_stopping_callbacks, stopping_metrics
from titletune.launch import is_rank0, local_rank, relaunch, resolve_gpus, world_size
from titletune.training.loss_log import step_rows, write_step_log
from titletune.training.profiling import profile_callbacks
from titletune.training.resuming import (checkpoint_dir, clear_checkpoints, last_checkpoint_step, resume_decision,
                                         run_fingerprint)


def interrupted_at(fingerprint: str, step: int, save_steps: int) -> str:
    """What Ctrl-C left: the step reached and the checkpoint the next run resumes from."""
    saved = last_checkpoint_step(fingerprint)
    if saved is not None:
        return (f"interrupted at step {step}; the last checkpoint (step {saved}) is kept in "
                f"{checkpoint_dir(fingerprint)}, `dvc repro` resumes from it")
    return (f"interrupted at step {step}, before the first checkpoint (train.save_steps: {save_steps}); "
            "`dvc repro` starts over")


def build_trainer(data_dir: Path, model_params, fmt, tp):
    """The base model with its LoRA adapter in an SFTTrainer over the formatted data; also the
    throughput callback, the run's fingerprint (its checkpoints' folder) and the device."""
    data = load_formatted(data_dir)
    train_set, val_set = train_val_sets(data, data_dir, tp.val_samples)
    hw = hardware_settings(tp.optim)
    print(f"train: {hw['device']}, {world_size()} process(es), bf16={hw['bf16']} fp16={hw['fp16']}, "
          f"optimizer {hw['optim']}", flush=True)
    # Each rank loads onto its own GPU (on CPU, a gloo run, every rank stays on the CPU).
    device_map = {"": local_rank()} if world_size() > 1 and torch.cuda.is_available() else None
    model, tokenizer = load_model(model_params, fmt.max_length, device_map=device_map)
    model = add_lora(model, tp)
    fit_packed_rows(model, tp)
    fingerprint = run_fingerprint({"model": model_params, "format": fmt, "train": tp}, data["train"])
    config = sft_config(tp, fmt.max_length, hw, world_size(), checkpoint_dir(fingerprint))  # sets up torchrun's group
    throughput = Throughput()
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, eval_dataset=eval_sets(train_set, val_set),
                         processing_class=tokenizer,
                         callbacks=[throughput, *profile_callbacks(throughput), *early_stopping_callbacks(tp)])
    return trainer, throughput, fingerprint, hw["device"]


def write_outputs(trainer, metrics: dict, history: list[dict], adapter_dir: Path, metrics_dir: Path,
                  base_model: str, device: str) -> None:
    """The adapter, metrics/train.json, the loss log and plot, and their MLflow copies (rank 0)."""
    save_adapter(trainer.model, trainer.processing_class, adapter_dir, base_model)
    write_json(metrics_dir / "train.json", metrics)
    plots = [metrics_dir / "train_log.csv", metrics_dir / "loss_curve.png"]
    write_step_log(step_rows(history), *plots)
    finish_training_run(metrics, adapter_dir, plots, device)


def main() -> None:
    data_dir, adapter_dir, metrics_dir = command_line(ARGUMENTS)
    params = read_params()
    model_params, fmt = params.model, params.format
    check_names(params.train)
    if is_rank0():
        check_store()  # before a model loads: an unusable MLflow store fails in seconds
    n_gpus = resolve_gpus(params.train.gpus)
    if n_gpus > 1 and "WORLD_SIZE" not in os.environ:
        relaunch(n_gpus, "train")
    tp = resolve_tokens_per_step(params.train, fmt.max_length, on_gpu=torch.cuda.is_available())
    trainer, throughput, fingerprint, device = build_trainer(data_dir, model_params, fmt, tp)
    resume = resume_decision(fingerprint, world_size())
    attention = install_varlen_compat(padding_free=bool(trainer.args.padding_free or trainer.args.packing))

    with ended_if_failed():
        run = start_training_run(params, fingerprint) if is_rank0() else None
        try:
            with writing(checkpoint_dir(fingerprint)):
                before = losses_before(trainer, resume, fingerprint)
                runtime = timed_train(trainer, resume)
                history = list(trainer.state.log_history)  # before losses() logs one more evaluation
                stopping = stopping_metrics(trainer, history, tp)
                after = losses(trainer)  # of the weights kept: the best checkpoint's with early stopping
        except KeyboardInterrupt:
            if not is_rank0():
                sys.exit(EXIT_INTERRUPTED)  # rank 0 says it
            raise Interrupted(interrupted_at(fingerprint, trainer.state.global_step, tp.save_steps)) from None
        rank_steps = rank_step_times(throughput)
        if not is_rank0():
            return
        metrics = {**run_metrics(trainer, before, after, runtime, throughput, tp, fmt.max_length, world_size(),
                                 attention, rank_steps),
                   "mlflow_run_id": run.info.run_id, **stopping}  # evaluate logs into this run
        write_outputs(trainer, metrics, history, adapter_dir, metrics_dir, model_params.name, device)
    clear_checkpoints(fingerprint)
    stopped = (f"; stopped early ({metrics['stop_reason']}), adapter of step {metrics['best_step']}"
               if metrics["stopped_early"] else "")
    print(f"train: {metrics['steps']} steps in {runtime:.0f} s, {metrics['tokens_per_s']:,.0f} tokens/s "
          f"({metrics['batching']}; attention {attention}), val loss {before['val_loss']:.3f} -> "
          f"{after['val_loss']:.3f}{stopped}; adapter in {adapter_dir}")


if __name__ == "__main__":
    run_main(main)
