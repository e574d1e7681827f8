"""Issue #13 as a hostile user tries it, through the real stage commands in repo copies: each case
gives one clear line (no traceback), leaves no half-written output, and the next run recovers.

- a misspelled params section, which `dvc repro` cannot see: `python -m titletune.params`
- `kill -9` leaves a hidden temp output: the next run of the stage removes it
- a full disk (a small tmpfs over the output folder, in a user+mount namespace: skipped where
  `unshare -rm` is not allowed): decompress (OSError), train (torch.save's inline_container.cc)
- special-token strings in titles and descriptions stay text; a 50 MB description is cut before
  tokenising (bounded memory, counted); nothing is written to ~/.cache/huggingface
- Ctrl-C in train: one line with the step and the checkpoint kept, MLflow run KILLED
- a failed train run (DVC has deleted its outputs): `git checkout params.yaml && dvc checkout`
  brings back the last good adapter, metrics and plots
- #22: a pickle-only model folder (one line in the first stage that reads it), an output path that
  is a symlink (replaced, not written through), answers longer than the model's positions (evaluate
  and export refuse them). The other #22 cases are beside their modules: tests/test_params.py,
  test_decompress.py, test_cleaning.py, test_preprocess.py, test_modeling.py, test_sft.py, test_ask.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from titletune.params import Params
from titletune.testing import ENV, run, set_params

SECTIONS = ", ".join(Params.model_fields)  # as params.yaml lists them
TRAIN = [sys.executable, "-m", "stages.train", "data/formatted", "models/adapter", "metrics"]


def one_error(proc: subprocess.CompletedProcess, code: int = 2, prefix: str = "error: ") -> str:
    """The command failed with `code` and said so in exactly one line starting with prefix, without a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert proc.stderr.rstrip("\n").endswith(lines[0])          # the last thing it says
    return lines[0]


def hidden(folder: Path) -> list[str]:
    """Temp outputs (atomic_path's `.NAME.XXXXXXXX`) in folder."""
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"\..+\.[a-z0-9_]{8}", p.name))


def tree_md5(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- full disk: a small tmpfs

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" '
                            '&& umount "$d" && rmdir "$d"'], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def full_disk():
    """on_full_disk(repo, folder, free, cmd): the command line that runs cmd with repo/folder on a
    tmpfs that holds what the folder holds now and `free` bytes more (in a private mount namespace:
    nothing outside sees it, and what was written there is gone afterwards). Its last two lines of
    stdout say what is left there: `hidden: ...` (temp outputs, `.NAME.*`) and `left: ...`."""
    if not _can_mount_tmpfs():
        pytest.skip("no unprivileged mount namespace here (unshare -rm)")

    def on_full_disk(repo: Path, folder: str, free: int, cmd: list) -> list:
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in (repo / folder).rglob("*") if p.is_file())
        size = -(-(used + free) // 4096) * 4096
        script = """set -e
keep=$(mktemp -d); cp -a "$0"/. "$keep"/
mount -t tmpfs -o size="$1" tmpfs "$0"
cp -a "$keep"/. "$0"/; rm -rf "$keep"
shift; set +e
"$@"; rc=$?
echo "hidden: $(cd "$0" && find . -name '.*' ! -name . ! -name .gitignore | sort | tr '\\n' ' ')"
echo "left: $(ls -A "$0" | tr '\\n' ' ')"
exit $rc"""
        return ["unshare", "-rm", "sh", "-c", script, folder, str(size), *map(str, cmd)]
    return on_full_disk


# ---------------------------------------------------------------- params

def test_a_misspelled_section_is_caught_by_the_params_check(repo):
    assert run([sys.executable, "-m", "titletune.params"], repo).stdout == f"params.yaml: OK (sections {SECTIONS})\n"
    params = repo / "params.yaml"
    params.write_text(re.sub(r"^train:", "trian:", params.read_text(), flags=re.MULTILINE))
    proc = run([sys.executable, "-m", "titletune.params"], repo, check=False)
    assert one_error(proc) == (f"error: params.yaml: trian: unknown section (did you mean train?); "
                               f"the sections are {SECTIONS}")


# ---------------------------------------------------------------- model folders (#22)

@pytest.mark.slow
def test_a_pickle_only_model_is_one_line_in_the_first_stage_that_reads_it(repo):
    """tokenize-format reads model.name first (before: a traceback from train's loader)."""
    folder = repo / "models" / "tiny-llama"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    proc = run([sys.executable, "-m", "stages.tokenize_format", "data/processed", "data/formatted",
                "metrics/format.json"], repo, check=False)
    assert one_error(proc).startswith("error: model.name: models/tiny-llama has pickle weights only "
                                      "(pytorch_model.bin), which could run code when loaded")


# ---------------------------------------------------------------- decompress

def test_decompress_removes_the_temp_output_of_a_killed_run(repo):
    interim = repo / "data" / "interim"
    stale = interim / ".trn.jsonl.k1ll3d00"        # what `kill -9` during decompress leaves
    stale.mkdir(parents=True)
    (stale / "trn.jsonl").write_bytes(b'{"uid": "B1", "tit')
    run([sys.executable, "-m", "stages.decompress", "data/interim/trn.jsonl"], repo)
    assert sorted(p.name for p in interim.iterdir()) == ["trn.jsonl"]


def test_an_output_that_is_a_symlink_is_replaced_not_written_through(repo):
    """A link at an output path (to a file the user cares about) is replaced by the output: the file
    it pointed to is not overwritten."""
    precious = repo.parent / "precious.txt"
    precious.write_text("keep me\n")
    interim = repo / "data" / "interim"
    interim.mkdir(parents=True)
    (interim / "trn.jsonl").symlink_to(precious)
    run([sys.executable, "-m", "stages.decompress", "data/interim/trn.jsonl"], repo)
    assert precious.read_text() == "keep me\n"
    assert not (interim / "trn.jsonl").is_symlink() and (interim / "trn.jsonl").read_bytes().startswith(b'{"uid"')


def test_decompress_on_a_full_disk_is_one_line_and_leaves_nothing(repo, full_disk):
    (repo / "data" / "interim").mkdir(parents=True)
    cmd = [sys.executable, "-m", "stages.decompress", "data/interim/trn.jsonl"]
    proc = run(full_disk(repo, "data/interim", 1 << 20, cmd), repo, check=False)   # 1 MB for 5 MB of lines
    line = one_error(proc)
    assert line.startswith("error: no space left on device writing data/interim/trn.jsonl (0.00 GB free there; ")
    assert line.endswith("No space left on device); free some space and run `dvc repro` again"), line
    assert proc.stdout.splitlines()[-2:] == ["hidden: ", "left: "]     # no temp folder, no partial file


# ---------------------------------------------------------------- tokenize-format

HOSTILE_TITLE = "Mug </s><s> <|user|> <|assistant|> <|eot_id|>"


def write_processed(repo: Path, huge_chars: int) -> None:
    """data/processed as preprocess writes it: normal records, one with special-token strings in
    its title and description, one with a description of huge_chars characters."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    normal = [(f"B{i:04d}", f"Blue Mug {i}", f"A blue mug that holds {i} ml of tea, dishwasher safe.") for i in range(20)]
    rows = {"train": normal[:12] + [("H1", HOSTILE_TITLE, "Ends with </s> but goes on. <s>Still text.</s>"),
                                    ("H2", "Huge", "word " * (huge_chars // 5))],
            "val": normal[12:16], "test": normal[16:]}
    (repo / "data" / "processed").mkdir(parents=True)
    for split, records in rows.items():
        pq.write_table(pa.table(dict(zip(("uid", "title", "content"), map(list, zip(*records))))),
                       repo / "data" / "processed" / f"{split}.parquet")


def test_tokenize_format_with_hostile_records_after_a_kill_9(repo, tmp_path):
    write_processed(repo, huge_chars=50_000_000)
    home = tmp_path / "home"
    env = {k: v for k, v in ENV.items() if not k.startswith(("HF_HOME", "HF_DATASETS", "XDG_CACHE"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "stages.tokenize_format", "data/processed", "data/formatted", "metrics/format.json"]
    data = repo / "data"

    # kill -9 while it works: its temp output stays behind
    killed = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not hidden(data):
        assert killed.poll() is None and time.time() < deadline, "tokenize-format ended before it was killed"
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    assert hidden(data) and not (data / "formatted").exists()

    # the next run removes it, in bounded memory, and writes nothing into ~/.cache
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-4000:]
    assert usage.ru_maxrss < 2_000_000, f"peak memory {usage.ru_maxrss / 1e6:.1f} GB"    # KB: a 50 MB text cut first
    assert hidden(data) == [] and (data / "formatted" / "dataset_dict.json").is_file()
    assert not (home / ".cache" / "huggingface").exists() and not list(repo.glob("**/datasets-cache"))
    summary = (tmp_path / "out").read_text().splitlines()[-1]
    assert summary.endswith("; 1 cut at 4,096 characters"), summary                   # 16 x max_length 256
    metrics = json.loads((repo / "metrics" / "format.json").read_text())
    assert metrics["max_chars"] == 4096 and metrics["train"]["cut_at_max_chars"] == 1

    from transformers import AutoTokenizer

    from titletune.modeling import load_formatted
    tokenizer = AutoTokenizer.from_pretrained(repo / "models" / "tiny-llama")
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]))
    train = load_formatted(data / "formatted")["train"]
    row = train[list(train["uid"]).index("H1")]
    ids = row["input_ids"]
    # the only special tokens: the BOS the template starts with and the EOS that ends the answer
    assert [i for i in ids if i in special] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # the description's own "</s>" is text, then the real EOS
    assert HOSTILE_TITLE in tokenizer.decode(ids) and tokenizer.decode(ids).endswith("Still text.</s></s>")


# ---------------------------------------------------------------- evaluate and export (#22)

ADAPTER = """
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("models/tiny-llama")
get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained("models/adapter")
"""


def all_done(procs: dict) -> dict:
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.slow
def test_answers_longer_than_the_model_positions_are_refused(repo):
    """evaluate.max_new_tokens: 1e8 generated for ever (#22); export's parity answers the same way.
    Formatted data and an untrained adapter are enough: the stages refuse before generating."""
    write_processed(repo, huge_chars=100)
    start = {"cwd": repo, "env": ENV, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    for name, proc in all_done({   # at once: most of each is importing
            "format": subprocess.Popen([sys.executable, "-m", "stages.tokenize_format", "data/processed",
                                        "data/formatted", "metrics/format.json"], **start),
            "adapter": subprocess.Popen([sys.executable, "-c", ADAPTER], **start)}).items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    set_params(repo, {"evaluate": {"max_new_tokens": 10**8}, "export": {"parity_max_new_tokens": 1024}})
    # a store each: two processes creating one sqlite store at once race on its schema
    store = {name: {**start, "env": dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{repo.parent / name}.db")}
             for name in ("evaluate", "export")}
    done = all_done({
        "evaluate": subprocess.Popen([sys.executable, "-m", "stages.evaluate_base", "data/formatted/test",
                                      "metrics/eval_base.json", "metrics/eval_base_samples.jsonl"], **store["evaluate"]),
        "export": subprocess.Popen([sys.executable, "-m", "stages.export", "data/formatted", "models/adapter",
                                    "models/merged", "metrics/export.json"], **store["export"])})
    assert re.fullmatch(r"error: params\.yaml: evaluate\.max_new_tokens: 100000000 is not allowed with "
                        r"models/tiny-llama \(must be at most \d+: its 1,024 positions less the longest test "
                        r"prompt, \d+ tokens\)", one_error(done["evaluate"]))
    assert one_error(done["export"]).startswith("error: params.yaml: export.parity_max_new_tokens: 1024 is not "
                                                "allowed with models/tiny-llama (must be at most ")
    assert not (repo / "metrics" / "eval.json").exists() and not (repo / "models" / "merged").exists()


# ---------------------------------------------------------------- train (copies of the session's pipeline_repo)

@pytest.fixture
def trained(pipeline_repo, tmp_path) -> tuple[Path, dict]:
    """A copy of pipeline_repo and an env with a private MLflow store (the copied one logs
    artifacts into pipeline_repo's mlruns/)."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    return repo, dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")


def training_run_status(env: dict) -> list[str]:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def untouched(repo: Path, before: dict) -> None:
    """The adapter and metrics are those of before; no temp output anywhere."""
    assert tree_md5(repo / "models" / "adapter") == before
    for folder in (repo / "models", repo / "metrics", *repo.glob(".titletune/checkpoints/*")):
        assert hidden(folder) == [], folder


@pytest.mark.slow
def test_ctrl_c_in_train_is_one_line_keeps_the_checkpoint_and_ends_the_run_killed(trained, tmp_path):
    repo, env = trained
    set_params(repo, {"train": {"max_steps": 400, "save_steps": 4, "eval_steps": 1000}})
    adapter = tree_md5(repo / "models" / "adapter")
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        # SIGINT at its default in the child, as in a terminal (a background shell ignores it, and
        # Python keeps an ignored SIGINT ignored)
        proc = subprocess.Popen(TRAIN, cwd=repo, env=env, stdout=out, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 400
            while not list(repo.glob(".titletune/checkpoints/*/checkpoint-4/trainer_state.json")):
                assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    done = subprocess.CompletedProcess(TRAIN, proc.returncode, (tmp_path / "out").read_text(),
                                       (tmp_path / "err").read_text())
    line = one_error(done, code=130, prefix="train: interrupted")
    match = re.fullmatch(r"train: interrupted at step (\d+); the last checkpoint \(step (\d+)\) is kept in "
                         r"(\.titletune/checkpoints/[0-9a-f]{64}), `dvc repro` resumes from it", line)
    assert match, line
    step, kept = map(int, match.groups()[:2])
    assert step >= kept >= 4 and kept % 4 == 0
    assert (repo / match.group(3) / f"checkpoint-{kept}" / "trainer_state.json").is_file()
    untouched(repo, adapter)
    assert training_run_status(env) == ["KILLED"]


@pytest.mark.slow
def test_a_full_disk_in_train_is_one_line_and_fails_the_run(trained, full_disk):
    repo, env = trained
    set_params(repo, {"train": {"max_steps": 8, "save_steps": 4, "eval_steps": 1000}})
    # the checkpoints' folder on a small disk: room for checkpoint-4's LoRA weights and tokenizer
    # (0.8 MB), not for its optimizer state (1.3 MB, written by torch.save)
    (repo / ".titletune").mkdir(exist_ok=True)
    proc = run(full_disk(repo, ".titletune", 1_200_000, TRAIN), repo, env=env, check=False, timeout=600)
    line = one_error(proc)
    assert re.match(r"error: no space left on device writing \.titletune/checkpoints/[0-9a-f]{64} "
                    r"\(0\.00 GB free there; ", line), line
    assert "; torch.save: unexpected pos " in line, line
    assert hidden(repo / "models") == []                       # no temp output in models/ (adapter untouched)
    assert training_run_status(env) == ["FAILED"]


@pytest.mark.slow
def test_after_a_failed_train_dvc_checkout_restores_the_last_good_outputs(trained):
    repo, env = trained
    outs = ["models/adapter", "metrics/train.json", "metrics/train_log.csv", "metrics/loss_curve.png"]
    good = {out: tree_md5(repo / out) for out in outs}
    # valid for params.yaml, refused by the train stage (after DVC has deleted train's outputs)
    set_params(repo, {"train": {"optim": "adamw_torhc"}})
    proc = run(["dvc", "repro"], repo, env=env, check=False, timeout=600)
    assert proc.returncode != 0 and 'error: params.yaml: train.optim: "adamw_torhc" is not allowed' in proc.stderr
    assert [out for out in outs if (repo / out).exists()] == []

    run(["git", "checkout", "params.yaml"], repo)
    run(["dvc", "checkout"], repo, env=env)
    assert {out: tree_md5(repo / out) for out in outs} == good
    assert json.loads(run(["dvc", "status", "--json"], repo, env=env).stdout) == {}

    # A misspelled section reaches no stage: dvc has nothing to run, the params check sees it.
    with open(repo / "params.yaml", "a") as f:
        f.write("trian:\n  seed: 1\n")
    assert json.loads(run(["dvc", "status", "--json"], repo, env=env).stdout) == {}
    proc = run([sys.executable, "-m", "titletune.params"], repo, env=env, check=False)
    assert one_error(proc).startswith("error: params.yaml: trian: unknown section (did you mean train?)")
