"""LoRA training speed on a GPU: plain transformers + PEFT + TRL vs our train stage (Unsloth).

    python benchmarks/train_speed.py --suite main        # every case, one subprocess each
    python benchmarks/train_speed.py --case '{"shape": "8b", "impl": "ours", ...}'

Models are random-init Llama shapes built from a config on the GPU (speed does not depend on
weight values). Data: random token ids, lengths drawn like the formatted corpus (mean ~470,
at most `seq`). Reports real (non-padding) tokens/s after warm-up, peak GPU memory, and the
fraction of the LoRA limit: frozen weights need no weight gradients, so a token costs about
4 x params FLOPs; limit = measured bf16 matmul peak / (4 x params).
"""
from __future__ import annotations

import argparse
import json
import os
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
LORA = dict(lora_r=16, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
WARMUP, MEASURED = 4, 12

# (shape, quant, batch, seq, packing, gradient checkpointing) measured for both impls.
SUITES = {
    "main": [
        ("8b", "16bit", 4, 2048, True, "unsloth"),
        ("8b", "16bit", 2, 2048, True, False),
        ("8b", "16bit", 8, 1024, False, "unsloth"),
        ("1b", "16bit", 8, 1024, False, "unsloth"),
        ("1b", "16bit", 8, 2048, True, False),
        ("8b", "4bit", 4, 2048, True, "unsloth"),
        ("1b", "4bit", 8, 2048, True, "unsloth"),
    ],
}


def build_model(shape: str) -> Path:
    """A random-init model of a real shape, saved once (bf16 safetensors) with the tiny tokenizer."""
    path = MODELS / shape
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama").save_pretrained(path)
    del model
    return path


def make_dataset(n: int, seq: int, seed: int = 0):
    import numpy as np
    from datasets import Dataset
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(400), 0.5, n).astype(int), 64, seq)
    ids = [rng.integers(3, 128000, size=l).tolist() for l in lengths]
    return Dataset.from_dict({"input_ids": ids,
                              "completion_mask": [[0] * 32 + [1] * (len(x) - 32) for x in ids]})


def run_case(case: dict) -> dict:
    """Train WARMUP + MEASURED steps of one configuration; return its figures."""
    shape, impl, quant = case["shape"], case["impl"], case["quant"]
    path = MODELS / shape
    tp = dict(LORA, batch_size=case["batch"], grad_accum=1, learning_rate=1e-4, lr_scheduler="constant",
              warmup_ratio=0.0, weight_decay=0.0, optimizer="auto", max_steps=WARMUP + MEASURED, epochs=1.0,
              seed=0, packing=case["packing"], padding_free=case["packing"], eval_steps=10 ** 6,
              logging_steps=10 ** 6, save_steps=10 ** 6, save_total_limit=1,
              gradient_checkpointing=case["gc"])
    if impl == "ours":
        sys.path.insert(0, str(ROOT / "stages"))
        import train  # noqa: E402  (imports unsloth first)
        from common import load_model
        import torch
        model, tok = load_model({"name": str(path), "load_in_4bit": quant == "4bit",
                                 "trust_remote_code": False}, case["seq"])
        model = train.add_lora(model, tp)
        config = train.sft_config(tp, case["seq"], train.hardware_settings("auto"), 1, Path("/tmp/bench_out"))
        config.report_to, config.eval_strategy, config.save_strategy = [], "no", "no"
        from trl import SFTTrainer
    else:
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        from trl import SFTConfig, SFTTrainer
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16) if quant == "4bit" else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                     attn_implementation="sdpa", quantization_config=qc)
        tok = AutoTokenizer.from_pretrained(path)
        if quant == "4bit":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(case["gc"]))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=LORA["target_modules"]))
        config = SFTConfig(output_dir="/tmp/bench_out", per_device_train_batch_size=case["batch"],
                           max_steps=WARMUP + MEASURED, learning_rate=1e-4, bf16=True, optim="adamw_8bit",
                           max_length=case["seq"], packing=case["packing"], padding_free=case["packing"],
                           gradient_checkpointing=bool(case["gc"]), completion_only_loss=True,
                           include_num_input_tokens_seen="non_padding", report_to=[], save_strategy="no",
                           logging_steps=10 ** 6, seed=0)
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (WARMUP, WARMUP + MEASURED):
                torch.cuda.synchronize()
                self.marks = getattr(self, "marks", []) + [(time.perf_counter(), state.num_input_tokens_seen)]

    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=make_dataset(4000, case["seq"]),
                         processing_class=tok, callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = timer.marks
    n_params = sum(p.numel() for p in model.base_model.model.parameters())
    return dict(case, tokens_per_s=(n1 - n0) / (t1 - t0), peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
                n_params=n_params, step_s=(t1 - t0) / MEASURED)


def matmul_peak_tflops() -> float:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--case", help="one case as JSON (run in its own process by --suite)")
    ap.add_argument("--shapes", default="1b,8b", help="limit the suite to these shapes")
    ap.add_argument("--quants", default="16bit,4bit", help="limit the suite to these precisions")
    ap.add_argument("--impls", default="hf,ours")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_speed.jsonl")
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    import torch
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name(0)}: bf16 8192^3 matmul {peak:.0f} TFLOP/s", flush=True)
    shapes = args.shapes.split(",")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':5} {'quant':5} {'impl':5} {'batch':>5} {'seq':>5} {'pack':>5} {'gc':>7} "
          f"{'tok/s':>8} {'peak GB':>8} {'% limit':>8}", flush=True)
    for shape, quant, batch, seq, packing, gc in SUITES[args.suite]:
        if shape not in shapes or quant not in args.quants.split(","):
            continue
        build_model(shape)
        for impl in args.impls.split(","):
            case = dict(shape=shape, quant=quant, impl=impl, batch=batch, seq=seq, packing=packing, gc=gc)
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                  capture_output=True, text=True, timeout=300)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:150]
                print(f"{shape:5} {quant:5} {impl:5} {batch:5} {seq:5} {str(packing):>5} {str(gc):>7} "
                      f"FAILED: {err}", flush=True)
                continue
            r = json.loads(lines[-1][7:])
            r["matmul_tflops"] = peak
            r["limit_fraction"] = r["tokens_per_s"] / (peak * 1e12 / (4 * r["n_params"]))
            r["device"] = torch.cuda.get_device_name(0)
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{shape:5} {quant:5} {impl:5} {batch:5} {seq:5} {str(packing):>5} {str(gc):>7} "
                  f"{r['tokens_per_s']:8.0f} {r['peak_gb']:8.1f} {100 * r['limit_fraction']:7.1f}%", flush=True)


if __name__ == "__main__":
    main()
