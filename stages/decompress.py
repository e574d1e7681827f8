"""Stage `decompress`: the corpus file -> plain JSON lines.

    python stages/decompress.py OUT            # SOURCE = params.yaml data.source (what dvc.yaml runs)
    python stages/decompress.py SOURCE OUT

The source path is read from params.yaml, not from the command line DVC runs, so that no file
name (`data/x$(touch PWNED).json.gz`) ever reaches a shell.
SOURCE is `.json.gz`, plain `.json` (JSON lines), or the `.zip` the corpus ships in (member
`trn.json.gz`, or its only .json/.json.gz member); the kind is read from the first bytes, not
the name. The file is streamed in large blocks (never held in memory) through ISA-L's gzip,
several times faster than zlib, and checked to be UTF-8 on the way, so that a bad byte is reported
here, with its line, rather than as a parse error later. A last line without its newline
gets one.
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, run_main

ARGUMENTS = "[SOURCE] OUT"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import io
import struct
import sys
import time
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
from isal import igzip, isal_zlib
from tqdm import tqdm

from titletune.params import load_params

BLOCK = 16 << 20          # bytes per read: big enough that Python overhead vanishes
MAX_LINE = 64 << 20       # a longer "line" means the file is not JSON lines
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
# What a truncated or damaged archive raises, depending on where the damage is.
ARCHIVE_ERRORS = (EOFError, OSError, zlib.error, isal_zlib.error, zipfile.BadZipFile)


class _Counted(io.RawIOBase):
    """A read-only stream that reports how many compressed bytes were consumed."""

    def __init__(self, raw, bar: tqdm):
        self.raw, self.bar = raw, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        b[:len(data)] = data
        self.bar.update(len(data))
        return len(data)


def zip_member(zf: zipfile.ZipFile, src: Path) -> zipfile.ZipInfo:
    files = [m for m in zf.infolist() if not m.is_dir()]
    for m in files:
        if Path(m.filename).name == "trn.json.gz":
            return m
    data = [m for m in files if m.filename.endswith((".json", ".json.gz", ".jsonl"))]
    if len(data) == 1:
        return data[0]
    raise UserError(f"{src}: zip has no member trn.json.gz and not exactly one .json/.json.gz "
                    f"member; members: {[m.filename for m in files][:10]}")


def open_source(src: Path, stack: ExitStack) -> tuple[io.IOBase, str, tqdm]:
    """The decompressed byte stream of src, what kind of file it is, and its progress bar."""
    if not src.is_file():
        raise UserError(f"{src}: not found (data.source in params.yaml)")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == ZIP_MAGIC:
        zf = stack.enter_context(zipfile.ZipFile(src))
        member = zip_member(zf, src)
        raw, total = stack.enter_context(zf.open(member)), member.file_size
        kind = f"zip member {member.filename}"
        with zf.open(member) as m:
            inner_gzip = m.read(2) == GZIP_MAGIC
    else:
        raw, total = stack.enter_context(open(src, "rb")), src.stat().st_size
        kind, inner_gzip = ("gzip", True) if magic[:2] == GZIP_MAGIC else ("plain", False)
    bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, mininterval=1,
                                   desc=f"decompress {src.name}", file=sys.stderr))
    stream = _Counted(raw, bar)
    if inner_gzip:
        stream = stack.enter_context(igzip.IGzipFile(fileobj=stream, mode="rb"))
    return stream, kind, bar


def check_utf8(piece: bytes | memoryview, first_line: int, src: Path) -> None:
    """Fail at the first byte that is not UTF-8. Arrow's validator is several times faster
    than bytes.decode; decode runs only to say where the bad byte is."""
    arr = pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(struct.pack("<ii", 0, len(piece))),
                                                 pa.py_buffer(piece)])
    try:
        arr.cast(pa.string())
    except pa.ArrowInvalid:
        piece = bytes(piece)
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as err:
            line = first_line + piece.count(b"\n", 0, err.start)
            raise UserError(f"{src}: line {line:,}: not UTF-8 (byte "
                            f"{piece[err.start:err.start + 1]!r}: {err.reason})") from None


def copy_lines(stream, dst, src: Path, kind: str, bar: tqdm) -> tuple[int, int]:
    """Copy stream to dst in blocks, checking that it is UTF-8 lines; (lines, bytes) written.
    bar counts the bytes of src read so far (a damaged file is reported with them).

    Two cores' worth: this thread inflates (ISA-L, without the GIL) and checks the text while a
    writer thread copies the previous block to disk.
    """
    lines = size = 0
    tail = b""            # the start of a line that continues in the next block
    pending: deque = deque()
    with ThreadPoolExecutor(1) as writer:
        while True:
            try:
                block = stream.read(BLOCK)
            except ARCHIVE_ERRORS as err:
                # What was read of the file; the lines are those of the blocks before the failing one.
                good = f" and {lines:,} good lines" if lines else ""
                raise UserError(f"{src}: truncated or corrupt {kind} file: {err} (after reading {bar.n:,} "
                                f"of its {bar.total:,} bytes{good})") from None
            if not block:
                break
            # Check whole lines, so that no character is split: the tail of the previous
            # block with this block's first line, then the rest up to its last newline.
            first, cut = block.find(b"\n") + 1, block.rfind(b"\n") + 1
            if cut:
                check_utf8(tail + block[:first], lines + 1, src)
                check_utf8(memoryview(block)[first:cut], lines + 2, src)
                lines += 1 + block.count(b"\n", first)
                tail = block[cut:]
            else:
                tail += block
                if len(tail) > MAX_LINE:
                    raise UserError(f"{src}: line {lines + 1:,} is longer than "
                                    f"{MAX_LINE >> 20} MB: not JSON lines")
            pending.append(writer.submit(dst.write, block))
            while len(pending) > 2:
                pending.popleft().result()
            size += len(block)
        if tail:                                  # a last line without its newline
            check_utf8(tail, lines + 1, src)
            pending.append(writer.submit(dst.write, b"\n"))
            lines += 1
        for done in pending:
            done.result()
    return lines, size


def main() -> None:
    src, out = command_line(ARGUMENTS)
    src = src or Path(load_params("data").source)
    t0 = time.time()
    with ExitStack() as stack:
        stream, kind, bar = open_source(src, stack)
        with atomic_path(out) as tmp, open(tmp, "wb") as dst:
            lines, size = copy_lines(stream, dst, src, kind, bar)
            if size == 0:
                raise UserError(f"{src}: empty, no records to read")
        bar.close()
    secs = time.time() - t0
    print(f"decompress: {src} ({kind}) -> {out}: {lines:,} lines, {size / 1e6:,.1f} MB "
          f"in {secs:.1f} s ({size / 1e6 / max(secs, 1e-9):,.0f} MB/s)")


if __name__ == "__main__":
    run_main(main)
