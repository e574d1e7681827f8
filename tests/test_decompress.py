"""Stage `decompress` (stages/decompress.py): every input kind gives the same JSON lines, streamed
in blocks; a damaged input is one clear line and no output."""
from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from stages import decompress as D
from titletune.testing import ROOT, run, set_params

LINES = ('{"uid": "B1", "title": "Caf\u00e9 \u2019s", "content": "\u4e2d\u6587 \U0001f600 text"}\n'
         '{"uid": "B2", "title": "Two", "content": ""}\n').encode("utf-8") * 50


def decompress(src: Path, out: Path) -> str:
    proc = run([sys.executable, "-m", "stages.decompress", str(src), str(out)], ROOT)
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


@pytest.mark.parametrize("kind, detected", [
    ("json", "plain"), ("gz", "gzip"), ("zip", "zip member AmazonTitles-1.3MM/trn.json.gz"),
    ("zip-json", "zip member data.json")])
def test_every_kind_gives_the_same_lines(kind, detected, tmp_path):
    src, out = make(kind, tmp_path), tmp_path / "out" / "trn.jsonl"
    summary = decompress(src, out)
    assert out.read_bytes() == LINES
    # The summary names the source, what it was found to be, the output, the lines and the size.
    match = re.fullmatch(rf"decompress: (.+) \((.+)\) -> (.+): 100 lines, ([\d.]+) MB in ([\d.]+) s "
                         rf"\(([\d,]+) MB/s\)\n", summary)
    assert match, summary
    assert match.groups()[:4] == (str(src), detected, str(out), f"{len(LINES) / 1e6:.1f}")
    assert sorted(p.name for p in out.parent.iterdir()) == ["trn.jsonl"]     # no temp file left


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
    assert ": 100 lines, " in capsys.readouterr().out


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


# ---------------------------------------------------------------- bad input: exit 2, one line, no output

GOOD = [{"uid": f"B{i:04d}", "title": f"Product title {i}", "content": f"A long enough description {i}.",
         "target_ind": [1], "target_rel": [1.0]} for i in range(10)]


def jsonl(records: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def fails(src: Path, *needles: str) -> str:
    out = src.parent / "out" / "trn.jsonl"
    proc = run([sys.executable, "-m", "stages.decompress", str(src), str(out)], ROOT, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {src}: "), proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    return errors[0]


def test_truncated_gzip(tmp_path):
    src = tmp_path / "trn.json.gz"
    data = gzip.compress(jsonl(GOOD * 50))
    src.write_bytes(data[: len(data) // 2])
    # what was read, not "after 0 bytes (0 lines)": the first block already fails
    fails(src, "truncated or corrupt gzip file: ", f"(after reading {len(data) // 2:,} of its {len(data) // 2:,} bytes)")


def test_truncated_gzip_after_good_blocks(tmp_path, monkeypatch):
    src = tmp_path / "trn.json.gz"
    data = gzip.compress(jsonl(GOOD * 50), compresslevel=0)      # stored: the cut lands after many lines
    src.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(D, "BLOCK", 1000)
    monkeypatch.setattr(sys, "argv", ["decompress.py", str(src), str(tmp_path / "o.jsonl")])
    with pytest.raises(D.UserError, match=r"truncated or corrupt gzip file: .* \(after reading [\d,]+ of its "
                                          rf"{len(data) // 2:,} bytes and [\d,]+ good lines\)$") as err:
        D.main()
    read, lines = (int(n.replace(",", "")) for n in re.search(r"reading ([\d,]+) .* and ([\d,]+) good", str(err.value)).groups())
    assert 0 < read <= len(data) // 2 and 0 < lines < 500
    assert not (tmp_path / "o.jsonl").exists()


def test_corrupt_gzip(tmp_path):
    src = tmp_path / "trn.json.gz"
    data = bytearray(gzip.compress(jsonl(GOOD * 50)))
    data[40:60] = b"\x00" * 20
    src.write_bytes(bytes(data))
    fails(src, "truncated or corrupt gzip file")


def test_non_utf8_bytes(tmp_path):
    src = tmp_path / "trn.json.gz"
    src.write_bytes(gzip.compress(jsonl(GOOD[:2]) + b'{"uid": "x", "title": "caf\xe9"}\n'))
    fails(src, "line 3: not UTF-8 (byte b'\\xe9': invalid continuation byte)")


def test_empty_source(tmp_path):
    src = tmp_path / "trn.json.gz"
    src.write_bytes(b"")
    fails(src, "empty, no records to read")


def test_missing_source(tmp_path):
    fails(tmp_path / "nope.json.gz", "not found (data.source in params.yaml)")


def test_zip_without_the_member(tmp_path):
    src = tmp_path / "corpus.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("a.txt", "x")
        z.writestr("b.txt", "y")
    fails(src, "zip has no member trn.json.gz", "members: ['a.txt', 'b.txt']")


def test_a_line_too_long_is_not_json_lines(tmp_path, monkeypatch):
    src = make("json", tmp_path, b"x" * 200)
    monkeypatch.setattr(D, "BLOCK", 16)
    monkeypatch.setattr(D, "MAX_LINE", 64)
    monkeypatch.setattr(sys, "argv", ["decompress.py", str(src), str(tmp_path / "o.jsonl")])
    with pytest.raises(D.UserError, match="line 1 is longer than 0 MB: not JSON lines"):
        D.main()


# ---------------------------------------------------------------- no file name reaches a shell (#13)

def test_a_source_named_like_a_command_is_only_a_name(repo):
    """dvc.yaml runs decompress without data.source in its command: the stage reads it from
    params.yaml, so a file named `x$(touch PWNED).json.gz` is read, not run."""
    name = "data/x$(touch PWNED).json.gz"
    shutil.copy(repo / "data/sample/trn.json.gz", repo / name)
    set_params(repo, {"data": {"source": name}})
    proc = run(["dvc", "repro", "decompress"], repo)
    assert "> python -m stages.decompress data/interim/trn.jsonl\n" in proc.stdout
    assert f"decompress: {name} (gzip) -> data/interim/trn.jsonl: 4,000 lines" in proc.stdout
    assert not list(repo.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    assert (repo / "data/interim/trn.jsonl").read_bytes() == gzip.decompress((repo / name).read_bytes())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["decompress"]
    assert name in [d["path"] for d in lock["deps"]]
    assert lock["params"]["params.yaml"] == {"data.source": name}


# ---------------------------------------------------------------- hostile sources (#22)

def test_a_directory_is_not_reported_missing(tmp_path):
    (tmp_path / "corpus").mkdir()
    fails(tmp_path / "corpus", "is a directory, not a file (data.source in params.yaml")


def test_a_zip_with_two_members_of_one_name_is_refused(tmp_path):
    src = tmp_path / "corpus.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(src, "w") as z:
        z.writestr("AmazonTitles-1.3MM/trn.json.gz", gzip.compress(jsonl(GOOD)))
        z.writestr("AmazonTitles-1.3MM/trn.json.gz", gzip.compress(jsonl(GOOD[:1])))
    fails(src, "zip has 2 members named AmazonTitles-1.3MM/trn.json.gz: cannot tell which one is the corpus")


def test_an_encrypted_or_damaged_zip_is_one_line(tmp_path):
    src = make("zip", tmp_path)
    data = bytearray(src.read_bytes())
    at = data.index(b"PK\x03\x04", 4)                    # the local header of trn.json.gz: mark it encrypted
    data[at + 6] |= 0x1
    at = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)   # and its central directory entry
    data[at + 8] |= 0x1
    src.write_bytes(bytes(data))
    fails(src, "zip member AmazonTitles-1.3MM/trn.json.gz is encrypted")
    src.write_bytes(b"PK\x03\x04 and nothing of a zip after it")
    fails(src, "truncated or corrupt zip file: File is not a zip file")


@pytest.mark.parametrize("indent", [2, None])
def test_a_json_array_is_named_and_how_to_convert_it(tmp_path, indent):
    src = tmp_path / "trn.json"
    src.write_text(json.dumps(GOOD, indent=indent))
    fails(src, "a JSON array, not JSON lines (one record a line); convert it first, e.g. "
               "`jq -c '.[]' trn.json > trn.jsonl`")


def test_pretty_printed_records_are_named_and_how_to_convert_them(tmp_path):
    src = tmp_path / "trn.json"
    src.write_text("".join(json.dumps(r, indent=2) + "\n" for r in GOOD))       # `jq .` output
    fails(src, "pretty-printed JSON (a record over several lines), not JSON lines (one record a line); "
               "convert it first, e.g. `jq -c . trn.json > trn.jsonl`")


def test_a_byte_order_mark_is_dropped(tmp_path):
    out = tmp_path / "trn.jsonl"
    decompress(make("gz", tmp_path, b"\xef\xbb\xbf" + LINES), out)
    assert out.read_bytes() == LINES


def test_a_gzip_bomb_stops_at_the_expansion_limit(tmp_path):
    # 80 MB of one repeated line in ~270 KB: 300x, where the corpus is ~2x; refused after the
    # 64 MB floor, without an output
    src = tmp_path / "trn.json.gz"
    src.write_bytes(gzip.compress(jsonl(GOOD[:1]) * (80_000_000 // len(jsonl(GOOD[:1]))), compresslevel=9))
    assert src.stat().st_size < 400_000
    fails(src, f"expands to more than {D.MAX_EXPANSION} times its {src.stat().st_size:,} bytes (a zip or gzip bomb?)")


def test_the_output_as_its_own_source_is_refused(repo):
    """data.source is not on the command line (command_line refuses SOURCE = OUT there): the stage
    checks it (`dvc repro` refuses it too: a dep that is its own out)."""
    out = repo / "data" / "interim" / "trn.jsonl"
    out.parent.mkdir(parents=True)
    out.write_bytes(LINES)
    set_params(repo, {"data": {"source": "data/interim/trn.jsonl"}})
    proc = run([sys.executable, "-m", "stages.decompress", "data/interim/trn.jsonl"], repo, check=False)
    assert proc.returncode == 2 and proc.stderr.endswith("error: data/interim/trn.jsonl: is the output of decompress "
                                                         "itself; data.source names the corpus file\n"), proc.stderr
    assert out.read_bytes() == LINES
