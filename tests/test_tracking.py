"""titletune/tracking.py: the training run in MLflow, with MLflow's own source tags, the SFTConfig
params logged by transformers' callback, and ours (DVC experiment, data md5, LoRA and model)."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import yaml

from titletune.cli import UserError
from titletune.params import load_params, read_params
from titletune.testing import ENV, ROOT, run
from titletune.tracking import data_md5_from_lock

DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_data_md5_comes_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    assert data_md5_from_lock(lock=lock) is None                 # before the first `dvc repro`
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "preprocess": {"outs": [{"path": "data/processed", "md5": "aaa.dir"}]},
        "tokenize-format": {"outs": [{"path": "data/formatted", "md5": "bbb.dir"},
                                     {"path": "metrics/format.json", "md5": "ccc"}]}}}))
    assert data_md5_from_lock(lock=lock) == "bbb.dir"
    assert data_md5_from_lock("data/processed", lock=lock) == "aaa.dir"


@pytest.mark.slow
def test_the_training_run_is_tagged_and_has_every_param(pipeline_repo):
    from mlflow.tracking import MlflowClient
    repo = pipeline_repo
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"]
    record = client.get_run(run_id)
    tags, params = record.data.tags, record.data.params

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    formatted_md5 = next(o["md5"] for o in lock["stages"]["tokenize-format"]["outs"] if o["path"] == "data/formatted")
    assert tags["data_md5"] == formatted_md5 and tags["stage"] == "train" and tags["hardware"] == "cpu"
    assert "dvc_experiment" not in tags                            # a plain `dvc repro`, no experiment
    # MLflow's own: the commit of the checkout the stage ran in, and the script.
    head = __import__("subprocess").run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True,
                                        text=True).stdout.strip()   # pipeline_repo committed its outputs after
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.name"] == str(repo / "stages" / "train.py")

    model, fmt, train = load_params("model", "format", "train", path=repo / "params.yaml")
    # transformers' MLflow callback: the SFTConfig arguments as the trainer ran them
    assert float(params["learning_rate"]) == train.learning_rate
    assert int(params["per_device_train_batch_size"]) == train.per_device_train_batch_size
    assert float(params["warmup_steps"]) == train.warmup_steps and params["optim"].startswith("adamw_torch")
    # ours: every leaf key of params.yaml, as written there (train's sections by train, evaluate's by
    # evaluate, export's by export, all on this run)
    written = yaml.safe_load((repo / "params.yaml").read_text())
    leaves = {f"{section}.{key}": value for section, keys in written.items() for key, value in keys.items()}
    assert set(leaves) <= set(params), sorted(set(leaves) - set(params))
    for key, value in leaves.items():
        logged = params[key]
        if isinstance(value, list):
            assert json.loads(logged) == value, key
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(logged) == value, key
        else:
            assert logged == str(value), key
    assert params["train.optim"] == "auto" and params["train.tokens_per_step"] == "auto"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", record.info.run_name)    # start time + fingerprint
    assert tags["titletune.repo"] == str(repo) and int(tags["titletune.pid"]) > 0
    assert record.data.metrics["final_val_loss_after"] == pytest.approx(
        json.loads((repo / "metrics" / "train.json").read_text())["val_loss_after"])
    assert [m.value for m in client.get_metric_history(run_id, "loss")]  # per-step metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"adapter", "plots"}


# ---------------------------------------------------------------- a store that cannot be used

def closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]        # closed again when the block ends: nothing listens there


def unusable_stores(tmp_path) -> dict:
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "mlflow.db").write_bytes(b"<html>not a database</html>" * 50)
    return {"the server does not answer": f"http://127.0.0.1:{closed_port()}",
            "cannot be created": f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}",
            "is not an SQLite database": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_an_unusable_store_is_one_line_in_seconds(tmp_path, monkeypatch):
    from titletune.tracking import check_store
    for why, uri in unusable_stores(tmp_path).items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.perf_counter()
        with pytest.raises(UserError) as err:
            check_store()
        assert time.perf_counter() - started < 30, uri          # MLflow alone: 111 s to 254 s
        assert str(err.value).startswith(f"MLflow store {uri}: ") and why in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ    # the quick try is the check's own
    # A password in the URI is never printed.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret-token@127.0.0.1:{closed_port()}")
    with pytest.raises(UserError) as err:
        check_store()
    assert "s3cret" not in str(err.value) and f"MLflow store http://alice:***@127.0.0.1:" in str(err.value)


def test_train_stops_on_an_unusable_store_before_loading_anything(repo, tmp_path):
    """No data/formatted in this fresh copy: the store is checked first, so that is not what fails."""
    uri = unusable_stores(tmp_path)["is not an SQLite database"]
    proc = run([sys.executable, "-m", "stages.train", "data/formatted", "models/adapter", "metrics"], repo,
               check=False, env=dict(ENV, MLFLOW_TRACKING_URI=uri), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: MLflow store {uri}: ")


# ---------------------------------------------------------------- the run: name, params, stale runs

def test_a_run_is_named_after_the_experiment_else_its_start_and_fingerprint(monkeypatch):
    from titletune.tracking import run_name
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert re.fullmatch(r"\d{8}-\d{6}-3f2a9c1d", run_name("3f2a9c1d" + "0" * 56))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-high")
    assert run_name("3f2a9c1d") == "lr-high"


def test_every_leaf_of_a_section_is_a_param_and_a_long_value_is_cut():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    from titletune.tracking import section_params
    params = read_params(ROOT / "params.yaml")
    flat = section_params(params, "train", "format")
    assert set(flat) == {f"{s}.{k}" for s in ("train", "format") for k in DEFAULT[s]}
    assert json.loads(flat["format.questions"]) == DEFAULT["format"]["questions"] and flat["train.optim"] == "auto"
    many = params.model_copy(update={"format": params.format.model_copy(update={"questions": ["{title}?" * 9] * 999})})
    assert len(section_params(many, "format")["format.questions"]) == MAX_PARAM_VAL_LENGTH


START_RUN = """
import os, sys, time
from titletune.params import read_params
from titletune.tracking import start_training_run
start_training_run(read_params(sys.argv[1]), "f" * 64)
print("started", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), 9)       # no finally, no atexit: the run stays RUNNING
time.sleep(600)
"""


def test_the_next_start_ends_the_runs_of_killed_processes_of_this_repository_only(tmp_path, monkeypatch):
    import subprocess

    import mlflow
    from titletune.tracking import end_stale_runs, setup
    here, elsewhere = tmp_path / "repo", tmp_path / "other-repo"
    here.mkdir(), elsewhere.mkdir()
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT))

    def start(cwd, fate):
        return subprocess.Popen([sys.executable, "-c", START_RUN, str(ROOT / "params.yaml"), fate], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    alive = start(here, "live")
    assert alive.stdout.readline() == "started\n"          # its run exists before the others start
    killed = [start(here, "kill"), start(elsewhere, "kill")]
    try:
        assert [proc.wait(timeout=120) for proc in killed] == [-9, -9]
        monkeypatch.chdir(here)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        setup()
        with mlflow.start_run(run_name="by hand"):            # no process tags: never ours to end
            pass
        mlflow.MlflowClient().set_terminated(mlflow.last_active_run().info.run_id, status="RUNNING")
        before = {r.info.run_id: r for r in mlflow.search_runs(output_format="list")}
        assert sorted(r.info.status for r in before.values()) == ["RUNNING"] * 4
        ended = end_stale_runs()
        after = {r.info.run_id: r for r in mlflow.search_runs(output_format="list")}
    finally:
        alive.kill()
        alive.wait()
    status = {(r.data.tags.get("titletune.repo"), r.data.tags.get("titletune.pid")): r.info.status
              for r in after.values()}
    assert status == {(str(here), str(alive.pid)): "RUNNING",                                   # still alive
                      (str(here), str(killed[0].pid)): "KILLED",                                # ended now
                      (str(elsewhere), str(killed[1].pid)): "RUNNING",                          # another repository
                      (None, None): "RUNNING"}                                                  # started by hand
    assert ended == [next(r.info.run_name for r in after.values() if r.info.status == "KILLED")]
    assert re.fullmatch(r"\d{8}-\d{6}-ffffffff", ended[0])


def test_a_stage_rerun_with_other_settings_logs_into_a_run_of_its_own(tmp_path, monkeypatch):
    import mlflow
    from titletune.tracking import log_evaluation, setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    setup()
    with mlflow.start_run(run_name="training") as training:
        pass
    (tmp_path / "train.json").write_text(json.dumps({"mlflow_run_id": training.info.run_id}))
    params = read_params(ROOT / "params.yaml")
    report = {"samples": 8, **{m: {"rougeL": 0.5} for m in ("base", "tuned", "delta")}}
    first = log_evaluation(params, report, [], tmp_path / "train.json")
    again = log_evaluation(params, report, [], tmp_path / "train.json")     # the same settings: the same run
    other = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"max_samples": 16})})
    separate = log_evaluation(other, report, [], tmp_path / "train.json")
    assert first == again == training.info.run_id != separate
    client = mlflow.MlflowClient()
    assert client.get_run(first).data.params["evaluate.max_samples"] == str(params.evaluate.max_samples)
    record = client.get_run(separate)
    assert record.data.params["evaluate.max_samples"] == "16" and record.data.tags["train_run_id"] == first
    assert record.info.run_name.startswith("evaluate-")
    client.delete_run(training.info.run_id)                 # deleted in the UI: MLflow refuses to log into it
    assert log_evaluation(params, report, [], tmp_path / "train.json") not in (first, separate)


@pytest.mark.parametrize("damaged", ["not json", "[1, 2]", '{"mlflow_run_id": 7}'])
def test_a_damaged_train_json_is_said_and_the_results_go_to_a_run_of_their_own(damaged, tmp_path, capsys):
    from titletune.tracking import _train_json_run_id
    (tmp_path / "train.json").write_text(damaged)
    assert _train_json_run_id(tmp_path / "train.json") is None
    assert "train.json: no mlflow_run_id (damaged?)" in capsys.readouterr().out
