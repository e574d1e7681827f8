"""Stage `preprocess`: JSON lines -> clean, de-duplicated train/val/test Parquet + metrics.

    python stages/preprocess.py IN_JSONL OUT_DIR METRICS_JSON

Reads params `preprocess`; writes OUT_DIR/{train,val,test}.parquet, OUT_DIR/bad_lines.txt (the
malformed lines) and METRICS_JSON (every input record is either written or counted under one
reason; `cleaned` counts the records that lost control characters). Per record: validate
(uid/title/content present and strings), clean and filter
(titletune.data.cleaning), then drop repeated uids and repeated title+content pairs (the first one
in the file wins) and split by a hash of split_salt+uid, so a record lands in the same split
whatever the order or size of the input (titletune.data.corpus).

Full size (2.25 M records) in bounded memory: the file is cut into ~32 MB blocks of whole
lines; threads parse, clean, filter and hash them; the main thread takes the blocks back in
input order, de-duplicates on 8-byte hashes and streams the rows into the Parquet files. Rows
keep their input order, so the same inputs and params give the same bytes. With max_records,
the records with the smallest hash of salt+uid are kept (at most ~2x that many are held in
memory while reading).
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, run_main, write_json

ARGUMENTS = "IN_JSONL OUT_DIR METRICS_JSON"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import mmap
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from titletune.data.cleaning import REASONS, clean_table, compile_patterns, drop_reasons
from titletune.data.corpus import (FIELDS, MAX_REPORTED, SPLITS, Seen, SplitWriter, pair_hash, parse_fast,
                                   parse_slow, plan_blocks, smallest, split_of, uid_hash)
from titletune.params import load_params


def process_block(src: Path, offset: int, length: int, p, patterns: list) -> dict:
    """Parse, clean, filter and hash one block (in a thread): its surviving records, by split."""
    # Arrow parses straight from the page cache (mmap): no copy of the block.
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = memoryview(mm)[offset:offset + length]
        if data[-1:] != b"\n":                       # the last line of a file without one
            data = memoryview(bytes(data) + b"\n")
        lines = int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")))
        table = parse_fast(data, lines)
        if table is not None:
            n_records, bad, n_bad = table.num_rows, [], 0
        else:
            table, n_records, bad, n_bad = parse_slow(bytes(data))
        data.release()

    table = clean_table(table, patterns)
    control = pc.sum(table["control"]).as_py() or 0
    why = drop_reasons(table, p.min_title_chars, p.min_content_chars)
    dropped = Counter({"malformed": n_bad})
    for k, n in zip(*np.unique(why[why >= 0], return_counts=True)):
        dropped[REASONS[k]] += int(n)
    table = table.filter(pa.array(why < 0))

    split_h, rank = uid_hash(p.split_salt, table["uid"])
    split = split_of(split_h, p.val_fraction, p.test_fraction)
    pair = pair_hash(table["title"], table["content"])
    # Survivors back in input order, and the table grouped by split (input order within).
    order = np.argsort(table["row"].to_numpy(), kind="stable")
    grouped = order[np.argsort(split[order], kind="stable")]
    return {"records": n_records, "lines": lines, "dropped": dropped, "bad": bad, "control": control,
            "table": table.select(list(FIELDS)).take(pa.array(grouped)),
            "bounds": np.searchsorted(split[grouped], np.arange(len(SPLITS) + 1)),
            "split": split[order], "rank": rank[order], "pair": pair[order]}


def processed_blocks(src: Path, p, stack: ExitStack):
    """process_block of every block of src, run by threads (Arrow releases the GIL for the heavy
    work) but yielded in input order, so "first occurrence" means first in the file; at most
    one block per thread is running or done but not taken (Executor.map would hold them all)."""
    patterns = compile_patterns(p.boilerplate_patterns)
    bar = stack.enter_context(tqdm(total=src.stat().st_size, unit="B", unit_scale=True, mininterval=1,
                                   desc=f"preprocess {src.name}", file=sys.stderr))
    n = len(os.sched_getaffinity(0))
    threads = stack.enter_context(ThreadPoolExecutor(n))
    running: deque = deque()
    for offset, length in plan_blocks(src):
        running.append((threads.submit(process_block, src, offset, length, p, patterns), length))
        if len(running) > n:
            yield running.popleft()[0].result()
            bar.update(length)
    while running:
        future, length = running.popleft()
        yield future.result()
        bar.update(length)


class Collector:
    """The blocks' survivors, in input order, to the split files: repeats dropped (the first
    occurrence wins) and, with max_records, only the records with the smallest order hash."""

    def __init__(self, out: SplitWriter, dedupe: bool, cap: int):
        self.out, self.dedupe, self.cap = out, dedupe, cap
        self.records = self.lines = self.control = 0
        self.dropped = Counter({reason: 0 for reason in REASONS})
        self.bad: list[tuple[int, str, str]] = []
        self.seen_uid, self.seen_pair = Seen(), Seen()
        self.candidates: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}  # with a cap: < 2 x cap rows

    def add(self, r: dict) -> None:
        self.records += r["records"]
        self.control += r["control"]
        self.dropped.update(r["dropped"])
        self.bad += [(self.lines + no, field, problem)
                     for no, field, problem in r["bad"]][:MAX_REPORTED - len(self.bad)]
        self.lines += r["lines"]
        rank, keep = r["rank"], np.ones(len(r["rank"]), dtype=bool)
        if self.dedupe:
            keep = self.seen_uid.first(rank)                    # same uid => same hash
            self.dropped["duplicate_uid"] += int((~keep).sum())
            unique_pair = self.seen_pair.first(r["pair"][keep])
            self.dropped["duplicate_title_content"] += int((~unique_pair).sum())
            keep[np.flatnonzero(keep)[~unique_pair]] = False
        for k, s in enumerate(SPLITS):
            rows = r["table"].slice(r["bounds"][k], r["bounds"][k + 1] - r["bounds"][k])
            in_split = r["split"] == k
            if self.cap:
                # Keep the cap records with the smallest order hash, in input order.
                rows = rows.filter(pa.array(keep[in_split]))
                self.candidates[s].append(rows.append_column("rank", pa.array(rank[in_split & keep])))
            else:
                self.out.add(s, rows, keep[in_split])
        if self.cap and sum(t.num_rows for ts in self.candidates.values() for t in ts) > 2 * self.cap:
            smallest(self.candidates, self.cap, self.dropped)

    def close(self) -> None:
        if self.cap:
            smallest(self.candidates, self.cap, self.dropped)
            for s, tables in self.candidates.items():
                for t in tables:
                    self.out.add(s, t.drop_columns(["rank"]), np.ones(t.num_rows, dtype=bool))
        self.out.close()


def check_malformed(src: Path, c: Collector, max_bad_fraction: float) -> None:
    """Fail on an input without records or with too many malformed lines."""
    if c.records == 0:
        raise UserError(f"{src}: no records (only blank lines)")
    n_bad = c.dropped["malformed"]
    if n_bad > max_bad_fraction * c.records:
        first = "; ".join(f"line {no}: {field}: {problem}" for no, field, problem in c.bad[:3])
        raise UserError(f"{src}: {n_bad:,} of {c.records:,} lines are malformed ({n_bad / c.records:.2%}, "
                        f"above preprocess.max_bad_fraction={max_bad_fraction}); first: {first}")


def percentiles(x: np.ndarray) -> dict:
    if not len(x):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(x.max())}


def main() -> None:
    src, out_dir, metrics_path = command_line(ARGUMENTS)
    p = load_params("preprocess")
    if not src.is_file():
        raise UserError(f"{src}: not found")
    if src.stat().st_size == 0:
        raise UserError(f"{src}: empty file, no records")
    t0 = time.time()
    with atomic_path(out_dir) as tmp, ExitStack() as stack:
        tmp.mkdir()
        c = Collector(SplitWriter(tmp), p.dedupe, p.max_records)
        for block in processed_blocks(src, p, stack):
            c.add(block)
        check_malformed(src, c, p.max_bad_fraction)
        c.close()
        if sum(c.out.counts.values()) == 0:
            why = ", ".join(f"{k} {v:,}" for k, v in c.dropped.items() if v)
            raise UserError(f"{src}: no usable record: all {c.records:,} records were dropped ({why})")
        n_bad = c.dropped["malformed"]
        with open(tmp / "bad_lines.txt", "w", encoding="utf-8") as f:
            f.write(f"{n_bad} malformed of {c.records} records in {src.name}"
                    + (f"; the first {len(c.bad)}:\n" if c.bad else "\n"))
            f.writelines(f"line {no}: {field}: {problem}\n" for no, field, problem in c.bad)

    counts = c.out.counts
    records_out = sum(counts.values())
    assert records_out + sum(c.dropped.values()) == c.records, (records_out, c.dropped, c.records)
    write_json(metrics_path, {
        "records_in": c.records, "records_out": {**counts, "total": records_out}, "dropped": dict(c.dropped),
        # records whose title or content lost control characters (kept or not)
        "cleaned": {"control_characters": c.control},
        "title_chars": percentiles(np.concatenate(c.out.lengths["title"])),
        "content_chars": percentiles(np.concatenate(c.out.lengths["content"])),
    })
    print(f"preprocess: {src} -> {out_dir}: {c.records:,} records in, "
          + ", ".join(f"{s} {counts[s]:,}" for s in SPLITS)
          + f", dropped {sum(c.dropped.values()):,} (malformed {n_bad:,}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
