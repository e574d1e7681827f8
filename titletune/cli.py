"""What every command shares: errors for the user, and outputs written all at once or not at all.

Every stage imports this module (dvc.yaml lists it for all six): keep it small and stable.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

EXIT_USER = 2           # a failure the user can fix: bad input or params, a full disk
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), also SIGTERM


class UserError(Exception):
    """A problem the user can fix (bad input, bad params). Stages print it without a traceback."""


class Interrupted(UserError):
    """Ctrl-C or SIGTERM, with what was kept: printed as `COMMAND: message`, exit code 130."""


def run_main(main) -> None:
    """Run a command's main(). Known failures are one line on stderr, without a traceback:

        error: params.yaml: train.seed: missing                       a UserError: exit code 2
        error: no space left on device writing data/formatted (...)   a full disk: exit code 2
        train: interrupted at step 9; the last checkpoint ...          Ctrl-C or SIGTERM: exit code 130

    Anything else is a bug and keeps its traceback. SIGTERM (`kill PID`) is handled as Ctrl-C,
    so `finally` blocks run: atomic_path removes its temp output, the MLflow run is ended.
    """
    name = Path(sys.argv[0]).stem.replace("_", "-") or "command"   # stages/tokenize_format.py: tokenize-format
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except Interrupted as err:
        _fail(f"{name}: {err}", EXIT_INTERRUPTED)
    except UserError as err:
        _fail(f"error: {err}", EXIT_USER)
    except KeyboardInterrupt:
        _fail(f"{name}: interrupted", EXIT_INTERRUPTED)
    except Exception as err:
        if not disk_full(err):
            raise
        _fail(f"error: {disk_full_message(err)}", EXIT_USER)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def command_line(arguments: str) -> list[Path | None]:
    """The paths a command takes, checked against `arguments` ("DATA_DIR ADAPTER_DIR METRICS_DIR";
    a leading "[SOURCE]" is optional). A missing or extra argument, an option (every knob is in
    params.yaml), an empty path or two paths that overlap print the usage line and exit 2;
    -h/--help prints it and exits 0.
    A stage calls it first, before its heavy imports, so a wrong command line is told at once."""
    names, given = arguments.split(), sys.argv[1:]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    usage = f"usage: python {f'-m {spec.name}' if spec else sys.argv[0]} {arguments}"
    if given and given[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    required = [n for n in names if not n.startswith("[")]
    option = next((a for a in given if a.startswith("-")), None)
    if option is not None:
        why = f"unexpected option {option}: every knob is in params.yaml"
    elif len(given) < len(required):
        why = f"missing {' '.join(required[len(given):])}"
    elif len(given) > len(names):
        why = f"unexpected {' '.join(given[len(names):])}"
    elif "" in given:
        why = "an empty path"
    else:
        spare = len(given) - len(required)   # optional names are filled first, from the left
        paths = {}
        for name in names:
            if name.startswith("[") and not spare:
                paths[name] = None
                continue
            spare -= name.startswith("[")
            paths[name] = Path(given.pop(0))
        why = overlap({name.strip("[]"): path for name, path in paths.items() if path is not None})
        if why is None:
            return list(paths.values())
    _fail(f"{usage}  ({why})", EXIT_USER)


def overlap(paths: dict[str, Path]) -> str | None:
    """Two paths that are one, or one inside the other: an output written there would replace or
    corrupt an input (`ADAPTER_DIR` = `DATA_DIR` replaces the training data with the adapter)."""
    resolved = {name: path.resolve() for name, path in paths.items()}
    for first, a in resolved.items():
        for second, b in resolved.items():
            if first != second and a == b:
                return f"{first} and {second} are the same path, {paths[first]}"
            # METRICS_DIR holds named files: the base model's results (an input of evaluate) live there too
            if first != second and b in a.parents and second != "METRICS_DIR":
                return f"{first} ({paths[first]}) is inside {second} ({paths[second]})"
    return None


def _fail(line: str, code: int) -> None:
    # A progress bar cut short leaves the cursor at its end: close it, so the line starts a line.
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------- a full disk

def disk_full(err: BaseException) -> bool:
    """Did err (or an error it was raised from) come from a full disk? OSError ENOSPC/EDQUOT, and
    the libraries that report it in words: safetensors ("No space left on device (os error 28)"),
    torch.save ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if "inline_container.cc" in text and ("unexpected pos" in text or "file write failed" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(err: BaseException) -> str:
    """`no space left on device writing PATH (N GB free there; the library's words)`: PATH is the
    output being written (atomic_path and `writing` record it), else the file the OSError names."""
    path = getattr(err, "output_path", None) or getattr(err, "filename", None)
    where = Path(path) if path else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 1e9
    why = " ".join(str(err).split())
    why = re.sub(r"^\[enforce fail at inline_container\.cc:\d+\] \. ", "torch.save: ", why)[:200]
    return (f"no space left on device writing {path or 'a file'} ({free:.2f} GB free there; {why}); "
            "free some space and run `dvc repro` again")


@contextlib.contextmanager
def writing(path: Path | str):
    """Name `path` in the one-line message if the block fails for a full disk (for outputs that
    are not written through atomic_path, such as the trainer's checkpoints)."""
    try:
        yield
    except BaseException as err:
        _record_output(err, path)
        raise


def _record_output(err: BaseException, path: Path | str) -> None:
    """The innermost output being written when err was raised (outer blocks keep it)."""
    if getattr(err, "output_path", None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            err.output_path = str(path)


# ---------------------------------------------------------------- whole outputs

@contextlib.contextmanager
def atomic_path(final: Path | str):
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    Works for files and directories, so an interrupted stage never leaves a half-written output.
    The temporary path is `.NAME.XXXXXXXX/NAME` beside `final`: an exception, Ctrl-C or SIGTERM
    removes it; a process killed with SIGKILL cannot, so the next write of the same output first
    removes those of earlier runs.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
    except BaseException as err:
        _record_output(err, final)
        raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def remove_stale_temps(final: Path) -> None:
    """Remove the temp folders atomic_path made for `final` in earlier runs (tempfile.mkdtemp
    names: `.NAME.` and 8 characters). None of them can be in use: DVC runs a stage once at a time
    (it refuses a second `dvc repro` in the same repo, and each queued experiment runs in its own
    copy), and each output has one writer, so a leftover is from a run killed with SIGKILL."""
    stale = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}")
    for path in final.parent.iterdir():
        if stale.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- plots

def new_figure(**subplots):
    """(figure, axes) from matplotlib's subplots, drawn off-screen (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(**subplots)


def write_png(fig, path: Path | str, **savefig) -> None:
    """The figure as a PNG (100 dpi), written atomically; the figure is closed either way."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, **savefig)
    finally:
        plt.close(fig)
