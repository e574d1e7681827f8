"""Every GPU measurement of one device call, within a deadline, as JSON lines.

    python benchmarks/gpu_suite.py --suite speed --out $OUT --deadline 540

Builds the random-init models, measures the bf16 matmul peak, runs the GPU tests, formats the
benchmark corpus with the real data stages, then runs the suite: `speed` = the cases below
(benchmarks/train_speed.py, one process each; with 2+ GPUs visible, one chain per GPU side by side),
`scaling` = benchmarks/train_scaling.py (1 vs 2 GPUs).
Results: OUT/<suite>.jsonl (one object per case), OUT/<suite>.log (every case's tail and the
profiles). A case that fails or would overrun the deadline is recorded as such, never dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/tmp/bench_data")  # tokenize-format output of the benchmark corpus
CORPUS = "build/bench/trn.json.gz"  # scripts/make_sample.py --full --records 24000 (carried along)

# Runs of earlier calls, reused by the scaling table.
EARLIER_RUNS = [ROOT / "benchmarks" / "results" / name for name in ("h200x2_final_call2.jsonl", "h200x2_scaling_call2.jsonl")]
E8 = dict(shape="8b", quant="16bit", tokens_per_step=16384)
SUITES = {
    # Issue: the train stage on one GPU vs plain HF, QLoRA, 1B; profiles of stage and harness.
    "speed": [
        [dict(E8, impl="stage", env={"TITLETUNE_PROFILE_DIR": "/tmp/prof_stage"}, est=150),
         dict(E8, impl="stage", quant="4bit", est=150),
         dict(E8, impl="stage", shape="1b", est=70),
         dict(E8, impl="stage", env={"UNSLOTH_TORCH_VARLEN": "0"}, est=120)],
        [dict(E8, impl="hf", est=150),
         dict(E8, impl="harness", env={"TITLETUNE_PROFILE_DIR": "/tmp/prof_harness"}, est=120),
         dict(E8, impl="stage", tokens_per_step=0, gc="unsloth", max_length=1024, est=150,
              sets={"train.per_device_train_batch_size": 32, "train.padding_free": False}),
         dict(E8, impl="hf", shape="1b", est=70)],
    ],
    # The speed cases that matter, then scaling (train_scaling.py reuses the 1-GPU runs made here).
    "final": [
        [dict(E8, impl="stage", gpus=1, accum=1, steps=20, env={"TITLETUNE_PROFILE_DIR": "/tmp/prof_stage"}, est=110),
         dict(E8, impl="stage", quant="4bit", est=100)],
        [dict(E8, impl="hf", est=140),
         dict(E8, impl="stage", shape="1b", gpus=1, accum=1, steps=20, est=70)],
    ],
    # What the final call left: QLoRA at half the memory, the equal-effective-batch runs, 1B on 2 GPUs.
    "extra": [
        [dict(E8, impl="stage", quant="4bit", gc="unsloth", est=110),
         dict(E8, impl="stage", gpus=1, accum=2, steps=20, est=150)],
        [dict(E8, impl="stage", quant="4bit", tokens_per_step=8192, est=100),
         dict(E8, impl="stage", shape="1b", gpus=1, accum=2, steps=20, est=80)],
    ],
}


class Log:
    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            with open(self.path, "a") as f:
                f.write(text + "\n")


def sh(cmd: list[str], log: Log, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                              env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired as err:
        log(f"TIMEOUT after {timeout:.0f} s: {' '.join(cmd)}\n{(err.stdout or b'')[-2000:]!r}")
        return subprocess.CompletedProcess(cmd, 124, "", "timeout")
    log(f"$ {' '.join(cmd)}  [{time.perf_counter() - started:.0f} s, rc {proc.returncode}]\n"
        + (proc.stdout + proc.stderr)[-3000:])
    return proc


def run_chain(chain: list[dict], gpus: list[int], deadline: float, peak: float, out: Path, log: Log) -> None:
    for i, case in enumerate(chain):
        est = case.pop("est")
        left = deadline - time.time()
        record = dict(case)
        if left < est * 0.8:
            record["error"] = f"skipped: {left:.0f} s left, case needs ~{est} s"
        else:
            workdir = f"/tmp/w_{gpus[0]}_{i}"
            proc = sh([sys.executable, "benchmarks/train_speed.py", "--case", json.dumps(case), "--data", str(DATA),
                       "--workdir", workdir, "--peak-tflops", str(peak)], log, timeout=left - 5,
                      env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))})
            results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if results:
                record = json.loads(results[-1][7:])
            else:
                record["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:400]
            stage_log = Path(workdir) / "stage.log"
            if stage_log.exists():
                log(f"--- stage log tail ({workdir})\n" + stage_log.read_text()[-4000:])
        log("CASE " + json.dumps(record))
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def scaling(out: Path, base: list[Path], peak: float, deadline: float, log: Log) -> None:
    cmd = [sys.executable, "benchmarks/train_scaling.py", "--data", str(DATA), "--peak-tflops", str(peak),
           "--steps", "20", "--deadline", str(deadline - time.time() - 100), "--out", str(out)]
    sh(cmd + [arg for path in base if path.exists() for arg in ("--base", str(path))], log, deadline - time.time())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=[*SUITES, "scaling"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start for the whole suite")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    deadline = time.time() + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / f"{args.suite}.log")
    sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], log, 30)

    import torch
    from train_speed import build_model, matmul_peak_tflops
    for shape in ("1b", "8b"):
        build_model(shape)
    peak = matmul_peak_tflops()
    torch.cuda.empty_cache()  # the cases run in processes of their own
    log(f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}: "
        f"bf16 8192^3 matmul {peak:.0f} TFLOP/s")
    if not args.skip_tests and args.suite == "speed":  # later suites: the GPU tests passed in the speed call
        sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_attention.py"], log, 120)
    if not (DATA / "dataset_dict.json").exists():
        sh([sys.executable, "benchmarks/run_stages.py", "--set", f"data.source={CORPUS}",
            "--set", "format.max_length=2048", "--set", "preprocess.val_fraction=0.02",
            "--set", "preprocess.test_fraction=0.02", "decompress", "preprocess", "tokenize-format"], log, 240)
        os.rename(ROOT / "data" / "formatted", DATA)

    if args.suite == "scaling":
        scaling(args.out / "scaling.jsonl", [], peak, deadline, log)
        return
    chains = SUITES[args.suite]
    n_gpus = torch.cuda.device_count()
    if len(chains) > 1 and n_gpus < 2:
        chains = [[case for chain in chains for case in chain]]
    threads = []
    for i, chain in enumerate(chains):
        gpus = list(range(n_gpus)) if len(chains) == 1 else [i]
        t = threading.Thread(target=run_chain, args=(chain, gpus, deadline, peak, args.out / f"{args.suite}.jsonl", log))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if args.suite in ("final", "extra"):
        scaling(args.out / "scaling.jsonl", [args.out / f"{args.suite}.jsonl", *EARLIER_RUNS], peak, deadline, log)
    for name in ("prof_stage", "prof_harness"):
        for f in sorted(Path(f"/tmp/{name}").glob("*.txt")):
            log(f"=== {name}/{f.name}\n{f.read_text()}")


if __name__ == "__main__":
    main()
