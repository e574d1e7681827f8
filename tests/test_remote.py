"""Remote cache round trips: push from a repo that ran the pipeline, `git clone` it fresh,
`dvc pull`, and check that nothing is left to do (`dvc status` clean, `dvc repro` runs nothing).

Two remotes: a shared directory, and a real S3-compatible server (moto in server mode on
127.0.0.1, started and stopped by the test) reached through dvc-s3 like any S3 bucket.
And the run-cache: a second clone of the same code and params gets `train`'s outputs from the
remote without training. No training here: all reuse the session's `pipeline_repo`.
"""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from titletune.testing import ENV, run

UP_TO_DATE = "Data and pipelines are up to date."


def copy_pipeline(pipeline_repo: Path, dest: Path) -> Path:
    """A private copy of the pipeline repo (its .dvc/cache included)."""
    shutil.copytree(pipeline_repo, dest, symlinks=True)
    return dest


def check_round_trip(repo: Path, clone: Path, push_env: dict, env: dict) -> None:
    """repo has a default remote configured and committed: push (with push_env), clone, pull
    and check (with env)."""
    push = run(["dvc", "push"], repo, env=push_env, timeout=300)
    assert "pushed" in push.stdout, push.stdout
    assert "in sync" in run(["dvc", "status", "--cloud"], repo, env=push_env).stdout

    run(["git", "clone", "-q", str(repo), str(clone)], clone.parent, env=env)
    assert not (clone / ".dvc" / "cache").exists()          # a clone has no data, only pointers
    assert not (clone / "data" / "formatted").exists()
    pull = run(["dvc", "pull"], clone, env=env, timeout=300)
    assert "failed" not in (pull.stdout + pull.stderr).lower(), pull.stdout + pull.stderr

    lock = (clone / "dvc.lock").read_text()
    for out in ("data/interim/trn.jsonl", "data/processed", "data/formatted", "models/adapter",
                "models/merged"):
        assert (clone / out).exists(), f"{out} missing after dvc pull"
        assert f"path: {out}" in lock

    status = run(["dvc", "status"], clone, env=env)
    assert UP_TO_DATE in status.stdout, status.stdout
    repro = run(["dvc", "repro"], clone, env=env, timeout=300)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert UP_TO_DATE in repro.stdout, repro.stdout
    # Nothing was rewritten: the lock file and every git-tracked file are untouched.
    assert run(["git", "status", "--porcelain"], clone, env=env).stdout == ""


@pytest.mark.slow
def test_directory_remote_round_trip(pipeline_repo, tmp_path):
    repo = copy_pipeline(pipeline_repo, tmp_path / "repo")
    store = tmp_path / "shared-cache"
    run(["dvc", "remote", "add", "-d", "shared", str(store)], repo)
    run(["git", "commit", "-qam", "dvc remote: shared directory"], repo)

    check_round_trip(repo, tmp_path / "clone", ENV, ENV)
    assert any((store / "files" / "md5").iterdir())          # DVC 3 layout of the remote


@pytest.mark.slow
def test_a_teammate_gets_train_from_the_run_cache_without_training(pipeline_repo, tmp_path):
    """Clone A ran the pipeline (the fixture) and pushes with --run-cache. Clone B, at the same
    code and params but without A's dvc.lock (a teammate about to run the same experiment), gets
    `train` from the remote: DVC finds the run in the run-cache and checks its outputs out."""
    a = copy_pipeline(pipeline_repo, tmp_path / "a")
    store = tmp_path / "shared-cache"
    run(["dvc", "remote", "add", "-d", "shared", str(store)], a)
    push = run(["dvc", "push", "--run-cache"], a, timeout=300)
    assert "pushed" in push.stdout, push.stdout
    assert any((store / "runs").iterdir())                 # the run-cache entries (one per stage run)

    b = tmp_path / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    run(["git", "checkout", "-q", "HEAD~1"], b)              # the commit A ran: no dvc.lock, no outputs
    assert not (b / "dvc.lock").exists() and not (b / "models" / "adapter").exists()
    assert run(["git", "diff", "--stat", "HEAD", "main", "--", "params.yaml", "dvc.yaml", "stages", "titletune"],
               b).stdout == ""                               # same code and params as A's run
    run(["dvc", "remote", "add", "-d", "shared", str(store)], b)
    # --pull: fetch the run-cache, and the outputs of every stage found in it (a plain `dvc repro`
    # would only use objects already in the local cache).
    repro = run(["dvc", "repro", "--pull", "train"], b, timeout=900)
    out = repro.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out, out
    assert "Running stage 'train'" not in out
    for path in ("models/adapter/adapter_model.safetensors", "metrics/train.json", "metrics/train_log.csv",
                 "metrics/loss_curve.png"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert not (b / "mlflow.db").exists() and not (b / "mlruns").exists()   # no training run in B
    assert not (b / ".titletune").exists()                                   # no checkpoints either
    assert json.loads(run(["dvc", "status", "--json", "train"], b).stdout) == {}


# ---------------------------------------------------------------- S3 (moto server on loopback)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server():
    """A moto S3 server on 127.0.0.1 for one test; stopped afterwards. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# Fake credentials that moto accepts. They go in .dvc/config.local (git-ignored) or the
# environment, never in the committed .dvc/config.
KEY_ID, SECRET = "titletune-test-key", "titletune-test-secret"


@pytest.mark.slow
def test_s3_remote_round_trip(pipeline_repo, tmp_path, s3_server):
    import boto3
    bucket = "titletune-cache"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    s3.create_bucket(Bucket=bucket)

    # No AWS config of this machine may leak in: only what the test gives.
    env = {k: v for k, v in ENV.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
               AWS_DEFAULT_REGION="us-east-1")

    repo = copy_pipeline(pipeline_repo, tmp_path / "repo")
    run(["dvc", "remote", "add", "-d", "s3cache", f"s3://{bucket}/titletune"], repo, env=env)
    run(["dvc", "remote", "modify", "s3cache", "endpointurl", s3_server], repo, env=env)
    # Credentials of the pushing repo: --local, i.e. .dvc/config.local, which git ignores.
    run(["dvc", "remote", "modify", "--local", "s3cache", "access_key_id", KEY_ID], repo, env=env)
    run(["dvc", "remote", "modify", "--local", "s3cache", "secret_access_key", SECRET], repo, env=env)
    run(["git", "add", "-A"], repo, env=env)
    run(["git", "commit", "-qm", "dvc remote: s3"], repo, env=env)
    committed = run(["git", "show", "HEAD:.dvc/config"], repo, env=env).stdout
    assert s3_server in committed and SECRET not in committed and KEY_ID not in committed
    assert ".dvc/config.local" not in run(["git", "ls-files"], repo, env=env).stdout

    # The pusher's credentials come from config.local; the clone has none, so its own come from
    # the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), as on a CI machine.
    clone_env = dict(env, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    check_round_trip(repo, tmp_path / "clone", env, clone_env)
    assert not (tmp_path / "clone" / ".dvc" / "config.local").exists()
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="titletune/files/md5/")
    assert objects["KeyCount"] > 0
