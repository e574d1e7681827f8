"""titletune/training/profiling.py: steady-state throughput of the training steps, one profiled step."""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from titletune.training.profiling import Throughput, profile_callbacks


def steps(callbacks, n: int, tokens_per_step: int, seconds: float, work=None):
    """Drive the callbacks as the Trainer does: begin, (work), end, with global_step and token count."""
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    for _ in range(n):
        for cb in callbacks:
            cb.on_step_begin(None, state, None)
        (work or (lambda: time.sleep(seconds)))()
        state.global_step += 1
        state.num_input_tokens_seen += tokens_per_step
        for cb in callbacks:
            cb.on_step_end(None, state, None)
        time.sleep(seconds)  # between steps (evaluation, logging): never counted
    return state


def test_throughput_counts_only_the_steps_after_warm_up():
    throughput = Throughput()
    steps([throughput], n=Throughput.warmup_steps + 4, tokens_per_step=1000, seconds=0.02)
    assert throughput.steps == 4 and throughput.tokens == 4000
    # 1000 tokens per ~0.02 s of step time; the equal time between steps is left out
    assert 25_000 < throughput.tokens_per_s() < 50_000
    assert 0.015 < throughput.mean_step_s() < 0.04


def test_profile_one_step_writes_the_top_operators_and_leaves_that_step_out_of_the_throughput(tmp_path, monkeypatch):
    monkeypatch.setenv("TITLETUNE_PROFILE_DIR", str(tmp_path))
    throughput = Throughput()
    (profiler,) = profile_callbacks(throughput)
    assert profiler.step == 6
    a = torch.randn(256, 256)
    steps([throughput, profiler], n=7, tokens_per_step=100, seconds=0.0, work=lambda: a @ a)
    table = (tmp_path / "profile_step_rank0.txt").read_text()
    assert table.startswith("step 6") and "aten::mm" in table
    assert throughput.steps == 3 and throughput.tokens == 300  # steps 4, 5 and 7; 6 was profiled


def test_no_profiling_unless_asked(monkeypatch):
    monkeypatch.delenv("TITLETUNE_PROFILE_DIR", raising=False)
    assert profile_callbacks(Throughput()) == []
