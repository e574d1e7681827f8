"""Why refills' prefill passes cost more in a run than alone: each pass of a run's refill pattern
timed on its own (synchronised), the first time its shape (prompts x padded width) is seen and
again, with decode steps (CUDA graph replays) between the passes as in a run, and the caching
allocator's counters (cudaMalloc calls, retries after a failed malloc, which free the cache and
synchronise). Random-init Llama shapes, as generation_speed.py builds them.

    python benchmarks/prefill_passes.py --shape 1b --shape 8b --out $OUT/prefill_passes.jsonl   # GPU
    python benchmarks/prefill_passes.py --shape mini                                          # CPU rehearsal
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import probe_engine  # noqa: E402  (a sibling script)

PASSES = (341, 171, 64, 72, 80, 96, 64, 88, 104, 70)  # a first wave, then refills of the sizes a run makes


def probe(shape: str, work: Path) -> list[dict]:
    engine, tokenizer, prompts = probe_engine(shape, work, 512, 2048)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stats = torch.cuda.memory_stats if cuda else dict
    rows, seen = [], set()
    with torch.inference_mode():
        for trial in ("first", "again"):  # the same passes twice: their shapes new, then seen
            start = 0
            for n in PASSES:
                batch = prompts[start:start + n]
                start += n
                shape_key = (len(batch), len(batch[0]))
                before = stats()
                sync()
                t0 = time.perf_counter()
                engine.prefill(batch, list(range(len(batch))), tokenizer.pad_token_id)
                sync()
                ms = (time.perf_counter() - t0) * 1000
                after = stats()
                rows.append({"device": device, "shape": shape, "trial": trial, "prompts": len(batch),
                             "width": len(batch[0]), "new_shape": shape_key not in seen, "ms": ms,
                             "ms_per_prompt": ms / len(batch),
                             "cuda_mallocs": after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0),
                             "alloc_retries": after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)})
                seen.add(shape_key)
                print(json.dumps(rows[-1]), flush=True)
                for _ in range(4):  # decode steps between refills, as in a run (a CUDA graph on a GPU)
                    engine.decode()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/titletune-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for shape in args.shape:
        rows = probe(shape, args.work)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            command = "python benchmarks/prefill_passes.py " + " ".join(sys.argv[1:])
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r | {"command": command}) + "\n" for r in rows)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
