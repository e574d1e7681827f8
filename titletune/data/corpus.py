"""The corpus as data: parsing JSON lines blocks, hashing records, the split, the Parquet files.

preprocess cuts its input into BLOCK-sized pieces of whole lines (plan_blocks), parses each
with pyarrow's JSON reader (parse_fast), falling back to a line-by-line loop that names every
malformed line (parse_slow) only for a block that has one, hashes the records (uid_hash,
pair_hash), de-duplicates them on those 8-byte hashes (Seen) and streams them into the three
split files (SplitWriter) in fixed-size row groups, so the same records give the same bytes.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import xxhash

FIELDS = ("uid", "title", "content")
SCHEMA = pa.schema([(f, pa.string()) for f in FIELDS])
SPLITS = ("train", "val", "test")
BLOCK = 32 << 20               # bytes of input per work unit
ROW_GROUP = 65_536             # rows per Parquet row group
MAX_REPORTED = 20              # malformed lines listed in bad_lines.txt


def values(col: pa.ChunkedArray):
    """Each value's UTF-8 bytes, as a view into Arrow's buffer (no copy, no str)."""
    for arr in col.chunks:
        if len(arr):
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
            data = memoryview(arr.buffers()[2])
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                yield data[a:b]


def uid_hash(salt: str, uid: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of salt + NUL + uid (XXH3-128): one picks the split, one
    orders the cap; independent so that a cap (the smallest order hashes) keeps the split
    fractions."""
    digests = b"".join(map(xxhash.xxh3_128_digest, values(pc.binary_join_element_wise(salt, uid, "\0"))))
    both = np.frombuffer(digests, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def pair_hash(title: pa.ChunkedArray, content: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash (XXH3) of title + NUL + content: equal pairs, equal hashes."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest,
                           values(pc.binary_join_element_wise(title, content, "\0"))),
                       dtype=np.uint64, count=len(title))


def split_of(split_hash: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test: the split hash as a fraction of 2**64 against the thresholds."""
    test_end = np.uint64(min(int(test_fraction * 2**64), 2**64 - 1))
    val_end = np.uint64(min(int((test_fraction + val_fraction) * 2**64), 2**64 - 1))
    return np.where(split_hash < test_end, 2, np.where(split_hash < val_end, 1, 0)).astype(np.int8)


# ---------------------------------------------------------------- parsing one block

def parse_fast(data: bytes | memoryview, lines: int) -> pa.Table | None:
    """The block as a table, or None when it has anything odd (then parse_slow tells what)."""
    try:
        table = pj.read_json(
            pa.BufferReader(data),
            read_options=pj.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 20)),
            parse_options=pj.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # One row per line and no missing value, else a blank, doubled or incomplete line is hidden.
    if table.num_rows != lines or any(table[f].null_count for f in FIELDS):
        return None
    if pc.any(pc.equal(pc.utf8_trim_whitespace(table["uid"]), "")).as_py():
        return None
    return table.combine_chunks()


def parse_slow(data: bytes) -> tuple[pa.Table, int, list[tuple[int, str, str]], int]:
    """Line by line: (good records, records seen, [(line, field, problem)], malformed count)."""
    cols: dict[str, list[str]] = {f: [] for f in FIELDS}
    bad: list[tuple[int, str, str]] = []
    n_records = n_bad = 0
    for no, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue                                  # blank lines are not records
        n_records += 1
        rec, problem = check_line(line)
        if problem:
            n_bad += 1
            if len(bad) < MAX_REPORTED:
                bad.append((no, *problem))
            continue
        for f in FIELDS:
            cols[f].append(rec[f])
    return pa.table(cols, schema=SCHEMA), n_records, bad, n_bad


def check_line(line: bytes) -> tuple[dict | None, tuple[str, str] | None]:
    """(record, None) for a usable line, else (None, (field, problem))."""
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        return None, ("-", "not UTF-8")
    except ValueError as err:
        return None, ("-", f"not valid JSON ({err.msg}, column {err.colno})")
    if not isinstance(rec, dict):
        return None, ("-", f"not a JSON object but {type(rec).__name__}")
    for f in FIELDS:
        if f not in rec:
            return None, (f, "missing")
        v = rec[f]
        if not isinstance(v, str):
            kind = "null" if v is None else type(v).__name__
            return None, (f, f"not a string but {kind} {json.dumps(v)[:40]}")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return None, (f, "invalid unicode escape (lone surrogate)")
    if not rec["uid"].strip():
        return None, ("uid", "empty")
    return rec, None


def plan_blocks(src: Path) -> list[tuple[int, int]]:
    """(offset, length) of ~BLOCK-byte pieces of src that end at a newline."""
    size = src.stat().st_size
    blocks, start = [], 0
    with open(src, "rb") as f:
        while start < size:
            end = min(start + BLOCK, size)
            f.seek(end)
            while end < size:
                piece = f.read(1 << 16)
                nl = piece.find(b"\n")
                if nl >= 0:
                    end += nl + 1
                    break
                end += len(piece)
            blocks.append((start, end - start))
            start = end
    return blocks


# ---------------------------------------------------------------- the whole file (main thread)

class Seen:
    """The keys met so far, as one sorted array: 8 bytes a key."""

    def __init__(self):
        self.keys = np.empty(0, dtype=np.uint64)

    def first(self, keys: np.ndarray) -> np.ndarray:
        """True where a key appears for the first time (in order); remembers the keys."""
        uniq, at = np.unique(keys, return_index=True)
        pos = np.searchsorted(self.keys, uniq)
        new = pos == len(self.keys)
        new[~new] = self.keys[pos[~new]] != uniq[~new]
        first = np.zeros(len(keys), dtype=bool)
        first[at[new]] = True
        self.keys = np.insert(self.keys, pos[new], uniq[new])
        return first


class SplitWriter:
    """The three Parquet files. Rows are buffered and written in row groups of exactly
    ROW_GROUP rows, so the bytes do not depend on how the input was cut into blocks."""

    def __init__(self, out_dir: Path):
        self.writers = {s: pq.ParquetWriter(out_dir / f"{s}.parquet", SCHEMA, compression="zstd",
                                            compression_level=1, use_dictionary=False,
                                            write_statistics=False)
                        for s in SPLITS}
        self.pending: dict[str, list] = {s: [] for s in SPLITS}
        self.counts = {s: 0 for s in SPLITS}
        self.lengths: dict[str, list[np.ndarray]] = {"title": [], "content": []}

    def add(self, split: str, table: pa.Table, keep: np.ndarray) -> None:
        """The rows of `table` where `keep` is true, to the file of `split`."""
        # filter copies: a slice would hold on to the whole block it came from.
        self.pending[split].append(table.filter(pa.array(keep)))
        self.counts[split] += int(keep.sum())
        if sum(t.num_rows for t in self.pending[split]) >= ROW_GROUP:
            self._flush(split, final=False)

    def _flush(self, split: str, final: bool) -> None:
        if not self.pending[split]:
            return
        rows = pa.concat_tables(self.pending[split]).combine_chunks()
        full = rows.num_rows if final else rows.num_rows - rows.num_rows % ROW_GROUP
        for start in range(0, full, ROW_GROUP):
            group = rows.slice(start, min(ROW_GROUP, full - start))
            self.writers[split].write_table(group)
            for name in self.lengths:
                self.lengths[name].append(pc.utf8_length(group[name]).to_numpy())
        self.pending[split] = [rows.slice(full)] if full < rows.num_rows else []

    def close(self) -> None:
        for s in SPLITS:
            self._flush(s, final=True)
            self.writers[s].close()


def smallest(candidates: dict[str, list[pa.Table]], n: int, dropped: Counter) -> None:
    """Keep, over all splits, the n rows with the smallest `rank` (in place, order kept)."""
    tables = {s: pa.concat_tables(ts) for s, ts in candidates.items() if ts}
    rank = np.concatenate([t["rank"].to_numpy() for t in tables.values()])
    if len(rank) <= n:
        return
    dropped["over_max_records"] += len(rank) - n
    chosen = np.zeros(len(rank), dtype=bool)
    chosen[np.argsort(rank, kind="stable")[:n]] = True
    start = 0
    for s, t in tables.items():
        candidates[s] = [t.filter(pa.array(chosen[start:start + t.num_rows]))]
        start += t.num_rows

