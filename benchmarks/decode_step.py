"""The generation engine's costs, one piece at a time: a decode step over n slots (CUDA graph and
eager), the capture of a step's graph, and a prefill pass, on random-init Llama shapes.

    python benchmarks/decode_step.py --shape 1b --shape 8b --out $OUT/decode_step.jsonl   # GPU
    python benchmarks/decode_step.py --shape mini --slots 64                              # CPU rehearsal
    python benchmarks/decode_step.py --shape 8b --slots 512 --profile                      # where the time goes

These are the numbers the engine's choices rest on: how much a step over fewer slots saves (the
tail of a run, once no prompt waits, shrinks the step to its busy slots), whether more slots than
MAX_GPU_SLOTS would pay, and what a refill's prefill pass costs against a decode step. One JSON
line per measurement: device, shape, what (step/capture/prefill), slots or prompts, ms, graph.
With --profile, also the operators that one full prefill pass and one step over every slot spend
their time in (what: profile), largest first: whether a pass's time per token is its matrix
products or the rest.
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


def timed(fn, repeat: int) -> float:
    """Milliseconds per call of fn (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) * 1000 / repeat


def operators(fn, top: int) -> list[dict]:
    """fn's operators by their own time, largest first, with each one's share of the whole: on a
    GPU its kernels' device time, on a CPU its operators' CPU time; fn runs once untimed before."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:  # the kernels only, as torch's own table totals them: an aten op's self device time is its kernels'
        own = lambda e: 0 if e.device_type == DeviceType.CPU or e.is_user_annotation else e.self_device_time_total  # noqa: E731
    else:
        own = lambda e: e.self_cpu_time_total  # noqa: E731
    events = sorted((e for e in prof.key_averages() if own(e) > 0), key=own, reverse=True)
    total = sum(map(own, events))
    return [{"op": e.key, "calls": e.count, "ms": own(e) / 1000, "share": own(e) / total, "total_ms": total / 1000}
            for e in events[:top]]


def probe(shape: str, work: Path, most_slots: int, repeat: int, profile: bool = False) -> list[dict]:
    from titletune.generation.engine import PREFILL_TOKENS
    engine, tokenizer, prompts = probe_engine(shape, work, most_slots, most_slots)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = []

    def row(**fields):
        rows.append({"device": device, "shape": shape, **fields})
        print(json.dumps(rows[-1]), flush=True)

    with torch.inference_mode():
        for n_prompts in (64, PREFILL_TOKENS // len(prompts[0])):  # a refill's pass; a full pass of the first wave
            batch = prompts[:min(n_prompts, most_slots)]
            ms = timed(lambda: engine.prefill(batch, list(range(len(batch))), tokenizer.pad_token_id), repeat=3)
            row(what="prefill", prompts=len(batch), width=len(batch[0]), ms=ms)
        for start in range(0, most_slots, 64):  # every slot busy with a real prompt
            engine.prefill(prompts[start:start + 64], list(range(start, min(start + 64, most_slots))),
                           tokenizer.pad_token_id)
        for n in [most_slots >> k for k in range(most_slots.bit_length()) if most_slots >> k >= 8]:
            slots = engine.state.first(n)
            eager = timed(lambda: engine.step(slots), repeat=max(2, repeat // 4))
            graph, error, capture_ms = None, None, None
            if torch.cuda.is_available():
                start = time.perf_counter()
                try:
                    graph = engine.capture(n)
                    torch.cuda.synchronize()
                except RuntimeError as err:
                    error = str(err).splitlines()[0][:300]
                capture_ms = (time.perf_counter() - start) * 1000
            replay = timed(graph.replay, repeat) if graph is not None else None
            row(what="step", slots=n, cache_columns=len(engine.columns), eager_ms=eager, graph_ms=replay,
                capture_ms=capture_ms, capture_error=error,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None)
            if graph is not None:
                engine.graphs[n] = graph  # later captures share its memory pool, as in a run
        if profile:
            full = prompts[:min(PREFILL_TOKENS // len(prompts[0]), most_slots)]
            passes = {"prefill": lambda: engine.prefill(full, list(range(len(full))), tokenizer.pad_token_id),
                      "step": lambda: engine.step(engine.state.first(most_slots))}  # eager: the graph's kernels
            for of, fn in passes.items():
                for op in operators(fn, top=15):
                    row(what="profile", of=of, prompts=len(full) if of == "prefill" else None,
                        slots=most_slots if of == "step" else None, **op)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True)
    ap.add_argument("--slots", type=int, default=1024, help="the most slots measured (then halved down to 8)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/titletune-bench"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="also the operators of one full prefill pass and one step")
    args = ap.parse_args()
    rows = []
    for shape in args.shape:
        rows += probe(shape, args.work, args.slots, args.repeat, args.profile)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next shape's model and cache start from free memory
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/decode_step.py " + " ".join(sys.argv[1:])
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r | {"command": command}) + "\n" for r in rows)


if __name__ == "__main__":
    main()
