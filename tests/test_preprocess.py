"""The preprocess rules: cleaning, boilerplate, filters, de-duplication, split, cap, metrics."""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import preprocess as P  # stages/ is on sys.path (conftest)
from common import load_params

DEFAULT_PATTERNS = [re.compile(p, re.IGNORECASE)
                    for p in load_params("preprocess")["boilerplate_patterns"]]


# ---------------------------------------------------------------- helpers

def record(uid: str, title: str, content: str) -> dict:
    return {"uid": uid, "title": title, "content": content, "target_ind": [1, 2], "target_rel": [1.0, 1.0]}


def write_jsonl(path: Path, records: list) -> Path:
    """Records are dicts (dumped) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def preprocess(src: Path, out: Path, **params) -> tuple[dict, dict]:
    """Run the stage in this process with some params changed; ({split: [rows]}, metrics)."""
    params = dict(load_params("preprocess"), **params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "load_params", lambda section: params)
        mp.setattr(sys, "argv", ["preprocess.py", str(src), str(out / "processed"), str(out / "data.json")])
        P.main()
    splits = {s: pq.read_table(out / "processed" / f"{s}.parquet").to_pylist() for s in P.SPLITS}
    return splits, json.loads((out / "data.json").read_text())


def many_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    return [record(f"B{i:09d}", f"Title number {i}", f"A description of item {i}, long enough. "
                   + "x" * rnd.randrange(0, 50)) for i in range(n)]


def split_of_uid(splits: dict) -> dict[str, str]:
    return {r["uid"]: s for s, rows in splits.items() for r in rows}


# ---------------------------------------------------------------- the cleaning rules

def test_entities_hex_decimal_and_named_are_unescaped():
    raw = "Don&#x2019;t &#8217;em &#8211; Tom &amp; Jerry &quot;live&quot; &mdash; a&#160;b"
    assert P.clean_text(raw) == "Don\u2019t \u2019em \u2013 Tom & Jerry \"live\" \u2014 a b"


def test_double_escaped_entities_are_unescaped():
    assert P.clean_text("Tom&amp;#8217;s") == "Tom\u2019s"
    assert P.clean_text("AT&amp;amp;T") == "AT&T"
    assert P.clean_text("Q&A, R & D, &unknown; stay") == "Q&A, R & D, &unknown; stay"


def test_whitespace_is_normalised():
    assert P.clean_text("  a\n\tb  c\xa0d \u3000e\r\n") == "a b c d e"
    assert P.clean_text("&#160;&#160;") == ""


@pytest.mark.parametrize("tail", [
    "--This text refers to an out of print or unavailable edition of this title.",
    "--This text refers to the Paperback edition.",
    " -- this TEXT refers to the Hardcover edition.",
])
def test_boilerplate_tails_are_stripped(tail):
    assert P.clean_content("A gripping novel." + tail, DEFAULT_PATTERNS) == "A gripping novel."


def test_text_without_boilerplate_is_kept():
    text = "It refers to the text -- and this text is fine."
    assert P.clean_content(text, DEFAULT_PATTERNS) == text


def tricky_values(n: int, seed: int = 0) -> list[str]:
    pieces = ["plain words", "Caf\u00e9 \u2019quoted\u2019", "&#x2019;", "&#8217;", "&amp;", "&quot;",
              "&mdash;", "&#160;", "&amp;#8211;", "& alone", "  ", "\n", "\t", "\xa0", "\u2003",
              " ", "thePaperbackedition", "--This text refers to the Paperback edition.",
              "Copyright 1998 Reed Business Information, Inc.", "x", ""]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8))) for _ in range(n)]


@pytest.mark.parametrize("patterns", [
    P.load_params("preprocess")["boilerplate_patterns"],             # RE2 picks the values
    [r"(?<=\.)\s*Copyright \d{4} Reed Business Information.*$"],     # Python-only: all values
    [],
])
def test_block_cleaning_equals_the_rules(patterns):
    """The fast whole-block path gives exactly what clean_text/clean_content give per value."""
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    titles, contents = tricky_values(400, seed=1), tricky_values(400, seed=2)
    table = pa.table({"uid": [f"u{i}" for i in range(400)], "title": titles, "content": contents},
                     schema=P.SCHEMA)
    out = P.clean_table(table, compiled).to_pylist()
    assert sorted(r["row"] for r in out) == list(range(400))
    for r in out:
        assert r["title"] == P.clean_text(titles[r["row"]])
        assert r["content"] == P.clean_content(contents[r["row"]], compiled)


def test_filters_give_one_reason_each():
    cfg = {"min_content_chars": 20, "min_title_chars": 3}
    rows = [("A fine title", "A description that is long enough."),   # kept
            ("A fine title", ""),                                        # empty_content
            ("A fine title", "VHS Tape"),                                # short_content
            ("It", "A description that is long enough."),                # short_title
            ("Same text, twenty chars+", "Same text, twenty chars+"),    # content_equals_title
            ("", "")]                                                    # empty_content first
    table = pa.table({"title": [t for t, _ in rows], "content": [c for _, c in rows]})
    why = [P.REASONS[k] if k >= 0 else None for k in P.drop_reasons(table, cfg)]
    assert why == [None, "empty_content", "short_content", "short_title", "content_equals_title",
                   "empty_content"]


# ---------------------------------------------------------------- the stage on small files

def test_dedupe_keeps_the_first_occurrence(tmp_path):
    recs = [record("u1", "Title one", "The first description of it."),
            record("u1", "Title one again", "A later record with the same uid."),
            record("u2", "Title one", "The first description of it."),      # same pair as u1
            record("u3", "Title one", "Another description, same title.")]  # same title only
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    splits, metrics = preprocess(src, tmp_path / "out")
    rows = {r["uid"]: r for rows in splits.values() for r in rows}
    assert set(rows) == {"u1", "u3"}
    assert rows["u1"]["content"] == "The first description of it."
    assert metrics["dropped"]["duplicate_uid"] == 1
    assert metrics["dropped"]["duplicate_title_content"] == 1

    splits, metrics = preprocess(src, tmp_path / "nodedupe", dedupe=False)
    assert sorted(r["uid"] for rows in splits.values() for r in rows) == ["u1", "u1", "u2", "u3"]


def test_split_is_stable_under_reordering_and_subsetting(tmp_path):
    recs = many_records(3000)
    full, metrics = preprocess(write_jsonl(tmp_path / "all.jsonl", recs), tmp_path / "all")
    subset = random.Random(1).sample(recs, 1200)          # shuffled and smaller
    part, _ = preprocess(write_jsonl(tmp_path / "part.jsonl", subset), tmp_path / "part")
    full_split, part_split = split_of_uid(full), split_of_uid(part)
    assert len(part_split) == 1200
    assert all(full_split[u] == s for u, s in part_split.items())
    # 5 % + 5 %, give or take binomial noise (sd ~12 of 3000).
    assert 90 < metrics["records_out"]["val"] < 210 and 90 < metrics["records_out"]["test"] < 210


def test_cap_keeps_the_same_records_whatever_the_order(tmp_path):
    recs = many_records(2000)
    capped, metrics = preprocess(write_jsonl(tmp_path / "a.jsonl", recs), tmp_path / "a",
                                 max_records=300)
    shuffled = random.Random(2).sample(recs, len(recs))
    capped2, _ = preprocess(write_jsonl(tmp_path / "b.jsonl", shuffled), tmp_path / "b",
                            max_records=300)
    assert {s: sorted(r["uid"] for r in rows) for s, rows in capped.items()} == \
           {s: sorted(r["uid"] for r in rows) for s, rows in capped2.items()}
    assert metrics["records_out"]["total"] == 300
    assert metrics["dropped"]["over_max_records"] == 1700
    # The cap keeps the records with the smallest order hash, in their input order and split.
    full, _ = preprocess(tmp_path / "a.jsonl", tmp_path / "nocap")
    uids = [r["uid"] for r in recs]
    _, rank = P.uid_hash(load_params("preprocess")["split_salt"], pa.chunked_array([uids]))
    smallest = {uids[i] for i in rank.argsort()[:300]}
    for s in P.SPLITS:
        assert capped[s] == [r for r in full[s] if r["uid"] in smallest]


def test_metrics_reasons_add_up_and_bad_lines_are_reported(tmp_path):
    good = many_records(196)
    recs = good[:50] + ['{"uid": "bad", "title": "no content"}'] + good[50:] + [
        record("e1", "A title", ""), record("s1", "A title", "VHS Tape"),
        record("t1", "It", "Long enough description here."), good[0]]
    src = write_jsonl(tmp_path / "in.jsonl", recs + [""])               # a blank line: no record
    splits, metrics = preprocess(src, tmp_path / "out", max_bad_fraction=0.05)
    assert metrics["records_in"] == 201
    assert metrics["dropped"] == {
        "malformed": 1, "empty_content": 1, "short_content": 1, "short_title": 1,
        "content_equals_title": 0, "duplicate_uid": 1, "duplicate_title_content": 0,
        "over_max_records": 0}
    assert metrics["records_out"]["total"] == sum(len(r) for r in splits.values()) == 196
    assert sum(metrics["dropped"].values()) + metrics["records_out"]["total"] == metrics["records_in"]
    for key in ("title_chars", "content_chars"):
        assert set(metrics[key]) == {"p50", "p90", "p99", "max"}
    report = (tmp_path / "out" / "processed" / "bad_lines.txt").read_text()
    assert "line 51: content: missing" in report


def test_outputs_are_byte_identical_and_typed(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", many_records(500))
    preprocess(src, tmp_path / "one")
    preprocess(src, tmp_path / "two")
    for name in ("processed/train.parquet", "processed/val.parquet", "processed/test.parquet",
                 "processed/bad_lines.txt", "data.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    schema = pq.read_schema(tmp_path / "one" / "processed" / "train.parquet")
    assert schema.names == ["uid", "title", "content"]
    assert all(t == pa.string() for t in schema.types)


def test_many_blocks_and_threads_give_the_same_bytes(tmp_path, monkeypatch):
    """The parallel path (many blocks, threads) writes the same bytes as the one-block path."""
    recs = many_records(3000) + many_records(200)                      # 200 duplicate uids
    recs.insert(1234, "not json at all")
    src = write_jsonl(tmp_path / "in.jsonl", recs)

    def run_main(out: str, block: int, row_group: int):
        monkeypatch.setattr(P, "BLOCK", block)
        monkeypatch.setattr(P, "ROW_GROUP", row_group)
        monkeypatch.setattr(sys, "argv", ["preprocess.py", str(src), str(tmp_path / out),
                                          str(tmp_path / f"{out}.json")])
        P.main()
        return ({s: (tmp_path / out / f"{s}.parquet").read_bytes() for s in P.SPLITS},
                json.loads((tmp_path / f"{out}.json").read_text()),
                (tmp_path / out / "bad_lines.txt").read_text())

    one = run_main("one", 1 << 30, 500)
    many = run_main("many", 20_000, 500)          # ~15 blocks; row groups of 500 in both
    for s in P.SPLITS:
        assert one[0][s] == many[0][s], s
    assert one[1] == many[1] and one[2] == many[2]
    assert "line 1235: -: not valid JSON" in many[2]


def test_seen_keys_match_a_python_set():
    import numpy as np
    rng = np.random.default_rng(0)
    seen, ref = P.Seen(), set()
    for _ in range(50):
        keys = rng.integers(0, 3000, size=rng.integers(0, 200)).astype(np.uint64)
        expected = []
        for k in keys.tolist():
            expected.append(k not in ref)
            ref.add(k)
        assert seen.first(keys).tolist() == expected
