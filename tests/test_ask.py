"""scripts/ask.py: a free question to the tuned model, answered as evaluate answers it."""
from __future__ import annotations

import importlib.util
import io
import re
import subprocess
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


def test_ask_reads_questions_until_eof_and_skips_blank_lines(monkeypatch):
    spec = importlib.util.spec_from_file_location("ask", ROOT / "scripts" / "ask.py")
    ask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ask)
    assert list(ask.questions(" What is X? ")) == [("question", "What is X?")]
    # an empty line does not end it (#22): only EOF (Ctrl-D) does
    monkeypatch.setattr("sys.stdin", io.StringIO("What is A?\n  What is B?  \n\n \nWhat is D?\n"))
    assert list(ask.questions(None)) == [("line 1", "What is A?"), ("line 2", "What is B?"), ("line 5", "What is D?")]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is C?"))
    assert list(ask.questions(None)) == [("line 1", "What is C?")]


@pytest.mark.parametrize("question, error", [
    ("", 'error: question: empty; ask about a product, e.g. "What is <product title>?"'),
    (" \t ", 'error: question: empty; ask about a product, e.g. "What is <product title>?"'),
    (b"What is \xff?", "error: question: not UTF-8 (byte 0xff)"),
])
def test_ask_refuses_an_empty_or_undecodable_question_before_loading(question, error):
    proc = run([sys.executable, "scripts/ask.py", question], ROOT, check=False, env=dict(ENV, PYTHONPATH=str(ROOT)))
    assert (proc.returncode, proc.stderr) == (2, error + "\n")


@pytest.mark.slow
def test_ask_skips_on_stdin_what_it_cannot_answer_and_reads_to_eof():
    """Blank lines, bytes that are not UTF-8 and a question longer than the model's 1,024 positions
    (less max_new_tokens) are skipped with one line each (before: an answer, the end of the session, a
    TypeError, an answer without a word); the questions after them are answered."""
    long_question = "What is " + "very " * 3000 + "blue mug?"
    stdin = b"What is Blue Mug?\n\n  \nWhat is \xff\xfe?\n" + long_question.encode() + b"\nWhat is Red Mug?"
    proc = subprocess.run([sys.executable, "scripts/ask.py", "--base"], cwd=ROOT, input=stdin, capture_output=True,
                          env=dict(ENV, PYTHONPATH=str(ROOT)))
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert re.search(r"^ask: line 4: not UTF-8 \(byte 0xff\); skipped$", err, re.M), err[-2000:]
    assert re.search(r"^ask: line 5: too long: [\d,]+ tokens with the prompt, where models/tiny-llama holds 1,024 "
                     r"positions, 64 of them for the answer \(evaluate.max_new_tokens\): at most 960; skipped$",
                     err, re.M), err[-2000:]
    assert err.rstrip().endswith("ask: 2 question(s) answered, 2 skipped")
