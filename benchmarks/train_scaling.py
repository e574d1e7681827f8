"""Data-parallel scaling of the real train stage: 1 GPU vs N GPUs of one host, per model shape.

    python benchmarks/train_scaling.py --data /tmp/bench_data --shapes 8b,1b --gpus 2 --out scaling.jsonl

For each shape: the stage (benchmarks/train_speed.py's "stage" case: `stages/train.py` as dvc.yaml runs
it, `train.gpus=N` relaunching under torchrun) on N GPUs and on 1 GPU at the same tokens per GPU step
(`train.tokens_per_step`), then on 1 GPU with gradient_accumulation_steps=N, the same effective batch
as N GPUs, to compare the validation loss learnt. Prints and appends one JSON object per run:
device, shape, gpus, grad_accum, tokens_per_s (steady state), scaling (vs 1 GPU, accumulation 1),
rank_step_spread (max/min of the ranks' mean step times, 1.0 = even), rank tokens per step,
peak_gb, val_loss_after.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_stage(case: dict, data: Path, peak: float | None) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--case", json.dumps(case),
           "--data", str(data), "--workdir", f"/tmp/scaling_{case['shape']}_{case['gpus']}_{case['accum']}"]
    if peak:
        cmd += ["--peak-tflops", str(peak)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        return dict(case, error=(proc.stderr.strip().splitlines() or ["?"])[-1][:400])
    return json.loads(results[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a tokenize-format output (data/formatted)")
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tokens-per-step", type=int, default=16384, help="per GPU (train.tokens_per_step)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--base", type=Path, action="append", default=[],
                    help="JSON lines of earlier train_speed.py runs (repeatable): a matching run is reused")
    ap.add_argument("--deadline", type=float, default=10 ** 9, help="seconds: skip runs that would start later")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_scaling.jsonl")
    args = ap.parse_args()
    stop_at = time.time() + args.deadline
    base_runs = [json.loads(line) for path in args.base for line in path.read_text().splitlines()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':5} {'gpus':>4} {'accum':>5} {'tok/s':>9} {'scaling':>7} {'spread':>6} {'peak GB':>7} "
          f"{'val loss':>8}", flush=True)
    shapes = args.shapes.split(",")
    base = {}  # shape: 1-GPU tokens/s
    # Throughput of every shape first; the equal-effective-batch runs (loss comparison) after.
    runs = [(shape, 1, 1) for shape in shapes] + [(shape, args.gpus, 1) for shape in shapes] + \
           [(shape, 1, args.gpus) for shape in shapes]
    for shape, gpus, accum in runs:
        case = dict(impl="stage", shape=shape, quant="16bit", tokens_per_step=args.tokens_per_step,
                    gpus=gpus, accum=accum, steps=args.steps)
        reused = [r for r in base_runs if "error" not in r and all(r.get(k) == v for k, v in case.items())]
        if reused:
            row = dict(reused[-1])
        elif time.time() > stop_at:
            row = dict(case, error="skipped: deadline")
        else:
            row = run_stage(case, args.data, args.peak_tflops)
        if "error" not in row:
            m = row.pop("train_metrics", None)  # absent in a row this script wrote before
            if m:
                row.update(rank_step_spread=m.get("rank_step_spread"), rank_step_s=m.get("rank_step_s"),
                           real_tokens_per_step=m.get("real_tokens_per_step"),
                           val_loss_after=m["val_loss_after"], val_loss_before=m["val_loss_before"],
                           effective_batch_tokens=m.get("tokens_per_optimizer_step"))
            if gpus == accum == 1:
                base[shape] = row["tokens_per_s"]
            row.update(grad_accum=accum, scaling=row["tokens_per_s"] / base[shape] if shape in base else None)
            print(f"{shape:5} {gpus:4} {accum:5} {row['tokens_per_s']:9.0f} {row['scaling'] or 0:6.2f}x "
                  f"{row['rank_step_spread'] or 1:6.3f} {row['peak_gb']:7.1f} {row['val_loss_after']:8.4f}",
                  flush=True)
        else:
            print(f"{shape:5} {gpus:4} {accum:5} FAILED: {row['error']}", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
