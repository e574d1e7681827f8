"""One test per bad input to the data stages: exit code 2 and one line that names the problem
(file, line, field or params key), never a bare traceback, and no half-written output."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

from conftest import ROOT, run

GOOD = [{"uid": f"B{i:04d}", "title": f"Product title {i}", "content": f"A long enough description {i}.",
         "target_ind": [1], "target_rel": [1.0]} for i in range(10)]


def lines(records: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def fails(cmd: list[str], cwd: Path, *needles: str) -> str:
    proc = run([sys.executable, *cmd], cwd, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def decompress_fails(src: Path, *needles: str) -> None:
    out = src.parent / "out" / "trn.jsonl"
    fails(["stages/decompress.py", str(src), str(out)], ROOT, str(src), *needles)
    assert not out.exists()


def preprocess_fails(src: Path, *needles: str, cwd: Path = ROOT) -> None:
    out = src.parent / "processed"
    fails(["stages/preprocess.py", str(src), str(out), str(src.parent / "data.json")], cwd, *needles)
    assert not out.exists()


# ---------------------------------------------------------------- decompress

def test_truncated_gzip(tmp_path):
    src = tmp_path / "trn.json.gz"
    data = gzip.compress(lines(GOOD * 50))
    src.write_bytes(data[: len(data) // 2])
    decompress_fails(src, "truncated or corrupt")


def test_corrupt_gzip(tmp_path):
    src = tmp_path / "trn.json.gz"
    data = bytearray(gzip.compress(lines(GOOD * 50)))
    data[40:60] = b"\x00" * 20
    src.write_bytes(bytes(data))
    decompress_fails(src, "truncated or corrupt")


def test_non_utf8_bytes(tmp_path):
    src = tmp_path / "trn.json.gz"
    src.write_bytes(gzip.compress(lines(GOOD[:2]) + b'{"uid": "x", "title": "caf\xe9"}\n'))
    decompress_fails(src, "line 3", "not UTF-8")


def test_empty_source(tmp_path):
    src = tmp_path / "trn.json.gz"
    src.write_bytes(b"")
    decompress_fails(src, "empty")


def test_missing_source(tmp_path):
    decompress_fails(tmp_path / "nope.json.gz", "not found")


def test_zip_without_the_member(tmp_path):
    import zipfile
    src = tmp_path / "corpus.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("a.txt", "x")
        z.writestr("b.txt", "y")
    decompress_fails(src, "trn.json.gz")


# ---------------------------------------------------------------- preprocess

def test_malformed_json_line(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(lines(GOOD[:3] + ['{"uid": "B9", "title": "x", "content": '] + GOOD[3:]))
    preprocess_fails(src, "line 4", "not valid JSON", "max_bad_fraction")


def test_missing_field(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(lines(GOOD[:1] + [{"uid": "B9", "title": "no content"}] + GOOD[1:]))
    preprocess_fails(src, "line 2: content: missing")


def test_non_string_title(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(lines(GOOD[:5] + [{"uid": "B9", "title": 1234, "content": "text text text text x"}]))
    preprocess_fails(src, "line 6: title: not a string")


def test_empty_file(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(b"")
    preprocess_fails(src, "empty")


def test_no_usable_record(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(lines([dict(r, content="") for r in GOOD]))
    preprocess_fails(src, "no usable record", "empty_content 10")


# ---------------------------------------------------------------- params (in a copy of the repo)

def with_params(repo: Path, **preprocess) -> Path:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"].update(preprocess)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    src = repo / "in" / "trn.jsonl"
    src.parent.mkdir()
    src.write_bytes(lines(GOOD))
    return src


def test_unknown_params_key(repo):
    src = with_params(repo, min_title_char=3)
    preprocess_fails(src, "params.yaml", "preprocess.min_title_char", "unknown key", cwd=repo)


def test_wrongly_typed_params_key(repo):
    src = with_params(repo, min_content_chars="twenty")
    preprocess_fails(src, "params.yaml", "preprocess.min_content_chars", "expected int", cwd=repo)


def test_bad_boilerplate_regex(repo):
    src = with_params(repo, boilerplate_patterns=["--This text (refers"])
    preprocess_fails(src, "preprocess.boilerplate_patterns[0]", cwd=repo)


def test_split_fractions_out_of_range(repo):
    src = with_params(repo, val_fraction=0.6, test_fraction=0.5)
    preprocess_fails(src, "val_fraction + test_fraction", cwd=repo)
