"""decompress: every input kind gives the same JSON lines, streamed in blocks."""
from __future__ import annotations

import gzip
import sys
import zipfile
from pathlib import Path

import pytest

import decompress as D  # stages/ is on sys.path (conftest)
from conftest import ROOT, run

LINES = ('{"uid": "B1", "title": "Caf\u00e9 \u2019s", "content": "\u4e2d\u6587 \U0001f600 text"}\n'
         '{"uid": "B2", "title": "Two", "content": ""}\n').encode("utf-8") * 50


def decompress(src: Path, out: Path) -> str:
    proc = run([sys.executable, "stages/decompress.py", str(src), str(out)], ROOT)
    return proc.stdout


def make(kind: str, tmp_path: Path, payload: bytes = LINES) -> Path:
    if kind == "json":
        path = tmp_path / "trn.json"
        path.write_bytes(payload)
    elif kind == "gz":
        path = tmp_path / "trn.json.gz"
        path.write_bytes(gzip.compress(payload))
    elif kind == "zip":               # as the corpus ships: a folder with trn.json.gz and more
        path = tmp_path / "AmazonTitles-1.3MM.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("AmazonTitles-1.3MM/lbl.json.gz", gzip.compress(b"{}\n"))
            z.writestr("AmazonTitles-1.3MM/trn.json.gz", gzip.compress(payload))
            z.writestr("AmazonTitles-1.3MM/tst.json.gz", gzip.compress(b"{}\n"))
    elif kind == "zip-json":          # a zip of a single plain member
        path = tmp_path / "data.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("data.json", payload)
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["json", "gz", "zip", "zip-json"])
def test_every_kind_gives_the_same_lines(kind, tmp_path):
    out = tmp_path / "out" / "trn.jsonl"
    summary = decompress(make(kind, tmp_path), out)
    assert out.read_bytes() == LINES
    assert "100 lines" in summary and " s " in summary + " "


def test_a_missing_last_newline_is_added(tmp_path):
    out = tmp_path / "trn.jsonl"
    decompress(make("gz", tmp_path, LINES.rstrip(b"\n")), out)
    assert out.read_bytes() == LINES


def test_characters_split_between_blocks(tmp_path, monkeypatch, capsys):
    """Tiny blocks cut multi-byte characters and lines anywhere: still the same bytes."""
    src, out = make("gz", tmp_path), tmp_path / "trn.jsonl"
    monkeypatch.setattr(D, "BLOCK", 7)
    monkeypatch.setattr(sys, "argv", ["decompress.py", str(src), str(out)])
    D.main()
    assert out.read_bytes() == LINES
    assert "100 lines" in capsys.readouterr().out


def test_bad_byte_line_number_with_tiny_blocks(tmp_path, monkeypatch):
    lines = LINES.split(b"\n")
    lines[41] = lines[41].replace(b"Two", b"T\xffo")                   # line 42
    src = make("gz", tmp_path, b"\n".join(lines))
    monkeypatch.setattr(D, "BLOCK", 5)
    monkeypatch.setattr(sys, "argv", ["decompress.py", str(src), str(tmp_path / "o.jsonl")])
    with pytest.raises(D.UserError, match="line 42: not UTF-8"):
        D.main()
    assert not (tmp_path / "o.jsonl").exists()


def test_the_committed_sample(tmp_path):
    out = tmp_path / "trn.jsonl"
    decompress(ROOT / "data" / "sample" / "trn.json.gz", out)
    assert out.read_bytes() == gzip.decompress((ROOT / "data" / "sample" / "trn.json.gz").read_bytes())
