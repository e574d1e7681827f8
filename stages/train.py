"""train: LoRA / QLoRA fine-tuning with Unsloth's FastLanguageModel and TRL's SFTTrainer.

    python stages/train.py data/formatted models/adapter metrics

Same code on CPU (the embedded tiny model), one GPU, and N GPUs: with `train.gpus` > 1 the
script relaunches itself under torchrun (DDP); only rank 0 writes files and MLflow records.
Checkpoints go to models/checkpoints (persisted by DVC): a killed run resumes from the last one.
"""
import unsloth  # noqa: F401  (first: it patches transformers, TRL and PEFT)

import csv
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common import (ROOT, UserError, atomic_path, load_formatted, load_model, load_params, mlflow_setup,
                    run_main, write_json)

CHECKPOINT_DIR = ROOT / "models" / "checkpoints"
FINGERPRINT = CHECKPOINT_DIR / "fingerprint.json"
LOSS_SUBSET = 256  # examples used to measure train loss before/after (the full train set is too slow)


# ---------------------------------------------------------------- launching

def resolve_gpus(gpus) -> int:
    """`train.gpus`: auto = every visible GPU (0 on CPU); N = exactly N."""
    available = torch.cuda.device_count()
    if gpus == "auto":
        return available
    if gpus > available:
        raise UserError(f"params.yaml: train.gpus: {gpus} asked for, {available} visible")
    return gpus


def launch_command(n_gpus: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs this same script data-parallel on n_gpus of this host.

    Multi-node: run torchrun yourself with --nnodes/--rdzv-endpoint (see README); this script
    then sees WORLD_SIZE set and does not relaunch.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n_gpus}", *argv]


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- hardware-dependent settings

def hardware_settings(optimizer: str) -> dict:
    """Precision and optimizer from what this machine has; logged so the choice is visible."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"device": torch.cuda.get_device_name(0), "bf16": bf16, "fp16": not bf16, "use_cpu": False,
                "optim": "adamw_8bit" if optimizer == "auto" else optimizer}
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        print(f"train: optimizer {optimizer} needs a GPU; using adamw_torch on CPU")
    optim = "adamw_torch" if optimizer in ("auto", "adamw_8bit", "paged_adamw_8bit") else optimizer
    return {"device": "cpu", "bf16": False, "fp16": False, "use_cpu": True, "optim": optim}


# ---------------------------------------------------------------- resume

def run_fingerprint(params: dict, train_set) -> str:
    """What a checkpoint must match to be resumed: the params and the training data."""
    blob = json.dumps({"params": params, "data": train_set._fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resumable_checkpoint(fingerprint: str) -> bool:
    """True when models/checkpoints holds a checkpoint of this same run; else clear it."""
    for ckpt in CHECKPOINT_DIR.glob("checkpoint-*"):
        if not (ckpt / "trainer_state.json").is_file():
            shutil.rmtree(ckpt)  # cut short while being saved (its state file is written last)
    has_checkpoint = any(CHECKPOINT_DIR.glob("checkpoint-*"))
    if has_checkpoint and FINGERPRINT.is_file() and json.loads(FINGERPRINT.read_text())["run"] == fingerprint:
        return True
    if CHECKPOINT_DIR.exists():
        shutil.rmtree(CHECKPOINT_DIR)
    CHECKPOINT_DIR.mkdir(parents=True)
    return False


# ---------------------------------------------------------------- MLflow

def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def data_md5_from_lock(path: str = "data/formatted") -> str | None:
    """The md5 DVC recorded for the training data (dvc.lock is written after each stage)."""
    lock = ROOT / "dvc.lock"
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def start_mlflow_run(params: dict):
    mlflow = mlflow_setup()
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(run_name=exp_name)
    mlflow.set_tags({k: v for k, v in {
        "git_commit": git_commit(), "dvc_experiment": exp_name,
        "data_md5": data_md5_from_lock(), "stage": "train"}.items() if v})
    mlflow.log_params(flatten(params))
    return run


# ---------------------------------------------------------------- outputs

def step_rows(log_history: list[dict]) -> list[dict]:
    """Per-step (train_loss, val_loss, learning_rate) rows from the trainer's log history,
    which a resumed run restores from its checkpoint."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        row = rows.setdefault(entry.get("step", 0), {"step": entry.get("step", 0)})
        if "loss" in entry:
            row["train_loss"], row["learning_rate"] = entry["loss"], entry.get("learning_rate")
        if "eval_loss" in entry:
            row["val_loss"] = entry["eval_loss"]
    return [rows[s] for s in sorted(rows) if len(rows[s]) > 1]


def write_step_log(rows: list[dict], csv_path: Path, png_path: Path) -> None:
    fields = ["step", "train_loss", "val_loss", "learning_rate"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss (completion tokens)", title="titletune: training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


class Throughput(TrainerCallback):
    """Steady-state tokens/s: measured from the end of the first steps (compilation, warm caches)."""

    warmup_steps = 3

    def __init__(self):
        self.marks = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        mark = (time.perf_counter(), state.num_input_tokens_seen)
        self.marks = self.marks[:1] + [mark] if state.global_step > self.warmup_steps else [mark]

    def tokens_per_s(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks
        return (n1 - n0) / (t1 - t0)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def sft_config(tp: dict, max_length: int, hw: dict, world_size: int, output_dir: Path) -> SFTConfig:
    """The SFTConfig of a run, from the train params and the hardware (also used by benchmarks/)."""
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=tp["batch_size"],
        per_device_eval_batch_size=tp["batch_size"],
        gradient_accumulation_steps=tp["grad_accum"],
        learning_rate=tp["learning_rate"],
        lr_scheduler_type=tp["lr_scheduler"],
        warmup_steps=tp["warmup_ratio"],  # a float in [0, 1) is a fraction of the total steps
        weight_decay=tp["weight_decay"],
        optim=hw["optim"],
        max_steps=tp["max_steps"] if tp["max_steps"] > 0 else -1,
        num_train_epochs=tp["epochs"],
        seed=tp["seed"],
        data_seed=tp["seed"],
        bf16=hw["bf16"], fp16=hw["fp16"], use_cpu=hw["use_cpu"],
        max_length=max_length,
        packing=tp["packing"],
        padding_free=tp["padding_free"],
        completion_only_loss=True,
        eval_strategy="steps", eval_steps=tp["eval_steps"],
        logging_steps=tp["logging_steps"],
        save_strategy="steps", save_steps=tp["save_steps"], save_total_limit=tp["save_total_limit"],
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False if world_size > 1 else None,
        report_to=["mlflow"] if is_rank0() else [],
    )


def add_lora(model, tp: dict):
    return FastLanguageModel.get_peft_model(
        model, r=tp["lora_r"], lora_alpha=tp["lora_alpha"], lora_dropout=tp["lora_dropout"],
        target_modules=tp["target_modules"], bias="none",
        use_gradient_checkpointing=tp["gradient_checkpointing"], random_state=tp["seed"])


# ---------------------------------------------------------------- main

def main() -> None:
    data_dir, adapter_dir, metrics_dir = map(Path, sys.argv[1:4])
    params = load_params("model", "format", "train")
    model_params, tp = params["model"], params["train"]
    max_length = params["format"]["max_length"]

    n_gpus = resolve_gpus(tp["gpus"])
    if n_gpus > 1 and "WORLD_SIZE" not in os.environ:
        cmd = launch_command(n_gpus, [str(Path(__file__).resolve()), *sys.argv[1:]])
        print(f"train: launching on {n_gpus} GPUs: {' '.join(cmd)}", flush=True)
        sys.exit(subprocess.run(cmd).returncode)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    data = load_formatted(data_dir)
    columns = ["input_ids", "completion_mask"]
    train_set, val_set = data["train"].select_columns(columns), data["val"].select_columns(columns)
    if len(val_set) == 0:
        raise UserError(f"{data_dir}: the validation split is empty; raise preprocess.val_fraction")

    hw = hardware_settings(tp["optimizer"])
    print(f"train: {hw['device']}, {world_size} process(es), bf16={hw['bf16']} fp16={hw['fp16']}, "
          f"optimizer {hw['optim']}", flush=True)

    # Each rank loads onto its own GPU (on CPU, a gloo run, every rank stays on the CPU).
    device_map = {"": local_rank} if world_size > 1 and torch.cuda.is_available() else None
    model, tokenizer = load_model(model_params, max_length, device_map=device_map)
    model = add_lora(model, tp)

    # Creating the config sets up the process group under torchrun.
    config = sft_config(tp, max_length, hw, world_size, CHECKPOINT_DIR)
    fingerprint = run_fingerprint(params, data["train"])
    resume = resumable_checkpoint(fingerprint) if is_rank0() else False
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has cleared or kept the checkpoints
        resume = any(CHECKPOINT_DIR.glob("checkpoint-*"))
    throughput = Throughput()
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, eval_dataset=val_set,
                         processing_class=tokenizer, callbacks=[throughput])

    run = start_mlflow_run(params) if is_rank0() else None
    train_subset = trainer.train_dataset.select(range(min(LOSS_SUBSET, len(trainer.train_dataset))))
    before_file = CHECKPOINT_DIR / "loss_before.json"
    if resume and before_file.is_file():
        before = json.loads(before_file.read_text())
        print(f"train: resuming from the last checkpoint in {CHECKPOINT_DIR}", flush=True)
    else:
        before = {"val_loss": trainer.evaluate()["eval_loss"],
                  "train_loss": trainer.evaluate(train_subset, metric_key_prefix="train")["train_loss"]}
        if is_rank0():
            write_json(before_file, before)
            write_json(FINGERPRINT, {"run": fingerprint})

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    runtime = time.perf_counter() - started
    after = {"val_loss": trainer.evaluate()["eval_loss"],
             "train_loss": trainer.evaluate(train_subset, metric_key_prefix="train")["train_loss"]}

    if not is_rank0():
        return
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
        "train_loss_before": before["train_loss"], "train_loss_after": after["train_loss"],
        "steps": trainer.state.global_step,
        "train_runtime_s": runtime,
        # Real (non-padding) tokens of all ranks per second, after the first steps (warm-up) and
        # over the whole run (warm-up, compilation and in-training evaluation included).
        "tokens_per_s": throughput.tokens_per_s(),
        "tokens_per_s_overall": tokens / runtime,
        "peak_memory_gb": peak_memory_gb(),
        "effective_batch_size": tp["batch_size"] * tp["grad_accum"] * world_size,
        "world_size": world_size,
    }
    with atomic_path(adapter_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "training_run.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}) + "\n")
    metrics_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics_dir / "train.json", metrics)
    write_step_log(step_rows(trainer.state.log_history), metrics_dir / "train_log.csv",
                   metrics_dir / "loss_curve.png")

    import mlflow
    mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    mlflow.log_artifact(str(metrics_dir / "train_log.csv"), "plots")
    mlflow.log_artifact(str(metrics_dir / "loss_curve.png"), "plots")
    mlflow.set_tag("hardware", hw["device"])
    mlflow.end_run()
    # The run finished: its checkpoints are no longer needed (the adapter is the result).
    for ckpt in CHECKPOINT_DIR.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    print(f"train: {metrics['steps']} steps in {runtime:.0f} s, {metrics['tokens_per_s']:,.0f} tokens/s, "
          f"val loss {before['val_loss']:.3f} -> {after['val_loss']:.3f}; adapter in {adapter_dir}")


if __name__ == "__main__":
    run_main(main)
