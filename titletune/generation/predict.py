"""predict: a model's answers for a user's file of products, streamed, resumable, data-parallel
(scripts/predict.py is the command).

The input is JSON lines (objects with `title`, optional `uid` and `question`) or CSV (a header
with a `title` column, optional `uid` and `question`), read as a stream: a pass that checks it
(UTF-8, the CSV header, each row) and counts its rows, then a pass that answers them chunk by
chunk; neither holds more than one chunk of rows.

Resuming: the valid rows are cut into numbered chunks of `predict.chunk_rows`; each answered
chunk is written atomically as its own part file in the work folder OUTPUT.parts/, and a run
skips the chunks whose part exists. At the end the parts are joined in order into OUTPUT (at
once) and the work folder is removed. Its manifest records what the parts were made with (the
input's md5, the model, the prompt and generation settings): parts of other settings are never
mixed in.

Several GPUs: under torchrun rank r answers chunks r, r + N, ...; rank 0 joins the parts once
every rank has finished (a gloo barrier), so the output keeps the input's order.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from titletune.cli import Interrupted, UserError, atomic_path
from titletune.launch import is_rank0, rank, world_size
from titletune.prompt import encode_prompts, pick_question

# torch and the engine are imported where they are used: bad input is refused before they load.

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SHOWN_BAD_LINES = 20     # malformed lines listed on stderr; all are counted
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Row:
    line: int                 # 1-based line of the input where the row starts
    uid: str | int            # the row's uid, else its line number
    title: str
    question: str | None      # the row's own question, if any


@dataclass(frozen=True)
class Bad:
    line: int
    why: str


# ---------------------------------------------------------------- reading the input

def input_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise UserError(f"{path}: unknown input format {path.suffix or '(no suffix)'!r}: use "
                        "JSON lines (.jsonl) or CSV (.csv)") from None


def text_lines(path: Path) -> Iterator[str]:
    """The file's lines as text (line ends kept, for csv), checked to be UTF-8 as they are read;
    a UTF-8 byte order mark at the start (spreadsheet exports) is dropped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: line {line_no}: not UTF-8 (byte {err.start + 1} of the line, "
                                f"{raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
            yield text.removeprefix("\ufeff") if line_no == 1 else text


def check_row(line: int, title, uid, question) -> Row | Bad:
    """A row with a non-empty string title (an optional uid: string or number; an optional
    question: string), else why not."""
    if title is None:
        return Bad(line, "title: missing")
    if not isinstance(title, str):
        return Bad(line, f"title: not a string ({type(title).__name__})")
    if not title.strip():
        return Bad(line, "title: empty")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, (str, int, float))):
        return Bad(line, f"uid: not a string or a number ({type(uid).__name__})")
    if question is not None and not isinstance(question, str):
        return Bad(line, f"question: not a string ({type(question).__name__})")
    return Row(line, line if uid in (None, "") else uid, title.strip(), question.strip() if question else None)


def jsonl_rows(path: Path) -> Iterator[Row | Bad]:
    """JSON lines: one object a line; blank lines are no rows."""
    for line_no, text in enumerate(text_lines(path), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield Bad(line_no, f"not JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            yield Bad(line_no, f"not a JSON object ({type(obj).__name__})")
            continue
        yield check_row(line_no, obj.get("title"), obj.get("uid"), obj.get("question"))


def csv_rows(path: Path) -> Iterator[Row | Bad]:
    """CSV with a header line naming a `title` column (and maybe `uid`, `question`); a quoted
    field may span lines (a row's line is the one where it starts)."""
    lines = text_lines(path)
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise UserError(f"{path}: line 1: not a CSV header ({err})") from None
    if header is None:
        return
    header = [name.strip() for name in header]
    if "title" not in header:
        raise UserError(f"{path}: line 1: no `title` column in the CSV header (columns: "
                        f"{', '.join(map(repr, header)) or 'none'})")
    column = {name: header.index(name) for name in ("title", "uid", "question") if name in header}
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield Bad(start, f"not a CSV row ({err})")
            start = reader.line_num + 1
            continue
        if fields and any(f.strip() for f in fields):   # a blank line is no row
            if len(fields) != len(header):
                yield Bad(start, f"{len(fields)} fields where the header has {len(header)}")
            else:
                yield check_row(start, *(fields[column[name]] if name in column else None
                                         for name in ("title", "uid", "question")))
        start = reader.line_num + 1


def read_rows(path: Path) -> Iterator[Row | Bad]:
    return jsonl_rows(path) if input_format(path) == "jsonl" else csv_rows(path)


@dataclass
class Scan:
    rows: int
    bad: list[Bad]          # the first SHOWN_BAD_LINES malformed lines
    bad_count: int
    md5: str


def scan(path: Path) -> Scan:
    """One streamed pass that checks the whole input before anything is written: a file that is
    missing, not UTF-8, without a title column or without any valid row stops here."""
    rows, bad, bad_count = 0, [], 0
    for item in read_rows(path):
        if isinstance(item, Row):
            rows += 1
        else:
            bad_count += 1
            if len(bad) < SHOWN_BAD_LINES:
                bad.append(item)
    if rows == 0 and not bad:
        raise UserError(f"{path}: empty: no line holds a product (a row with a `title` field)")
    if rows == 0:
        raise UserError(f"{path}: no valid row: {bad_count} malformed lines (line {bad[0].line}: {bad[0].why})")
    with open(path, "rb") as f:
        md5 = hashlib.file_digest(f, "md5").hexdigest()
    return Scan(rows, bad, bad_count, md5)


def chunks(path: Path, chunk_rows: int) -> Iterator[tuple[int, list[Row]]]:
    """(number, rows): the valid rows, chunk_rows at a time, numbered from 0."""
    chunk, number = [], 0
    for item in read_rows(path):
        if isinstance(item, Row):
            chunk.append(item)
            if len(chunk) == chunk_rows:
                yield number, chunk
                chunk, number = [], number + 1
    if chunk:
        yield number, chunk


# ---------------------------------------------------------------- the work folder

def work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_path(work: Path, number: int) -> Path:
    return work / f"part-{number:06d}.jsonl"


def open_work_dir(work: Path, manifest: dict) -> int:
    """Create the work folder with its manifest, or check that an existing one (an interrupted
    run's) was made with the same settings; returns the number of parts already there."""
    saved_path = work / MANIFEST
    if work.exists():
        if not saved_path.is_file():
            raise UserError(f"{work}: exists and is not a work folder of predict (no {MANIFEST}); "
                            "move it away or choose another OUTPUT")
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        for key in manifest:
            if saved.get(key) != manifest[key]:
                raise UserError(f"{work}: the parts there were made with another {key} ({saved.get(key)!r}, "
                                f"now {manifest[key]!r}); run with the same input, model and params to "
                                "resume, or delete that folder to start over")
        return len(list(work.glob("part-*.jsonl")))
    with atomic_path(work) as tmp:
        tmp.mkdir()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def join_parts(work: Path, n_chunks: int, output: Path) -> None:
    """The parts, in chunk order, into OUTPUT at once; then the work folder (predict's own) goes."""
    with atomic_path(output) as tmp, open(tmp, "wb") as out:
        for number in range(n_chunks):
            with open(part_path(work, number), "rb") as part:
                shutil.copyfileobj(part, out)
    shutil.rmtree(work)


# ---------------------------------------------------------------- answering

def model_identity(source: Path | None) -> dict:
    """What the parts' answers depend on in the model files: each weights file's size and mtime
    (cheap, unlike hashing gigabytes)."""
    if source is None:
        return {"model": "base"}
    files = sorted(p for p in source.iterdir() if p.suffix == ".safetensors")
    return {"model": str(source.resolve()),
            "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def questions_for(rows: list[Row], fmt) -> list[str]:
    """The row's own question ({title} in it becomes the title), else the training phrasing:
    format.questions rotated by uid (by line number without one), with the title cut at
    format.max_chars as in training."""
    cap = fmt.text_cap()
    return [row.question.replace("{title}", row.title[:cap]) if row.question
            else pick_question(fmt.questions, str(row.uid)).format(title=row.title[:cap]) for row in rows]


def answer_chunk(model, tokenizer, rows: list[Row], number: int, fmt, ep, eos_ids: set[int],
                 model_name: str) -> tuple[list[dict], list[tuple[Row, str]]]:
    """The output rows of one chunk (uid, title, answer and its token count up to EOS), and the
    rows skipped with why: a prompt too long for the model's positions (modeling.prompt_too_long)."""
    import torch

    from titletune.generation.engine import SAMPLING_SEED, generate, generation_kwargs, until_eos
    from titletune.modeling import prompt_room, prompt_too_long
    prompts = encode_prompts(tokenizer, questions_for(rows, fmt), fmt.style)
    room = prompt_room(model, ep.max_new_tokens)
    why = [prompt_too_long(len(ids), room, ep.max_new_tokens, model_name) for ids in prompts]
    skipped = [(row, f"{'question' if row.question else 'title'}: {w}") for row, w in zip(rows, why) if w]
    rows, prompts = [r for r, w in zip(rows, why) if not w], [p for p, w in zip(prompts, why) if not w]
    # Seeded per chunk: a resumed or data-parallel run samples what a single uninterrupted one does.
    torch.manual_seed(SAMPLING_SEED + number)
    # keep: the next chunk runs on this chunk's engine (cache and CUDA graphs), not a new one
    new_ids = generate(model, prompts, pad_token_id=tokenizer.pad_token_id, eos_ids=eos_ids, progress=False,
                       keep=True, **generation_kwargs(ep))
    answers = [until_eos(ids, eos_ids) for ids in new_ids]
    return [{"uid": row.uid, "title": row.title,
             "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids)}
            for row, ids in zip(rows, answers)], skipped


def write_part(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def barrier() -> None:
    """Wait for every rank (gloo: on CPUs and GPUs alike; it only synchronises)."""
    import torch.distributed as dist
    if world_size() > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
        dist.barrier()


def finish() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(*counts: int) -> list[int]:
    """Each count summed over every rank (all-reduce over gloo; as is with one process)."""
    if world_size() == 1:
        return list(counts)
    import torch
    import torch.distributed as dist
    summed = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(summed)
    return summed.tolist()


def rank_rows(total_rows: int, chunk_rows: int, rank: int, world: int) -> int:
    """The rows of the chunks rank `rank` answers."""
    return sum(min(chunk_rows, total_rows - c * chunk_rows) for c in range(rank, -(-total_rows // chunk_rows), world))


def answer_all(model, tokenizer, input_path: Path, work: Path, total_rows: int, params) -> tuple[int, int, int, int]:
    """This rank's chunks that have no part yet, each answered and written as its part; a bar of
    rows with tokens/s (rank 0's); each row too long for the model listed on stderr. Returns the
    (rows, tokens, parts, skipped rows) of this run on this rank."""
    from tqdm import tqdm

    from titletune.generation.engine import eos_token_ids
    model_params, fmt, ep, pp = params
    eos_ids = eos_token_ids(model, tokenizer)
    mine, world = rank(), world_size()
    rows_done = tokens = parts = skipped = 0
    start = time.perf_counter()
    with tqdm(total=rank_rows(total_rows, pp.chunk_rows, mine, world), desc="predict", unit="row",
              disable=not is_rank0(), smoothing=0) as bar:
        for number, rows in chunks(input_path, pp.chunk_rows):
            if number % world != mine:
                continue
            part = part_path(work, number)
            if not part.exists():   # else answered by an earlier run
                answered, too_long = answer_chunk(model, tokenizer, rows, number, fmt, ep, eos_ids, model_params.name)
                for row, why in too_long:
                    tqdm.write(f"predict: {input_path}: line {row.line}: {why}; skipped", file=sys.stderr)
                write_part(part, answered)
                rows_done, skipped, parts = rows_done + len(answered), skipped + len(too_long), parts + 1
                tokens += sum(r["tokens"] for r in answered)
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
            bar.update(len(rows))
    return rows_done, tokens, parts, skipped


# ---------------------------------------------------------------- the command

def load_predictor(model_params, source: Path | None):
    """(model, tokenizer, model params of what loaded) for generation (engine.load_for_generation):
    the base model (source None), base + the adapter in `source` (a folder with adapter_config.json,
    merged into a working copy) or the full model in `source` (models/merged)."""
    from titletune.generation.engine import load_for_generation
    if source is None or (source / "adapter_config.json").is_file():
        return *load_for_generation(model_params, source), model_params
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: neither a LoRA adapter (adapter_config.json) nor a model folder "
                        "(config.json): pass models/adapter, models/merged or --base")
    full = model_params.model_copy(update={"name": str(source)})
    return *load_for_generation(full), full


def check_input(input_path: Path, output: Path, source: Path | None, overwrite: bool) -> Scan:
    """Everything about the files that can stop the command, before any model loads."""
    if source is not None and not source.is_dir():
        raise UserError(f"{source}: no model here; run `dvc repro` (train writes models/adapter, export "
                        "models/merged) or pass --model FOLDER or --base")
    if output.exists() and not overwrite:
        raise UserError(f"{output}: exists; pass --overwrite to replace it")
    if input_path.exists() and output.resolve() == input_path.resolve():
        raise UserError(f"{output}: is the input file; write the answers to another file")
    return scan(input_path)


def predict(input_path: Path, output: Path, source: Path | None, found: Scan, params, root: Path) -> None:
    """Answer every valid row of input_path (checked: `found`) into output (JSON lines: uid,
    title, answer, tokens); `root`: the folder model.name is relative to (the repository)."""
    model_params, fmt, ep, pp = params
    n_chunks = -(-found.rows // pp.chunk_rows)
    work = work_dir(output)
    if is_rank0():
        for bad in found.bad:
            print(f"predict: {input_path}: line {bad.line}: {bad.why}; skipped", file=sys.stderr)
        if found.bad_count > len(found.bad):
            print(f"predict: ... and {found.bad_count - len(found.bad)} more malformed lines", file=sys.stderr)
        from titletune.generation.engine import generation_kwargs
        manifest = {"input": str(input_path.resolve()), "input_md5": found.md5, "base_model": model_params.name,
                    **model_identity(source), "format": fmt.model_dump(), "generation": generation_kwargs(ep),
                    "chunk_rows": pp.chunk_rows}
        resumed = open_work_dir(work, manifest)
    barrier()  # the work folder exists before any rank writes into it

    with contextlib.chdir(root):
        model, tokenizer, loaded = load_predictor(model_params, source)
    start = time.perf_counter()
    try:
        rows_done, tokens, parts, too_long = answer_all(model, tokenizer, input_path, work, found.rows,
                                                        (loaded, fmt, ep, pp))
    except KeyboardInterrupt:
        parts = len(list(work.glob("part-*.jsonl")))
        raise Interrupted(f"interrupted; {parts} of {n_chunks} parts are done in {work}: run the same "
                          "command again to continue from there") from None
    seconds = time.perf_counter() - start
    if world_size() > 1:
        print(f"predict: rank {rank()} of {world_size()} answered {parts} parts ({rows_done:,} rows)",
              flush=True)
    barrier()  # every part is written
    rows_done, tokens, too_long = sum_over_ranks(rows_done, tokens, too_long)
    finish()
    if not is_rank0():
        return
    join_parts(work, n_chunks, output)
    skipped = (f", {found.bad_count:,} malformed line{'s' * (found.bad_count > 1)} skipped (listed above)"
               if found.bad_count else "")
    skipped += (f", {too_long:,} row{'s' * (too_long > 1)} too long for the model skipped (listed above)"
                if too_long else "")
    earlier = f"; {resumed} of {n_chunks} parts from an earlier run" if resumed else ""
    print(f"predict: {found.rows:,} rows -> {output}{skipped}; {rows_done:,} answered in {seconds:.1f} s, "
          f"{tokens:,} tokens ({tokens / max(seconds, 1e-9):,.0f} tokens/s){earlier}", flush=True)
