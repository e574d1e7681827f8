"""titletune/cli.py: one line for a user error, outputs written whole or not at all."""
from __future__ import annotations

import json

import pytest

from titletune.cli import UserError, atomic_path, run_main, write_json


def test_user_error_is_one_line_and_exit_code_2(capsys):
    def main():
        raise UserError("params.yaml: train.seed: missing")

    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: train.seed: missing\n"


def test_other_errors_keep_their_traceback():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(main)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_atomic_path_replaces_only_on_success(tmp_path, kind):
    final = tmp_path / "out" / "result"

    def write(text: str, fail: bool) -> None:
        with atomic_path(final) as tmp:
            if kind == "dir":
                tmp.mkdir()
                (tmp / "part").write_text(text)
            else:
                tmp.write_text(text)
            if fail:
                raise RuntimeError("interrupted")

    def read() -> str:
        return (final / "part" if kind == "dir" else final).read_text()

    write("first", fail=False)
    assert read() == "first"
    with pytest.raises(RuntimeError):
        write("second, half-written", fail=True)
    assert read() == "first"                                   # the old output is untouched
    write("third", fail=False)
    assert read() == "third"
    assert sorted(p.name for p in final.parent.iterdir()) == ["result"]   # no temp folder left


def test_write_json_is_sorted_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}
