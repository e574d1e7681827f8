"""scripts/ask.py: a free question to the tuned model, answered as evaluate answers it."""
from __future__ import annotations

import importlib.util
import io
import sys

import pytest

from titletune.testing import ENV, ROOT, run


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_ask_streams_the_tuned_answer(model_runs):
    proc = model_runs["ask"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Greedy: the same answer as evaluate's batched generation for this question.
    assert words(model_runs["asked"]["tuned"]) in words(proc.stdout)


def test_ask_without_adapter_says_run_dvc_repro(tmp_path):
    # PYTHONPATH: a script run by its path imports titletune from this checkout, not the venv's install
    proc = run([sys.executable, "scripts/ask.py", "--adapter", str(tmp_path / "none"), "What is X?"],
               ROOT, check=False, env=dict(ENV, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert "no trained adapter" in proc.stderr and "dvc repro" in proc.stderr and "Traceback" not in proc.stderr


def test_ask_reads_questions_until_empty_line_or_eof(monkeypatch):
    spec = importlib.util.spec_from_file_location("ask", ROOT / "scripts" / "ask.py")
    ask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ask)
    assert list(ask.questions("What is X?")) == ["What is X?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is A?\n  What is B?  \n\nignored\n"))
    assert list(ask.questions(None)) == ["What is A?", "What is B?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is C?"))
    assert list(ask.questions(None)) == ["What is C?"]
