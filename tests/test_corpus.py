"""titletune/data/corpus.py: parsing blocks, naming bad lines, hashing, the split, de-duplication keys,
block planning and the Parquet writer."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titletune.data import corpus
from titletune.data.corpus import (SCHEMA, Seen, SplitWriter, check_line, pair_hash, parse_fast, parse_slow, plan_blocks,
                                   split_of, uid_hash)


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


GOOD = {"uid": "B1", "title": "A title", "content": "A description.", "target_ind": [1]}


@pytest.mark.parametrize("line, problem", [
    (b'{"uid": "B9", "title": "x", "content": ', ("-", "not valid JSON (Expecting value, column 40)")),
    (b'["uid", "title"]', ("-", "not a JSON object but list")),
    (b'{"uid": "B9", "title": "no content"}', ("content", "missing")),
    (b'{"uid": "B9", "title": 1234, "content": "x"}', ("title", "not a string but int 1234")),
    (b'{"uid": "B9", "title": null, "content": "x"}', ("title", "not a string but null null")),
    (b'{"uid": "  ", "title": "t", "content": "x"}', ("uid", "empty")),
    (b'{"uid": "B9", "title": "\\ud800", "content": "x"}', ("title", "invalid unicode escape (lone surrogate)")),
    (b'{"uid": "B9", "title": "caf\xe9", "content": "x"}', ("-", "not UTF-8")),
])
def test_check_line_names_the_field_and_the_problem(line, problem):
    assert check_line(line) == (None, problem)


def test_check_line_accepts_a_record_and_ignores_other_fields():
    rec, problem = check_line(json.dumps(GOOD).encode())
    assert problem is None and rec["uid"] == "B1"


def test_parse_fast_takes_a_clean_block_and_refuses_an_odd_one():
    data = jsonl(GOOD, dict(GOOD, uid="B2"))
    table = parse_fast(data, 2)
    assert table.schema == SCHEMA and table["uid"].to_pylist() == ["B1", "B2"]
    assert parse_fast(jsonl(GOOD, b"not json"), 2) is None                 # a bad line
    assert parse_fast(jsonl(GOOD, {"uid": "B3", "title": "t"}), 2) is None  # a missing field
    assert parse_fast(jsonl(GOOD, dict(GOOD, uid=" ")), 2) is None          # an empty uid
    assert parse_fast(jsonl(GOOD) + b"\n", 2) is None                       # a blank line: rows != lines


def test_parse_slow_keeps_good_records_and_numbers_bad_lines():
    data = jsonl(GOOD, b"not json", dict(GOOD, uid="B2"), b"", {"uid": "B3", "title": "t"})
    table, n_records, bad, n_bad = parse_slow(data)
    assert table["uid"].to_pylist() == ["B1", "B2"]
    assert (n_records, n_bad) == (4, 2)        # the blank line 4 is not a record
    assert [(no, field) for no, field, _ in bad] == [(2, "-"), (5, "content")]


def test_uid_hash_is_stable_and_salted():
    uids = pa.chunked_array([["B1", "B2", "B1"]])
    split_h, rank = uid_hash("salt", uids)
    assert split_h[0] == split_h[2] and rank[0] == rank[2] and split_h[0] != split_h[1]
    assert (split_h != rank).all()                       # two independent hashes
    other, _ = uid_hash("pepper", uids)
    assert (other != split_h).all()
    assert uid_hash("salt", pa.chunked_array([["B2"]]))[0][0] == split_h[1]   # independent of the batch


def test_pair_hash_of_equal_pairs():
    h = pair_hash(pa.chunked_array([["t", "t", "tc", "t"]]), pa.chunked_array([["c", "c", "", "cx"]]))
    assert h[0] == h[1] and len(set(h.tolist())) == 3   # "t"+"c" is not "tc"+"": NUL in between


def test_split_of_thresholds():
    top = 2**64
    hashes = np.array([0, int(0.049 * top), int(0.051 * top), int(0.099 * top), int(0.101 * top), top - 1],
                      dtype=np.uint64)
    assert split_of(hashes, 0.05, 0.05).tolist() == [2, 2, 1, 1, 0, 0]
    assert split_of(hashes, 0.0, 0.0).tolist() == [0] * 6


def test_seen_keys_match_a_python_set():
    rng = np.random.default_rng(0)
    seen, ref = Seen(), set()
    for _ in range(50):
        keys = rng.integers(0, 3000, size=rng.integers(0, 200)).astype(np.uint64)
        expected = []
        for k in keys.tolist():
            expected.append(k not in ref)
            ref.add(k)
        assert seen.first(keys).tolist() == expected


def test_plan_blocks_cut_at_newlines(tmp_path, monkeypatch):
    lines = [json.dumps(dict(GOOD, uid=f"B{i}", content="x" * (i % 37))).encode() + b"\n" for i in range(300)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines) + b'{"uid": "last"}')                  # no final newline
    monkeypatch.setattr(corpus, "BLOCK", 1000)
    blocks = plan_blocks(src)
    assert len(blocks) > 5 and blocks[0][0] == 0
    data = src.read_bytes()
    for (start, length), (following, _) in zip(blocks, blocks[1:]):
        assert start + length == following and data[following - 1:following] == b"\n"
    assert sum(length for _, length in blocks) == len(data)


def test_split_writer_writes_fixed_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "ROW_GROUP", 4)
    out = SplitWriter(tmp_path)
    rows = pa.table({"uid": [f"u{i}" for i in range(7)], "title": ["t"] * 7, "content": ["c" * i for i in range(7)]},
                    schema=SCHEMA)
    out.add("train", rows, np.array([True] * 7))
    out.add("train", rows.slice(0, 3), np.array([True, False, True]))
    out.close()
    meta = pq.read_metadata(tmp_path / "train.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 1]
    assert out.counts == {"train": 9, "val": 0, "test": 0}
    assert pq.read_table(tmp_path / "train.parquet")["uid"].to_pylist() == [f"u{i}" for i in range(7)] + ["u0", "u2"]
    assert pq.read_table(tmp_path / "val.parquet").num_rows == 0
    assert sorted(np.concatenate(out.lengths["content"]).tolist()) == sorted([0, 1, 2, 3, 4, 5, 6, 0, 2])
