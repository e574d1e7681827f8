"""Data-parallel scaling of the real train stage: tokens/s on 1, 2, 4 ... GPUs of one host.

    python benchmarks/train_scaling.py --model /tmp/bench_models/1b --gpus 1,2,4

Runs `stages/train.py` as dvc.yaml calls it (via run_stages.py) with `train.gpus=N` at the same
per-GPU batch, then once more on 1 GPU with grad_accum=N_max (the same effective batch as the
largest run) to compare final losses. Needs data/formatted (run the earlier stages first).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_once(model: str, gpus: int, batch: int, accum: int, steps: int, max_length: int) -> dict:
    sets = {"model.name": model, "format.max_length": max_length, "train.gpus": gpus, "train.batch_size": batch, "train.grad_accum": accum,
            "train.max_steps": steps, "train.eval_steps": 10 ** 6, "train.save_steps": 10 ** 6,
            "train.logging_steps": 10, "train.learning_rate": 0.0002}
    # packing stays off: on the GPU Unsloth batches padding-free by itself (real tokens only).
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_stages.py"), "train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((ROOT / "metrics" / "train.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--batch", type=int, default=8, help="per-GPU batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=1024, help="as format.max_length of data/formatted")
    ap.add_argument("--no-accum-run", action="store_true", help="skip the 1-GPU equal-effective-batch run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_scaling.jsonl")
    args = ap.parse_args()
    counts = [int(n) for n in args.gpus.split(",")]
    runs = [(n, 1) for n in counts] + ([] if args.no_accum_run else [(1, max(counts))])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = None
    print(f"{'gpus':>4} {'accum':>5} {'eff. batch':>10} {'tok/s':>9} {'scaling':>7} {'val loss':>8}", flush=True)
    for gpus, accum in runs:
        m = train_once(args.model, gpus, args.batch, accum, args.steps, args.max_length)
        base = base or m["tokens_per_s"]
        row = dict(gpus=gpus, grad_accum=accum, **m, scaling=m["tokens_per_s"] / base)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{gpus:4} {accum:5} {m['effective_batch_size']:10} {m['tokens_per_s']:9.0f} "
              f"{row['scaling']:6.2f}x {m['val_loss_after']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
