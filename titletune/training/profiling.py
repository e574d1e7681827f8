"""Steady-state speed and an optional torch.profiler trace of one training step (Trainer callbacks).

Set TITLETUNE_PROFILE_DIR=DIR to profile one step of the train stage (or a benchmark) after warm-up:
DIR/profile_step_rank<R>.txt gets the top kernels and operators by device time and
DIR/profile_memory_rank<R>.txt the allocator's summary, one pair per rank. Off by default: profiling slows the step it watches.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from titletune import launch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Throughput(TrainerCallback):
    """Real (non-padding) tokens per second of the training steps themselves, after warm-up.

    Only the time from a step's start to its end counts: evaluation, checkpointing and logging
    between steps are left out (the overall rate in train.json includes them).
    """

    warmup_steps = 3

    def __init__(self):
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        self.skip_steps: set[int] = set()  # e.g. a profiled step, slowed by the profiler
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        skip = state.global_step <= self.warmup_steps or state.global_step in self.skip_steps
        if self._start is not None and not skip:
            t0, n0 = self._start
            self.seconds += time.perf_counter() - t0
            self.tokens += state.num_input_tokens_seen - n0
            self.steps += 1
        self._start = None

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def mean_step_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


class ProfileOneStep(TrainerCallback):
    """torch.profiler over one optimizer step (`step`), written as tables under `out_dir`; the
    Throughput given leaves that step out."""

    def __init__(self, out_dir: Path | str, throughput: Throughput, step: int = 6):
        self.out_dir, self.step, self.prof = Path(out_dir), step, None
        throughput.skip_steps.add(step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.reset_peak_memory_stats()
            self.prof = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None:
            return
        _sync()
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = launch.rank()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        (self.out_dir / f"profile_step_rank{rank}.txt").write_text(f"step {state.global_step}\n{table}\n")
        if torch.cuda.is_available():
            (self.out_dir / f"profile_memory_rank{rank}.txt").write_text(
                f"peak allocated in the step: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB\n"
                + torch.cuda.memory_summary(abbreviated=True))
        self.prof = None


def profile_callbacks(throughput: Throughput) -> list[TrainerCallback]:
    """[ProfileOneStep] when TITLETUNE_PROFILE_DIR is set, else []."""
    out_dir = os.environ.get("TITLETUNE_PROFILE_DIR")
    return [ProfileOneStep(out_dir, throughput)] if out_dir else []


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch (GB); on CPU, the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
