"""LoRA training speed on a GPU: the real train stage against plain transformers + PEFT + TRL.

    python benchmarks/train_speed.py --data data/formatted --case '{"impl": "stage", "shape": "8b", ...}'

One case per call (benchmarks/gpu_suite.py runs them all, one process each, and writes JSON lines):
- impl "stage":   `stages/train.py` exactly as dvc.yaml runs it (through benchmarks/run_stages.py, params
                  overridden), in a scratch copy of the repo; figures from its metrics/train.json.
- impl "harness": our modules (load_model, add_lora, sft_config) with evaluation, checkpoints and MLflow
                  off: what the stage costs beyond training itself.
- impl "hf":      transformers + PEFT + TRL with their defaults (sdpa attention, TRL's gradient
                  checkpointing), at the stage's tokens per step, LoRA config, precision and optimizer.
All run on the same data: the tokenize-format output of the full-size corpus generator
(`scripts/make_sample.py --full`), whose length distribution is the real corpus's. Models are
random-init Llama shapes (speed does not depend on weight values). Real (non-padding) tokens/s
after warm-up; % of the LoRA limit = tokens/s / (matmul peak / (4 x params)).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/bench_models"))
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 20  # the Throughput callback leaves the first 3 out


def build_model(shape: str) -> Path:
    """A random-init model of a real shape, saved once (bf16 safetensors) with the embedded tokenizer."""
    path = MODELS / shape
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama").save_pretrained(path)
    del model
    return path


def matmul_peak_tflops() -> float:
    import torch
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def stage_case(case: dict, data: Path, workdir: Path) -> dict:
    """The real stage in a scratch copy of the repo (it writes models/ and metrics/ there)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(".git", "data", ".gpu-site.tgz", "build"))
    (workdir / "data").mkdir()
    os.symlink(data.resolve(), workdir / "data" / "formatted")
    sets = {"model.name": str(MODELS / case["shape"]), "model.load_in_4bit": case["quant"] == "4bit",
            "format.max_length": case.get("max_length", 2048), "train.tokens_per_step": case["tokens_per_step"],
            "train.gradient_checkpointing": case.get("gc", False), "train.max_steps": case.get("steps", STEPS),
            "train.eval_steps": case.get("eval_steps", 10), "train.save_steps": 1000, "train.logging_steps": 5,
            "train.learning_rate": 0.0002, "train.lora_alpha": 16, "train.gpus": case.get("gpus", 1),
            "train.gradient_accumulation_steps": case.get("accum", 1), **case.get("sets", {})}
    cmd = [sys.executable, "benchmarks/run_stages.py", "train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, **case.get("env", {})))
    (workdir / "stage.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = (proc.stdout + proc.stderr).strip().splitlines() or ["?"]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        raise RuntimeError(f"stage failed: {(errors or lines)[-1][:400]}")
    metrics = json.loads((workdir / "metrics" / "train.json").read_text())
    return {"tokens_per_s": metrics["tokens_per_s"], "peak_gb": metrics["peak_memory_gb"],
            "attention": metrics["attention"], "train_metrics": metrics}


def harness_case(case: dict, data: Path) -> dict:
    """Our modules without the stage around them: no evaluation, checkpoints or MLflow."""
    from titletune.modeling import load_formatted, load_model  # imports unsloth first
    from titletune.training import attention, sft as training
    from titletune.training.profiling import Throughput, peak_memory_gb, profile_callbacks
    from trl import SFTTrainer
    from titletune.params import Model
    tp = training_params(case)
    model, tok = load_model(Model(name=str(MODELS / case["shape"]), load_in_4bit=case["quant"] == "4bit",
                                  trust_remote_code=False), case.get("max_length", 2048))
    model = training.add_lora(model, tp)
    training.fit_packed_rows(model, tp)
    path = attention.install_varlen_compat(padding_free=True)
    config = training.sft_config(tp, case.get("max_length", 2048), training.hardware_settings("auto"), 1,
                                 Path("/tmp/bench_out"))
    config.report_to, config.eval_strategy, config.save_strategy = [], "no", "no"
    throughput = Throughput()
    train = load_formatted(data)["train"].select_columns(["input_ids", "labels"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tok,
                         callbacks=[throughput, *profile_callbacks(throughput)])
    trainer.train()
    return {"tokens_per_s": throughput.tokens_per_s(), "peak_gb": peak_memory_gb(), "attention": path}


def hf_case(case: dict, data: Path) -> dict:
    """transformers + PEFT + TRL with their defaults at the stage's tokens per step."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    from titletune.training.profiling import Throughput, peak_memory_gb
    path = MODELS / case["shape"]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if case["quant"] == "4bit" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa", quantization_config=quant)
    if quant:
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=TARGETS))
    config = SFTConfig(output_dir="/tmp/bench_out", per_device_train_batch_size=1, max_steps=case.get("steps", STEPS),
                       learning_rate=2e-4, bf16=True, optim="adamw_8bit", packing=True,
                       max_length=case["tokens_per_step"], include_num_input_tokens_seen="non_padding",
                       report_to=[], save_strategy="no", logging_steps=5, seed=0)
    throughput = Throughput()
    train = load_from_disk(str(data))["train"].select_columns(["input_ids", "labels"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=train,
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[throughput])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"tokens_per_s": throughput.tokens_per_s(), "peak_gb": peak_memory_gb(), "attention": "sdpa (hf)",
            "gradient_checkpointing": config.gradient_checkpointing}


def training_params(case: dict):
    """The stage's train params (params.yaml) with the case's GPU settings, for the harness."""
    import yaml
    from titletune.params import Train
    tp = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    tp.update(tokens_per_step=case["tokens_per_step"], gradient_checkpointing=case.get("gc", False),
              max_steps=case.get("steps", STEPS), learning_rate=2e-4, lora_alpha=16, gradient_accumulation_steps=1,
              logging_steps=5, optim="auto")
    return Train.model_validate(tp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, help="the case as JSON: impl, shape, quant, tokens_per_step, ...")
    ap.add_argument("--data", type=Path, required=True, help="a tokenize-format output (data/formatted)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_stage"), help="scratch repo copy (stage)")
    ap.add_argument("--peak-tflops", type=float, help="bf16 matmul peak measured before (default: measure)")
    args = ap.parse_args()
    case = json.loads(args.case)
    build_model(case["shape"])
    import torch
    peak = args.peak_tflops or matmul_peak_tflops()
    runner = {"stage": lambda: stage_case(case, args.data, args.workdir),
              "harness": lambda: harness_case(case, args.data), "hf": lambda: hf_case(case, args.data)}
    started = time.perf_counter()
    result = runner[case["impl"]]()
    from safetensors import safe_open
    n_params = 0
    for shard in (MODELS / case["shape"]).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            n_params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    record = dict(case, **result, device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  matmul_tflops=peak, n_params=n_params, wall_s=time.perf_counter() - started,
                  limit_fraction=result["tokens_per_s"] / (peak * 1e12 / (4 * n_params)))
    print("RESULT " + json.dumps(record), flush=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
