"""Stage `preprocess`: JSON lines -> clean, de-duplicated train/val/test Parquet + metrics.

    python stages/preprocess.py IN_JSONL OUT_DIR METRICS_JSON

Reads params `preprocess`. Per record: validate (uid/title/content present and strings),
unescape HTML entities, normalise whitespace, strip the boilerplate patterns from the content,
filter, then drop repeated uids and repeated title+content pairs (first one in the file wins)
and split by a hash of split_salt+uid, so a record lands in the same split whatever the order
or size of the input. Every input record is either written or counted under one reason in
METRICS_JSON; malformed lines are listed in OUT_DIR/bad_lines.txt.

Full size (2.25 M records) in bounded memory: the file is cut into ~32 MB blocks of whole
lines; threads parse them (pyarrow's JSON reader, falling back to a line-by-line loop only
for a block with a bad line), clean, filter and hash them; the main thread takes the blocks
back in input order, de-duplicates on 8-byte hashes and streams the rows into the Parquet
files. Rows keep their input order, so the same inputs and params give the same bytes.
With max_records, the records with the smallest hash of salt+uid are kept (at most ~2x that
many are held in memory while reading).
"""
from __future__ import annotations

import html
import json
import mmap
import os
import re
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import xxhash
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UserError, atomic_path, load_params, run_main, write_json  # noqa: E402

FIELDS = ("uid", "title", "content")
SCHEMA = pa.schema([(f, pa.string()) for f in FIELDS])
SPLITS = ("train", "val", "test")
# Every dropped record gets exactly one of these, the first that applies, in this order.
REASONS = ("malformed", "empty_content", "short_content", "short_title", "content_equals_title",
           "duplicate_uid", "duplicate_title_content", "over_max_records")
BLOCK = 32 << 20               # bytes of input per work unit
ROW_GROUP = 65_536             # rows per Parquet row group
MAX_REPORTED = 20              # malformed lines listed in bad_lines.txt


# ---------------------------------------------------------------- cleaning rules

# html.unescape's own pattern. A match's replacement depends on the match alone, so it is
# cached: the corpus has a handful of distinct entities, repeated millions of times.
_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_UNESCAPED: dict[str, str] = {}


def _unescape_one(m: re.Match) -> str:
    ref = m[0]
    out = _UNESCAPED.get(ref)
    if out is None:
        out = _UNESCAPED[ref] = html.unescape(ref)
    return out


def unescape(s: str) -> str:
    """html.unescape, twice: scraped text has double escaping (&amp;#8217;)."""
    for _ in range(2):
        if "&" not in s:
            break
        s = _ENTITY.sub(_unescape_one, s)
    return s


def clean_text(s: str) -> str:
    """Unescape HTML entities (&#x2019; &#8217; &amp; &#160; ...), then collapse every run of
    whitespace to one space and trim the ends."""
    return " ".join(unescape(s).split())


def clean_content(s: str, patterns: list[re.Pattern]) -> str:
    """clean_text, then remove each boilerplate pattern in turn."""
    s = clean_text(s)
    for p in patterns:
        stripped, n = p.subn("", s)
        if n:
            s = " ".join(stripped.split())
    return s


# clean_text and clean_content are the rules; what follows applies them to a whole block at
# the speed of Arrow (RE2, C++), with Python only for the values that need it.

# Python's whitespace (str.isspace), in RE2 syntax.
_WS = r"\t-\r \x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_WS_NOT_SPACE = _WS.replace(" ", "")
# A value needs work if it has an "&", or whitespace other than single spaces between words.
NEEDS_CLEANING = f"&|^[{_WS}]|[{_WS}]$|[{_WS_NOT_SPACE}]|  "
# A run of whitespace that " ".join(s.split()) would rewrite: not a lone space.
_WS_RUN = f"(?: *[{_WS_NOT_SPACE}]|  )[{_WS}]*"


def squeeze_spaces(col: pa.Array) -> pa.Array:
    """" ".join(s.split()) for every value, in RE2."""
    return pc.utf8_trim(pc.replace_substring_regex(col, _WS_RUN, " "), " ")


def re2_finds_all(pattern: str) -> bool:
    r"""Whether RE2 matches at least every value that Python's re matches, so it can pick the
    values to run Python on: ASCII patterns without Unicode-aware classes that RE2 compiles.
    (\s is safe: values that reach this test have single spaces as their only whitespace.)"""
    if not pattern.isascii() or re.search(r"\\[wWdDbB]", pattern):
        return False
    try:
        pc.match_substring_regex(pa.array([""]), f"(?i:{pattern})")
    except pa.ArrowInvalid:                        # Python-only syntax (lookbehind, ...)
        return False
    return True


def strip_boilerplate(col: pa.Array, patterns: list[re.Pattern]) -> pa.Array:
    """Remove each pattern in turn, running Python only on the values RE2 says match."""
    for p in patterns:
        if re2_finds_all(p.pattern):
            hit = pc.match_substring_regex(col, f"(?i:{p.pattern})")
        else:
            hit = pa.array([p.search(v) is not None for v in col.to_numpy(zero_copy_only=False)],
                           pa.bool_())
        if pc.any(hit).as_py():
            fixed = [" ".join(p.sub("", v).split())
                     for v in col.filter(hit).to_numpy(zero_copy_only=False)]
            col = pc.replace_with_mask(col, hit, pa.array(fixed, pa.string()))
    return col


def clean_table(table: pa.Table, patterns: list[re.Pattern]) -> pa.Table:
    """clean_text on titles, clean_content on contents. Adds column `row` (the input row)
    because the rows that needed work come back after those that did not."""
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    if all(re2_finds_all(p.pattern) for p in patterns):
        content_re = "|".join([NEEDS_CLEANING] + [f"(?i:{p.pattern})" for p in patterns])
        dirty = pc.match_substring_regex(table["content"], content_re)
    else:
        dirty = pc.not_equal(table["content"], "")
    dirty = pc.or_(dirty, pc.match_substring_regex(table["title"], NEEDS_CLEANING))
    if not pc.any(dirty).as_py():
        return table
    fix = table.filter(dirty)
    columns = {}
    for name in ("title", "content"):
        values = [unescape(v) for v in fix[name].to_numpy(zero_copy_only=False)]
        columns[name] = squeeze_spaces(pa.array(values, pa.string()))
    columns["content"] = strip_boilerplate(columns["content"], patterns)
    fix = fix.set_column(1, "title", columns["title"]).set_column(2, "content", columns["content"])
    return pa.concat_tables([table.filter(pc.invert(dirty)), fix])


def drop_reasons(table: pa.Table, cfg: dict) -> np.ndarray:
    """Per record, the index in REASONS of the filter that drops it, or -1 to keep it."""
    t_len = pc.utf8_length(table["title"]).to_numpy()
    c_len = pc.utf8_length(table["content"]).to_numpy()
    same = pc.equal(table["title"], table["content"]).to_numpy()
    return np.select(
        [c_len == 0, c_len < cfg["min_content_chars"], t_len < cfg["min_title_chars"], same],
        [REASONS.index(r) for r in ("empty_content", "short_content", "short_title",
                                    "content_equals_title")], -1)


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


# ---------------------------------------------------------------- one block (in a thread)

def process_block(src: Path, offset: int, length: int, cfg: dict) -> dict:
    """Parse, clean, filter and hash one block: its surviving records, grouped by split."""
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

    table = clean_table(table, cfg["patterns"])
    why = drop_reasons(table, cfg)
    dropped = Counter({"malformed": n_bad})
    for k, n in zip(*np.unique(why[why >= 0], return_counts=True)):
        dropped[REASONS[k]] += int(n)
    table = table.filter(pa.array(why < 0))

    split_h, rank = uid_hash(cfg["split_salt"], table["uid"])
    split = split_of(split_h, cfg["val_fraction"], cfg["test_fraction"])
    pair = pair_hash(table["title"], table["content"])
    # Survivors back in input order, and the table grouped by split (input order within).
    order = np.argsort(table["row"].to_numpy(), kind="stable")
    grouped = order[np.argsort(split[order], kind="stable")]
    return {"records": n_records, "lines": lines, "dropped": dropped, "bad": bad,
            "table": table.select(list(FIELDS)).take(pa.array(grouped)),
            "bounds": np.searchsorted(split[grouped], np.arange(len(SPLITS) + 1)),
            "split": split[order], "rank": rank[order], "pair": pair[order]}


def in_order(threads: ThreadPoolExecutor, calls: list[tuple], window: int):
    """The results of calls, in order, with at most `window` running or done but not taken
    (Executor.map would start them all and could hold every result in memory)."""
    running: deque = deque()
    for fn, *args in calls:
        running.append(threads.submit(fn, *args))
        if len(running) >= window:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


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


def check_params(p: dict) -> None:
    for key in ("min_title_chars", "min_content_chars", "max_records"):
        if p[key] < 0:
            raise UserError(f"params.yaml: preprocess.{key}: must be >= 0, got {p[key]}")
    for key in ("val_fraction", "test_fraction", "max_bad_fraction"):
        if not 0 <= p[key] <= 1:
            raise UserError(f"params.yaml: preprocess.{key}: must be between 0 and 1, got {p[key]}")
    if p["val_fraction"] + p["test_fraction"] >= 1:
        raise UserError("params.yaml: preprocess.val_fraction + test_fraction must be below 1, "
                        f"got {p['val_fraction'] + p['test_fraction']}")
    for k, pat in enumerate(p["boilerplate_patterns"]):
        try:
            re.compile(pat, re.IGNORECASE)
        except re.error as err:
            raise UserError(f"params.yaml: preprocess.boilerplate_patterns[{k}]: "
                            f"not a valid regular expression ({err}): {pat!r}") from None


def percentiles(x: np.ndarray) -> dict:
    if not len(x):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(x.max())}


def main() -> None:
    if len(sys.argv) != 4:
        raise UserError("usage: python stages/preprocess.py IN_JSONL OUT_DIR METRICS_JSON")
    src, out_dir, metrics_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    params = load_params("preprocess")
    check_params(params)
    if not src.is_file():
        raise UserError(f"{src}: not found")
    if src.stat().st_size == 0:
        raise UserError(f"{src}: empty file, no records")
    t0 = time.time()
    blocks = plan_blocks(src)
    cfg = dict(params, patterns=[re.compile(p, re.IGNORECASE) for p in params["boilerplate_patterns"]])
    cap = params["max_records"]

    records_in = line0 = 0
    dropped = Counter({reason: 0 for reason in REASONS})
    bad: list[tuple[int, str, str]] = []
    seen_uid, seen_pair = Seen(), Seen()
    candidates: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}   # with a cap: < 2 x cap rows
    with atomic_path(out_dir) as tmp, ExitStack() as stack:
        tmp.mkdir()
        out = SplitWriter(tmp)
        bar = stack.enter_context(tqdm(total=src.stat().st_size, unit="B", unit_scale=True,
                                       mininterval=1, desc=f"preprocess {src.name}", file=sys.stderr))
        # Blocks are processed by threads (Arrow releases the GIL for the heavy work) but
        # taken back in input order, so "first occurrence" means first in the file.
        n = len(os.sched_getaffinity(0))
        threads = stack.enter_context(ThreadPoolExecutor(n))
        results = in_order(threads, [(process_block, src, offset, length, cfg)
                                     for offset, length in blocks], window=n + 1)
        for i, r in enumerate(results):
            records_in += r["records"]
            dropped.update(r["dropped"])
            bad += [(line0 + no, field, problem) for no, field, problem in r["bad"]][:MAX_REPORTED - len(bad)]
            line0 += r["lines"]
            rank, keep = r["rank"], np.ones(len(r["rank"]), dtype=bool)
            if params["dedupe"]:
                keep = seen_uid.first(rank)                    # same uid => same hash
                dropped["duplicate_uid"] += int((~keep).sum())
                unique_pair = seen_pair.first(r["pair"][keep])
                dropped["duplicate_title_content"] += int((~unique_pair).sum())
                keep[np.flatnonzero(keep)[~unique_pair]] = False
            for k, s in enumerate(SPLITS):
                rows = r["table"].slice(r["bounds"][k], r["bounds"][k + 1] - r["bounds"][k])
                in_split = r["split"] == k
                if cap:
                    # Keep the cap records with the smallest order hash, in input order.
                    rows = rows.filter(pa.array(keep[in_split]))
                    candidates[s].append(rows.append_column("rank", pa.array(rank[in_split & keep])))
                else:
                    out.add(s, rows, keep[in_split])
            if cap and sum(t.num_rows for ts in candidates.values() for t in ts) > 2 * cap:
                smallest(candidates, cap, dropped)
            bar.update(blocks[i][1])

        if records_in == 0:
            raise UserError(f"{src}: no records (only blank lines)")
        n_bad = dropped["malformed"]
        if n_bad > params["max_bad_fraction"] * records_in:
            first = "; ".join(f"line {no}: {field}: {problem}" for no, field, problem in bad[:3])
            raise UserError(f"{src}: {n_bad:,} of {records_in:,} lines are malformed "
                            f"({n_bad / records_in:.2%}, above preprocess.max_bad_fraction="
                            f"{params['max_bad_fraction']}); first: {first}")
        if cap:
            smallest(candidates, cap, dropped)
            for s, tables in candidates.items():
                for t in tables:
                    out.add(s, t.drop_columns(["rank"]), np.ones(t.num_rows, dtype=bool))
        out.close()
        if sum(out.counts.values()) == 0:
            why = ", ".join(f"{k} {v:,}" for k, v in dropped.items() if v)
            raise UserError(f"{src}: no usable record: all {records_in:,} records were dropped ({why})")
        with open(tmp / "bad_lines.txt", "w", encoding="utf-8") as f:
            f.write(f"{n_bad} malformed of {records_in} records in {src.name}"
                    + (f"; the first {len(bad)}:\n" if bad else "\n"))
            f.writelines(f"line {no}: {field}: {problem}\n" for no, field, problem in bad)

    counts = out.counts
    records_out = sum(counts.values())
    assert records_out + sum(dropped.values()) == records_in, (records_out, dropped, records_in)
    write_json(metrics_path, {
        "records_in": records_in,
        "records_out": {**counts, "total": records_out},
        "dropped": dict(dropped),
        "title_chars": percentiles(np.concatenate(out.lengths["title"])),
        "content_chars": percentiles(np.concatenate(out.lengths["content"])),
    })
    print(f"preprocess: {src} -> {out_dir}: {records_in:,} records in, "
          + ", ".join(f"{s} {counts[s]:,}" for s in SPLITS)
          + f", dropped {sum(dropped.values()):,} (malformed {n_bad:,}) in {time.time() - t0:.1f} s")


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


if __name__ == "__main__":
    run_main(main)
