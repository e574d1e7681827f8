"""scripts/predict.py over titletune.generation.predict: a file of products (JSONL or CSV) to answers
in input order; malformed lines counted and listed with their line numbers; bad input one line
with nothing written; resuming after a real Ctrl-C and a SIGKILL; a 2-process torchrun run (gloo)
with the same output. The model runs use the session's `pipeline_repo` (conftest) through a copy
with small chunks."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from titletune.generation.predict import Bad, Row, read_rows
from titletune.launch import launch_command
from titletune.testing import ENV, ROOT, run, set_params

N_GOOD = 120
CHUNK_ROWS = 4
MALFORMED = {  # line number in the input -> why it is skipped
    3: "not JSON", 10: "title: missing", 17: "title: empty", 24: "title: not a string (int)",
    31: "not a JSON object (list)", 38: "uid: not a string or a number (dict)",
}


def predict_cmd(*args) -> list[str]:
    return [sys.executable, "scripts/predict.py", *map(str, args)]


def env_for(repo: Path) -> dict:
    # A script run by its path puts scripts/ first on sys.path: PYTHONPATH makes it import the repo's titletune.
    return dict(ENV, PYTHONPATH=str(repo))


def write_products(path: Path, questions: list[str]) -> list[dict]:
    """N_GOOD products (the first ones with the evaluated test questions as their own), with the
    MALFORMED lines and a blank line among them; returns the good rows as written, with line numbers."""
    good, lines = [], []
    while len(good) < N_GOOD:
        line_no = len(lines) + 1
        if line_no in MALFORMED:
            lines.append({3: '{"title": "Broken', 10: '{"uid": "u"}', 17: '{"title": "  "}', 24: '{"title": 7}',
                          31: '["title"]', 38: '{"title": "T", "uid": {"a": 1}}'}[line_no])
        elif line_no == 5:
            lines.append("   ")
        else:
            k = len(good)
            row = {"title": f"Acme Widget {k}, Blue"}
            if k % 3 == 0:
                row["uid"] = f"P{k:04d}"
            if k < len(questions):
                row["question"] = questions[k]
            elif k % 7 == 1:
                row["question"] = "What is {title} made of?"
            good.append(dict(row, line=line_no))
            lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return good


# ---------------------------------------------------------------- reading (no model)

def test_jsonl_rows_and_malformed_lines_with_their_numbers(tmp_path):
    good = write_products(tmp_path / "in.jsonl", [])
    items = list(read_rows(tmp_path / "in.jsonl"))
    assert [(b.line, b.why.split(" (")[0]) for b in items if isinstance(b, Bad)] == \
        [(line, why.split(" (")[0]) for line, why in MALFORMED.items()]
    rows = [r for r in items if isinstance(r, Row)]
    assert [r.line for r in rows] == [g["line"] for g in good]
    assert [r.uid for r in rows] == [g.get("uid", g["line"]) for g in good]   # no uid: the line number


def test_csv_rows_quoted_multiline_bom_and_bad_rows(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes('\ufeffuid,title,question\n'
                     'a1,"Drill, 18V",\n'
                     'a2,"Lamp\nwith two lines",What is {title}?\n'
                     '\n'
                     'a3,Only two\n'
                     ',Kettle,\n'
                     'a5,,\n'.encode("utf-8"))
    items = list(read_rows(path))
    assert items == [Row(2, "a1", "Drill, 18V", None), Row(3, "a2", "Lamp\nwith two lines", "What is {title}?"),
                     Bad(6, "2 fields where the header has 3"), Row(7, 7, "Kettle", None), Bad(8, "title: empty")]


# ---------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "missing.jsonl: not found"),
    ("empty.jsonl", b"", "empty.jsonl: empty: no line holds a product (a row with a `title` field)"),
    ("blank.csv", b"", "blank.csv: empty: no line holds a product"),
    ("latin1.jsonl", b'{"title": "a"}\n{"title": "b"}\n{"title": "caf\xe9"}\n',
     "latin1.jsonl: line 3: not UTF-8 (byte 15 of the line, b'\\xe9')"),
    ("columns.csv", b"name,question\nDrill,What?\n", "columns.csv: line 1: no `title` column in the CSV header "
                                                     "(columns: 'name', 'question')"),
    ("all_bad.jsonl", b'{"name": "x"}\n[1]\n', "all_bad.jsonl: no valid row: 2 malformed lines (line 1: title: missing)"),
    ("products.txt", b"Drill\n", "products.txt: unknown input format '.txt'"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out.jsonl"
    proc = run(predict_cmd(tmp_path / name, out, "--base"), ROOT, check=False, env=env_for(ROOT))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if content is not None else [])


def test_an_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"title": "Drill"}\n')
    (tmp_path / "out.jsonl").write_text("mine\n")
    proc = run(predict_cmd(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--base"), ROOT, check=False, env=env_for(ROOT))
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"error: {tmp_path / 'out.jsonl'}: exists; pass --overwrite to replace it"
    assert (tmp_path / "out.jsonl").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


# ---------------------------------------------------------------- runs of the tiny model
# Session-scoped: under `make test`'s worksteal a worker runs other files' tests between these, and
# a module fixture is torn down and built again each time (3 x 13 s for `answered`).

@pytest.fixture(scope="session")
def predict_repo(pipeline_repo, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("predict") / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    set_params(repo, {"predict": {"chunk_rows": CHUNK_ROWS}})
    return repo


@pytest.fixture(scope="session")
def evaluated(predict_repo) -> list[dict]:
    """evaluate's test examples with the tuned model's answers (metrics/eval_samples.jsonl)."""
    return [json.loads(line) for line in (predict_repo / "metrics/eval_samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def products(predict_repo, evaluated) -> tuple[Path, list[dict]]:
    path = predict_repo.parent / "products.jsonl"
    return path, write_products(path, [e["question"] for e in evaluated])


@pytest.fixture(scope="session")
def answered(predict_repo, products) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One uninterrupted run over the JSONL products: the reference output."""
    out = predict_repo.parent / "answers.jsonl"
    proc = run(predict_cmd(products[0], out), predict_repo, env=env_for(predict_repo), timeout=600)
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_jsonl_answers_in_input_order_with_malformed_lines_reported(answered, products, evaluated, predict_repo):
    proc, rows = answered
    good = products[1]
    assert [r["uid"] for r in rows] == [g.get("uid", g["line"]) for g in good]    # order and completeness
    assert [r["title"] for r in rows] == [g["title"] for g in good]
    assert all(set(r) == {"uid", "title", "answer", "tokens"} for r in rows)
    max_new = 16  # FAST_PARAMS evaluate.max_new_tokens
    assert all(0 <= r["tokens"] <= max_new for r in rows) and any(r["answer"] for r in rows)
    # A row asked one of the evaluated questions gets the answer evaluate got: same prompt, model, settings.
    assert [r["answer"] for r in rows[:len(evaluated)]] == [e["tuned"] for e in evaluated]
    for line, why in MALFORMED.items():
        assert f"products.jsonl: line {line}: {why}" in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"predict: {N_GOOD} rows -> ") and f"{len(MALFORMED)} malformed lines skipped" in summary
    assert "tokens/s" in summary
    assert not (predict_repo.parent / "answers.jsonl.parts").exists()    # the work folder is gone


@pytest.mark.slow
def test_csv_with_the_merged_model(predict_repo, evaluated, tmp_path):
    """CSV input; --model models/merged (plain transformers) answers as base + adapter did."""
    import csv
    path = tmp_path / "products.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["title", "question", "uid"])
        for e in evaluated:
            writer.writerow([e["title"], e["question"], e["uid"]])
        writer.writerow(["Kettle", "Is {title} " + "really " * 1200 + "good?", "too-long"])  # > 1,024 positions
        f.write("only one field\n")
    out = tmp_path / "answers.jsonl"
    proc = run(predict_cmd(path, out, "--model", "models/merged"), predict_repo, env=env_for(predict_repo),
               timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == [e["uid"] for e in evaluated]
    assert [r["answer"] for r in rows] == [e["tuned"] for e in evaluated]
    assert re.search(rf"products.csv: line {len(evaluated) + 2}: question: too long: [\d,]+ tokens with the prompt, "
                     r"where \S*models/merged holds 1,024 positions, 16 of them for the answer \(evaluate.max_new_tokens\): "
                     r"at most 1,008; skipped", proc.stderr), proc.stderr[-2000:]
    assert f"products.csv: line {len(evaluated) + 3}: 1 fields where the header has 3; skipped" in proc.stderr
    assert "1 row too long for the model skipped (listed above)" in proc.stdout


def start(cmd: list, repo: Path) -> subprocess.Popen:
    """A run to interrupt, with SIGINT at its default as in a terminal: a shell's background job
    ignores it, and Python keeps an ignored SIGINT ignored (the run would never see the Ctrl-C)."""
    return subprocess.Popen(cmd, cwd=repo, env=env_for(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def parts_once(work: Path, more_than: int, proc: subprocess.Popen, timeout: float = 600) -> int:
    """Wait until the work folder holds more than `more_than` part files; their count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list(work.glob("part-*.jsonl"))) if work.is_dir() else 0
        if done > more_than:
            return done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no new part in {work} after {timeout} s")


@pytest.mark.slow
def test_resumes_after_ctrl_c_and_kill_without_losing_or_doubling_a_row(predict_repo, products, answered):
    out = predict_repo.parent / "resumed.jsonl"
    work = out.with_name(out.name + ".parts")
    n_chunks = -(-N_GOOD // CHUNK_ROWS)

    first = start(predict_cmd(products[0], out), predict_repo)
    parts_once(work, 0, first)
    first.send_signal(signal.SIGINT)                                   # Ctrl-C
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert f"predict: interrupted; " in err and f"of {n_chunks} parts are done in {work}" in err
    after_first = len(list(work.glob("part-*.jsonl")))
    assert 0 < after_first < n_chunks and not out.exists()

    second = start(predict_cmd(products[0], out), predict_repo)
    parts_once(work, after_first, second)
    second.send_signal(signal.SIGKILL)                                 # no clean-up at all
    second.communicate(timeout=60)
    after_second = len(list(work.glob("part-*.jsonl")))
    assert after_first < after_second < n_chunks and not out.exists()

    proc = run(predict_cmd(products[0], out), predict_repo, env=env_for(predict_repo), timeout=600)
    assert f"{after_second} of {n_chunks} parts from an earlier run" in proc.stdout
    assert out.read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in answered[1]]
    assert not work.exists() and [p.name for p in out.parent.iterdir() if p.name.startswith(".resumed")] == []


@pytest.mark.slow
def test_two_processes_under_torchrun_split_the_chunks_and_keep_the_order(predict_repo, products, answered):
    """The several-GPU path on CPU: torchrun with 2 processes (gloo), as predict.gpus=2 launches it."""
    out = predict_repo.parent / "two_ranks.jsonl"
    cmd = launch_command(2, ["scripts/predict.py", str(products[0]), str(out)])
    proc = run(cmd, predict_repo, env=env_for(predict_repo), timeout=600)
    log = proc.stdout + proc.stderr
    half = -(-N_GOOD // CHUNK_ROWS) // 2
    assert f"predict: rank 0 of 2 answered {half} parts" in log and f"predict: rank 1 of 2 answered {half} parts" in log
    assert log.count(f"predict: {N_GOOD} rows -> ") == 1                       # one summary, from rank 0
    assert out.read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in answered[1]]
