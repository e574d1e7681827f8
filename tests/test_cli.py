"""titletune/cli.py: one line for a user error, an interruption or a full disk (a bug keeps its
traceback), outputs written whole or not at all, and no temp output left by a killed run."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from titletune.cli import (Interrupted, UserError, atomic_path, command_line, new_figure, run_main, write_json,
                           write_png, writing)


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


def one_line(main, capsys, monkeypatch, code: int) -> str:
    """run_main(main) as the command stages/tokenize_format.py: the exit code and its one stderr line."""
    monkeypatch.setattr(sys, "argv", ["stages/tokenize_format.py"])
    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_ctrl_c_and_sigterm_are_one_line_and_exit_code_130(capsys, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)   # run_main handles it as Ctrl-C

    def stage_says_what_is_kept():
        raise Interrupted("interrupted at step 9; the last checkpoint (step 8) is kept")

    assert one_line(ctrl_c, capsys, monkeypatch, 130) == "tokenize-format: interrupted"
    assert one_line(sigterm, capsys, monkeypatch, 130) == "tokenize-format: interrupted"
    assert one_line(stage_says_what_is_kept, capsys, monkeypatch, 130) == \
        "tokenize-format: interrupted at step 9; the last checkpoint (step 8) is kept"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # restored after the command


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, capsys, monkeypatch):
    def enospc():
        with atomic_path(tmp_path / "data" / "formatted") as tmp:
            tmp.mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")

    line = one_line(enospc, capsys, monkeypatch, 2)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'data' / 'formatted'} (")
    assert " GB free there; [Errno 28] No space left on device); free some space and run `dvc repro` again" in line
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == []          # nothing half-written


def test_torch_and_safetensors_words_for_a_full_disk(tmp_path, capsys, monkeypatch):
    def torch_save():    # what torch.save raises when the disk fills (its C++ writer)
        with writing(tmp_path / "checkpoints"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def safetensors_save():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    line = one_line(torch_save, capsys, monkeypatch, 2)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'checkpoints'} (")
    assert "; torch.save: unexpected pos 576 vs 534)" in line
    assert "writing a file (" in one_line(safetensors_save, capsys, monkeypatch, 2)


def test_other_torch_writer_errors_keep_their_traceback():
    def main():
        raise RuntimeError("[enforce fail at inline_container.cc:600] . Parent directory x does not exist.")

    with pytest.raises(RuntimeError):
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


def test_temp_outputs_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """SIGKILL leaves atomic_path's `.NAME.XXXXXXXX` folder; the next write of NAME removes it (only it)."""
    for name in (".trn.jsonl.k1ll3d_x", ".trn.jsonl.abcd1234"):
        (tmp_path / name / "trn.jsonl").mkdir(parents=True)
    keep = [".trn.jsonl.notmine", ".other.abcd1234", "trn.jsonl.abcd1234", ".trn.jsonl.x.abcd1234"]
    for name in keep:
        (tmp_path / name).mkdir()
    write_json(tmp_path / "trn.jsonl", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["trn.jsonl"])


def test_write_json_is_sorted_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_command_line_fills_the_paths_and_an_optional_leading_one(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stages/decompress.py", "out.jsonl"])
    assert command_line("[SOURCE] OUT") == [None, Path("out.jsonl")]
    monkeypatch.setattr(sys, "argv", ["stages/decompress.py", "in.json.gz", "out.jsonl"])
    assert command_line("[SOURCE] OUT") == [Path("in.json.gz"), Path("out.jsonl")]


# Each stage with the paths dvc.yaml gives it, and the usage line it prints.
STAGES = {"decompress": "[SOURCE] OUT", "preprocess": "IN_JSONL OUT_DIR METRICS_JSON",
          "tokenize_format": "IN_DIR OUT_DIR METRICS_JSON", "train": "DATA_DIR ADAPTER_DIR METRICS_DIR",
          "evaluate_base": "TEST_DIR BASE_METRICS BASE_SAMPLES",
          "evaluate": "TEST_DIR ADAPTER_DIR BASE_METRICS BASE_SAMPLES METRICS_DIR",
          "export": "DATA_DIR ADAPTER_DIR OUT_DIR REPORT_JSON"}
HEAVY = ("torch", "unsloth", "transformers", "datasets", "pyarrow", "mlflow", "numpy")


@pytest.mark.parametrize("stage", STAGES)
def test_a_wrong_command_line_is_the_usage_line_and_exit_2_at_once(stage, tmp_path):
    from titletune.testing import ROOT, run
    n = len(STAGES[stage].split())
    usage = f"usage: python -m stages.{stage} {STAGES[stage]}  ("
    cases = {"missing ": ["a"] * (n - 2), "unexpected b)": ["a"] * n + ["b"],
             "unexpected option --max-length: every knob is in params.yaml)": ["a"] * (n - 1) + ["--max-length", "32"],
             "an empty path)": [""] * n}
    for why, args in cases.items():
        started = time.perf_counter()
        proc = run([sys.executable, "-m", f"stages.{stage}", *args], ROOT, check=False, timeout=60)
        seconds = time.perf_counter() - started
        assert proc.returncode == 2 and proc.stdout == "", (why, proc.stderr)
        assert proc.stderr.startswith(usage + why) and proc.stderr.count("\n") == 1, (why, proc.stderr)
        assert seconds < 10, f"{why}: {seconds:.1f} s"     # no model library is imported first (train: ~16 s)
    help_ = run([sys.executable, "-m", f"stages.{stage}", "--help"], ROOT)
    assert help_.stdout == f"usage: python -m stages.{stage} {STAGES[stage]}\n"


def test_no_heavy_library_is_imported_before_the_command_line_is_checked():
    """In one process: each stage run as __main__ with no argument stops before torch, Unsloth, ..."""
    from titletune.testing import ROOT, run
    code = ("import runpy, sys\n"
            f"for stage in {list(STAGES)}:\n"
            "    sys.argv = [stage]\n"
            "    try:\n"
            "        runpy.run_module('stages.' + stage, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as exit_:\n"
            "        assert exit_.code == 2, (stage, exit_.code)\n"
            f"print(sorted(set(m.split('.')[0] for m in sys.modules) & {set(HEAVY)}))\n")
    proc = run([sys.executable, "-c", code], ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout
    assert proc.stderr.count("usage: python -m stages.") == len(STAGES)


def test_a_plot_is_written_whole_and_its_figure_closed(tmp_path):
    import matplotlib.pyplot as plt
    fig, ax = new_figure(figsize=(2, 2))
    ax.plot([1, 2, 3])
    write_png(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    fig, _ = new_figure()
    with pytest.raises(AttributeError):
        write_png(fig, tmp_path / "broken.png", bbox_inches="no such box")   # savefig fails half-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"] and not plt.fignum_exists(fig.number)


@pytest.mark.parametrize("argv, why", [
    (["data/formatted", "data/formatted", "metrics"], "DATA_DIR and ADAPTER_DIR are the same path, data/formatted"),
    (["data/formatted", "./data/formatted/", "metrics"], "DATA_DIR and ADAPTER_DIR are the same path, data/formatted"),
    (["data/formatted", "models/adapter", "data/formatted/metrics"],
     "METRICS_DIR (data/formatted/metrics) is inside DATA_DIR (data/formatted)"),
])
def test_paths_that_overlap_are_refused_before_anything_is_written(argv, why, monkeypatch, capsys):
    """An output on or inside an input would replace or corrupt it (the training data by the adapter)."""
    monkeypatch.setattr(sys, "argv", ["stages/train.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        command_line("DATA_DIR ADAPTER_DIR METRICS_DIR")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python ") and err.endswith(f" DATA_DIR ADAPTER_DIR METRICS_DIR  ({why})\n"), err
