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
gets one; a leading byte order mark goes.

Refused with one line: a folder or a device as the source, a zip with two members of one name
(which one would be read?), an encrypted or unreadable zip member, a JSON array (not one record a
line: convert it), and an output over MAX_EXPANSION times the source file (a zip or gzip bomb).
"""
from __future__ import annotations

from titletune.cli import UserError, atomic_path, command_line, overlap, run_main

ARGUMENTS = "[SOURCE] OUT"
if __name__ == "__main__":  # before the imports below: a wrong command line is told at once
    command_line(ARGUMENTS)

import io
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
from isal import igzip, isal_zlib
from tqdm import tqdm

from titletune.params import load_params

BLOCK = 16 << 20          # bytes per read: big enough that Python overhead vanishes
MAX_LINE = 64 << 20       # a longer "line" means the file is not JSON lines
# A zip or gzip bomb guard: the output may be at most MAX_EXPANSION times the source file (the real
# corpus is ~2x: 826 MB of trn.json.gz give 1.7 GB; JSON text rarely packs beyond 10x, a bomb packs
# ~1000x: deflate's limit), or EXPANSION_FLOOR, so that a small file of repetitive lines passes.
MAX_EXPANSION = 100
EXPANSION_FLOOR = 64 << 20
UTF8_BOM = b"\xef\xbb\xbf"
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
    names = Counter(m.filename for m in files)
    twice = [name for name, n in names.items() if n > 1]
    if twice:  # zipfile would silently read one of them
        raise UserError(f"{src}: zip has {names[twice[0]]} members named {twice[0]}: cannot tell which one "
                        "is the corpus; repack it with one")
    member = next((m for m in files if Path(m.filename).name == "trn.json.gz"), None)
    data = [m for m in files if m.filename.endswith((".json", ".json.gz", ".jsonl"))]
    if member is None and len(data) == 1:
        member = data[0]
    if member is None:
        raise UserError(f"{src}: zip has no member trn.json.gz and not exactly one .json/.json.gz "
                        f"member; members: {[m.filename for m in files][:10]}")
    if member.flag_bits & 0x1:
        raise UserError(f"{src}: zip member {member.filename} is encrypted; unpack it and point data.source at it")
    if member.compress_type not in SUPPORTED_ZIP_METHODS:
        raise UserError(f"{src}: zip member {member.filename} uses compression method {member.compress_type}, "
                        "which Python's zipfile cannot read; repack it with deflate or store")
    return member


SUPPORTED_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def check_source(src: Path) -> None:
    """data.source is a file (not a folder, not /dev/zero)."""
    if src.is_dir():
        raise UserError(f"{src}: is a directory, not a file (data.source in params.yaml names the corpus "
                        "file: .json.gz, .json or .zip)")
    if not src.exists():
        raise UserError(f"{src}: not found (data.source in params.yaml)")
    if not src.is_file():
        raise UserError(f"{src}: not a regular file (data.source in params.yaml)")


def open_source(src: Path, stack: ExitStack) -> tuple[io.IOBase, str, tqdm]:
    """The decompressed byte stream of src, what kind of file it is, and its progress bar."""
    check_source(src)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == ZIP_MAGIC:
        try:
            zf = stack.enter_context(zipfile.ZipFile(src))
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise UserError(f"{src}: truncated or corrupt zip file: {err}") from None
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


def check_start(block: bytes, src: Path) -> bytes:
    """The first block, without a UTF-8 byte order mark (Windows editors write one, JSON has none);
    a JSON array (`[{...}, ...]`, pretty-printed or not) or records over several lines (`jq .`) are
    refused: they are not one record a line (preprocess would count every line malformed)."""
    block = block.removeprefix(UTF8_BOM)
    start = block.lstrip()
    if start[:1] == b"[":
        raise UserError(f"{src}: a JSON array, not JSON lines (one record a line); convert it first, e.g. "
                        f"`jq -c '.[]' {src.name} > trn.jsonl` (or json.load it and json.dumps each record a line)")
    if start.split(b"\n", 1)[0].strip() == b"{":
        raise UserError(f"{src}: pretty-printed JSON (a record over several lines), not JSON lines (one record a "
                        f"line); convert it first, e.g. `jq -c . {src.name} > trn.jsonl`")
    return block


def copy_lines(stream, dst, src: Path, kind: str, bar: tqdm) -> tuple[int, int]:
    """Copy stream to dst in blocks, checking that it is UTF-8 lines; (lines, bytes) written.
    bar counts the bytes of src read so far (a damaged file is reported with them).

    Two cores' worth: this thread inflates (ISA-L, without the GIL) and checks the text while a
    writer thread copies the previous block to disk.
    """
    lines = size = 0
    tail = b""            # the start of a line that continues in the next block
    pending: deque = deque()
    most = max(MAX_EXPANSION * src.stat().st_size, EXPANSION_FLOOR)
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
            if size == 0:
                block = check_start(block, src)
            if size + len(block) > most:
                raise UserError(f"{src}: expands to more than {MAX_EXPANSION} times its {src.stat().st_size:,} "
                                f"bytes (a zip or gzip bomb?); the corpus expands about 2 times")
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
    if overlap({"data.source": src, "OUT": out}):   # data.source is not on the command line that command_line checks
        raise UserError(f"{src}: is the output of decompress itself; data.source names the corpus file")
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
