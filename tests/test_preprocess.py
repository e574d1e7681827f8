"""Stage `preprocess` (stages/preprocess.py): de-duplication, split, cap, metrics, bad lines, byte-
identical outputs, clear one-line failures, and the stage under DVC."""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages import preprocess as P
from titletune.data import corpus
from titletune.data.corpus import SPLITS, uid_hash
from titletune.params import load_params
from titletune.testing import ROOT, run


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
    params = load_params("preprocess", path=ROOT / "params.yaml").model_copy(update=params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "load_params", lambda section: params)
        mp.setattr(sys, "argv", ["preprocess.py", str(src), str(out / "processed"), str(out / "data.json")])
        P.main()
    splits = {s: pq.read_table(out / "processed" / f"{s}.parquet").to_pylist() for s in SPLITS}
    return splits, json.loads((out / "data.json").read_text())


def many_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    return [record(f"B{i:09d}", f"Title number {i}", f"A description of item {i}, long enough. "
                   + "x" * rnd.randrange(0, 50)) for i in range(n)]


def split_of_uid(splits: dict) -> dict[str, str]:
    return {r["uid"]: s for s, rows in splits.items() for r in rows}


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
    _, rank = uid_hash(load_params("preprocess", path=ROOT / "params.yaml").split_salt, pa.chunked_array([uids]))
    smallest = {uids[i] for i in rank.argsort()[:300]}
    for s in SPLITS:
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


def test_control_characters_are_cleaned_and_counted(tmp_path):
    recs = many_records(20) + [record("c1", "\x1b[31mRed\x1b[0m Mug", "A mug.\x00 Holds tea\x07, 300 ml."),
                               record("c2", "Blue Mug", "\x1b]0;owned\x07A blue mug for tea, 300 ml.")]
    splits, metrics = preprocess(write_jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out")
    rows = {r["uid"]: r for rows in splits.values() for r in rows}
    assert (rows["c1"]["title"], rows["c1"]["content"]) == ("Red Mug", "A mug. Holds tea, 300 ml.")
    assert rows["c2"]["content"] == "A blue mug for tea, 300 ml."
    assert metrics["cleaned"] == {"control_characters": 2}


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

    monkeypatch.chdir(ROOT)  # P.main reads params.yaml there

    def run_main(out: str, block: int, row_group: int):
        monkeypatch.setattr(corpus, "BLOCK", block)
        monkeypatch.setattr(corpus, "ROW_GROUP", row_group)
        monkeypatch.setattr(sys, "argv", ["preprocess.py", str(src), str(tmp_path / out),
                                          str(tmp_path / f"{out}.json")])
        P.main()
        return ({s: (tmp_path / out / f"{s}.parquet").read_bytes() for s in SPLITS},
                json.loads((tmp_path / f"{out}.json").read_text()),
                (tmp_path / out / "bad_lines.txt").read_text())

    one = run_main("one", 1 << 30, 500)
    many = run_main("many", 20_000, 500)          # ~15 blocks; row groups of 500 in both
    for s in SPLITS:
        assert one[0][s] == many[0][s], s
    assert one[1] == many[1] and one[2] == many[2]
    assert "line 1235: -: not valid JSON" in many[2]


# ---------------------------------------------------------------- bad input: exit 2, one line, no output

GOOD = [{"uid": f"B{i:04d}", "title": f"Product title {i}", "content": f"A long enough description {i}.",
         "target_ind": [1], "target_rel": [1.0]} for i in range(10)]


def fails(src: Path, *needles: str, cwd: Path = ROOT) -> str:
    """Run the stage on src: exit code 2, one `error:` line with every needle, no output written."""
    out = src.parent / "processed"
    proc = run([sys.executable, "-m", "stages.preprocess", str(src), str(out), str(src.parent / "data.json")],
               cwd, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists() and not (src.parent / "data.json").exists()
    return errors[0]


def test_malformed_json_line_above_the_limit(tmp_path):
    src = write_jsonl(tmp_path / "trn.jsonl", GOOD[:3] + ['{"uid": "B9", "title": "x", "content": '] + GOOD[3:])
    fails(src, "1 of 11 lines are malformed (9.09%, above preprocess.max_bad_fraction=0.01)",
          "first: line 4: -: not valid JSON")


def test_missing_field(tmp_path):
    src = write_jsonl(tmp_path / "trn.jsonl", GOOD[:1] + [{"uid": "B9", "title": "no content"}] + GOOD[1:])
    fails(src, "line 2: content: missing")


def test_non_string_title(tmp_path):
    src = write_jsonl(tmp_path / "trn.jsonl", GOOD[:5] + [{"uid": "B9", "title": 1234, "content": "text text x"}])
    fails(src, "line 6: title: not a string but int 1234")


def test_empty_file(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(b"")
    fails(src, f"{src}: empty file, no records")


def test_only_blank_lines(tmp_path):
    src = tmp_path / "trn.jsonl"
    src.write_bytes(b"\n \n\n")
    fails(src, f"{src}: no records (only blank lines)")


def test_no_usable_record(tmp_path):
    src = write_jsonl(tmp_path / "trn.jsonl", [dict(r, content="") for r in GOOD])
    fails(src, "no usable record: all 10 records were dropped (empty_content 10)")


def test_bad_params_stop_the_stage_before_any_work(repo):
    """params.yaml is checked first (the whole file), with the same one line as titletune.params."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"]["val_fraction"] = 1.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    src = write_jsonl(repo / "in" / "trn.jsonl", GOOD)
    assert fails(src, cwd=repo) == \
        "error: params.yaml: preprocess.val_fraction: 1.5 is not allowed (must be a number in [0, 1))"


# ---------------------------------------------------------------- under DVC

def ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_dvc_repro_preprocess(repo):
    # Outputs someone made by hand in the working tree must not be in the copy's git.
    run(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", "data/interim", "data/processed"], repo)
    for stale in ("data/interim", "data/processed"):
        shutil.rmtree(repo / stale, ignore_errors=True)

    first = run(["dvc", "repro", "preprocess"], repo)
    assert ran(first.stdout) == ["decompress", "preprocess"], first.stdout
    metrics = json.loads((repo / "metrics/data.json").read_text())
    rows = {s: pq.read_metadata(repo / f"data/processed/{s}.parquet").num_rows for s in SPLITS}
    assert rows == {s: metrics["records_out"][s] for s in SPLITS} and sum(rows.values()) > 1000
    assert metrics["records_in"] == sum(rows.values()) + sum(metrics["dropped"].values())
    assert (repo / "data/processed/bad_lines.txt").read_text().startswith("0 malformed of ")

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("decompress", "preprocess"):
        assert lock[stage]["deps"] and all(d.get("md5") for d in lock[stage]["deps"]), stage
        assert lock[stage]["outs"] and all(o.get("md5") for o in lock[stage]["outs"]), stage
    assert "preprocess" in lock["preprocess"]["params"]["params.yaml"]

    again = run(["dvc", "repro", "preprocess"], repo)
    assert ran(again.stdout) == [], again.stdout

    # Same inputs and params => the same bytes.
    before = {p: (repo / p).read_bytes() for p in ("metrics/data.json", *(f"data/processed/{s}.parquet" for s in SPLITS))}
    forced = run(["dvc", "repro", "-f", "preprocess"], repo)
    assert ran(forced.stdout) == ["decompress", "preprocess"]
    assert {p: (repo / p).read_bytes() for p in before} == before
