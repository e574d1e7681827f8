"""What a prefill pass of a never-seen shape costs beyond the same pass seen before, with cuDNN's
SDPA kernel allowed (PyTorch's default) and not (the engine's way, engine.sdpa_without_cudnn): each
pass timed (synchronised) the first time its shape (prompts x padded width) runs and again, the
first pair of each setting under torch.profiler (its tables show which operator took the time).
Random-init Llama shapes, as generation_speed.py builds them.

    python benchmarks/prefill_first_width.py --shape 8b > benchmarks/results/prefill_first_width_<card>.log  # GPU
    python benchmarks/prefill_first_width.py --shape mini                                                 # CPU rehearsal
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import probe_engine  # noqa: E402  (a sibling script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/titletune-bench"))
    args = ap.parse_args()
    import titletune.generation.engine as engine_module
    without_cudnn = engine_module.sdpa_without_cudnn
    engine, tokenizer, prompts = probe_engine(args.shape, args.work, 512, 2048)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def timed(batch, label, profiled):
        sync()
        start = time.perf_counter()
        with profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
            engine.prefill(batch, list(range(len(batch))), tokenizer.pad_token_id)
            sync()
        ms = (time.perf_counter() - start) * 1000
        print(f"{label}: {len(batch)} x {len(batch[0])}: {ms:.1f} ms", flush=True)
        if profiled:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=70))
            if cuda:
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10,
                                                max_name_column_width=70), flush=True)
        return ms

    start = 0
    with torch.inference_mode():
        timed(prompts[:300], "warm-up", profiled=False)
        for cudnn in (True, False):
            engine_module.sdpa_without_cudnn = contextlib.nullcontext if cudnn else without_cudnn
            for n in (64, 72, 80):
                start += 40  # prompts of a width not seen yet (sorted longest first)
                batch = prompts[start:start + n]
                new = timed(batch, f"cudnn_sdp={cudnn} new", profiled=n == 64)
                seen = timed(batch, f"cudnn_sdp={cudnn} seen", profiled=n == 64)
                print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "CPU", "shape": args.shape,
                                  "cudnn_sdp": cudnn, "prompts": n, "width": len(batch[0]), "new_ms": new,
                                  "seen_ms": seen}), flush=True)


if __name__ == "__main__":
    main()
