"""What every command shares: errors for the user, and outputs written all at once or not at all.

Every stage imports this module (dvc.yaml lists it for all six): keep it small and stable.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad input, bad params). Stages print it without a traceback."""


def run_main(main) -> None:
    """Run a command's main(); a UserError becomes one clear line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(final: Path | str):
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    Works for files and directories, so an interrupted stage never leaves a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
