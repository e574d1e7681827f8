"""MLflow: the store, the training run and its tags, and the later stages' results on that same run.

What MLflow and transformers record by themselves is not repeated here: MLflow tags each run
with its source (`mlflow.source.git.commit` when the command runs from a git checkout,
`mlflow.source.name`), and transformers' MLflow callback (`report_to=["mlflow"]` in
training.sft_config) logs every SFTConfig argument as the trainer ran it (`learning_rate`,
`optim: adamw_torch`) and the losses per step. Ours:

- params.yaml, every leaf key as a param named `section.key` (`train.optim: auto`, as written),
  each logged by the stage that reads it: train logs data, preprocess, model, format and train
  (what made the adapter), evaluate adds evaluate.*, export adds export.*, all on the training
  run. MLflow keeps a param's first value: a stage re-run with other settings on the same
  adapter (evaluate.max_samples changed) logs into a new run named after the stage and tagged
  `train_run_id`, so a run's params are always the ones its metrics were measured with.
- the run's name: the DVC experiment's (`dvc exp run -n NAME`), else the start time and the
  first 8 characters of the run's fingerprint (its params and data, the name of its checkpoint
  folder): `20261206-221530-3f2a9c1d`.
- tags: the DVC experiment, the md5 of the training data, and where the run's process lives
  (`titletune.repo`, `titletune.host`, `titletune.pid`): a run whose process was killed with
  SIGKILL stays RUNNING, and the next training run of the same repository ends it KILLED.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from titletune.cli import Interrupted, UserError

PROCESS_TAGS = ("titletune.repo", "titletune.host", "titletune.pid", "titletune.pid_started")


# ---------------------------------------------------------------- the store

def store_uri() -> str:
    """MLFLOW_TRACKING_URI (a team server) if set, else mlflow.db (sqlite, git-ignored) in the
    repository root; `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').absolute()}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "titletune")


def setup():
    """MLflow pointed at the store (store_uri) and the experiment (experiment_name)."""
    import mlflow
    uri = store_uri()
    # Set every time: a URI set earlier in this process (another store) must not outlive the env var.
    mlflow.set_tracking_uri(uri)
    with sqlite_lock(uri):
        mlflow.set_experiment(experiment_name())
    return mlflow


def sqlite_lock(uri: str):
    """For a sqlite store, a lock file beside it (`mlflow.db.lock`): the first access creates and
    migrates the database and the experiment, and two runs at once (`dvc queue start -j 2`) doing
    that both fail ("Online migration expected to match one row"). A server locks for itself."""
    if not uri.startswith("sqlite:"):
        return contextlib.nullcontext()
    from filelock import FileLock
    from sqlalchemy.engine import make_url
    return FileLock(f"{make_url(uri).database}.lock")


def check_store() -> None:
    """Fail in seconds, with one line, where the store cannot be used: a server that does not
    answer (MLflow would retry for minutes), a sqlite file that cannot be written or is not a
    database. Stages call it before they load a model."""
    uri = store_uri()
    if uri.startswith("sqlite:"):
        _check_sqlite(uri)
    # One quick try, where the user has not chosen otherwise.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update({key: value for key, value in quick.items() if saved[key] is None})
    try:
        setup()
    except Exception as err:
        text = " ".join(str(err).split())
        reason = "the server does not answer" if "Max retries exceeded" in text or "Connection" in text \
            else f"{type(err).__name__}: {text[:200]}"
        password = urlsplit(uri).password
        raise UserError(f"MLflow store {shown_uri(uri)}: cannot be used "
                        f"({reason.replace(password, '***') if password else reason}); fix MLFLOW_TRACKING_URI "
                        "or MLFLOW_EXPERIMENT_NAME, or unset them (mlflow.db, experiment titletune)") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def shown_uri(uri: str) -> str:
    """The store's URI without its password (`https://user:TOKEN@host`), for messages and logs."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _check_sqlite(uri: str) -> None:
    from sqlalchemy.engine import make_url
    db = make_url(uri).database
    if not db or db == ":memory:":
        raise UserError(f"MLflow store {uri}: not a file (an in-memory store would lose every run)")
    path = Path(db)
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())  # MLflow makes the rest
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK):
            raise UserError(f"MLflow store {uri}: {path} cannot be written; fix its permissions or set "
                            "MLFLOW_TRACKING_URI to another file")
        with open(path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise UserError(f"MLflow store {uri}: {path} is not an SQLite database (damaged?); move it "
                            "away to start a new store, or set MLFLOW_TRACKING_URI to another file")
    elif not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"MLflow store {uri}: {path} cannot be created ({folder} is not a writable folder)")


# ---------------------------------------------------------------- the training run

def data_md5_from_lock(path: str = "data/formatted", lock: Path | str = "dvc.lock") -> str | None:
    """The md5 DVC recorded for the training data (dvc.lock is written after each stage)."""
    lock = Path(lock)
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def section_params(params, *sections: str) -> dict[str, str]:
    """Every leaf key of these params.yaml sections as an MLflow param, `train.learning_rate`: its
    value as validated, lists as JSON, cut to what MLflow stores (a long list of questions)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    flat = {}
    for section in sections:
        for key, value in getattr(params, section).model_dump().items():
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
            flat[f"{section}.{key}"] = text if len(text) <= MAX_PARAM_VAL_LENGTH \
                else text[:MAX_PARAM_VAL_LENGTH - 9] + " ...(cut)"
    return flat


# The sections of the stages after train log themselves on this run (their values when they ran);
# train logs every other one: what made the adapter, and predict's, which no stage reads.
LATER_SECTIONS = ("evaluate", "export")


def train_sections(params) -> list[str]:
    return [s for s in type(params).model_fields if s not in LATER_SECTIONS]


def run_name(fingerprint: str) -> str:
    """The DVC experiment's name, else the start time and the run's fingerprint (module docstring)."""
    return os.environ.get("DVC_EXP_NAME") or f"{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:8]}"


def start_training_run(params, fingerprint: str):
    """The train stage's run, after ending the runs of this repository whose process is gone."""
    mlflow = setup()
    end_stale_runs()
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(run_name=run_name(fingerprint))
    mlflow.set_tags({k: v for k, v in {"dvc_experiment": exp_name, "data_md5": data_md5_from_lock(),
                                       "stage": "train", **process_tags()}.items() if v})
    mlflow.log_params(section_params(params, *train_sections(params)))
    return run


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Where a run's process lives: the repository, the host, the pid and its start time (a pid
    reused by another process has another start time)."""
    import psutil
    process = psutil.Process(pid)
    return {"titletune.repo": str(Path.cwd().resolve()), "titletune.host": socket.gethostname(),
            "titletune.pid": str(process.pid), "titletune.pid_started": f"{process.create_time():.2f}"}


def _process_alive(tags: dict) -> bool:
    import psutil
    try:
        return process_tags(int(tags["titletune.pid"]))["titletune.pid_started"] == tags["titletune.pid_started"]
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, ValueError):
        return True   # cannot tell (another user's process): leave its run alone


def end_stale_runs() -> list[str]:
    """End KILLED the RUNNING runs of this repository on this host whose process is gone (killed
    with SIGKILL, or the machine lost power: no `finally` ran). Runs of other repositories, other
    hosts, live processes or without our tags (started by hand) are left as they are."""
    from mlflow import MlflowClient
    import mlflow
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(experiment_name())
    here = {k: v for k, v in process_tags().items() if k in ("titletune.repo", "titletune.host")}
    ended = []
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if all(tags.get(k) == v for k, v in here.items()) and all(k in tags for k in PROCESS_TAGS) \
                and not _process_alive(tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_name)
    if ended:
        print(f"train: ended {len(ended)} MLflow run(s) of this repository whose process was killed "
              f"(now KILLED): {', '.join(ended)}", flush=True)
    return ended


@contextlib.contextmanager
def ended_if_failed():
    """If the block fails, end the active training run KILLED (Ctrl-C, SIGTERM) or FAILED (any
    other error), never FINISHED (MLflow's exit hook would say so) nor RUNNING. A process killed
    with SIGKILL cannot: its run stays RUNNING."""
    try:
        yield
    except BaseException as err:
        import mlflow
        if mlflow.active_run() is not None:
            status = "KILLED" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "FAILED"
            with contextlib.suppress(Exception):  # a full disk may fail this too: report the first error
                mlflow.end_run(status=status)
        raise


def finish_training_run(metrics: dict, adapter_dir: Path, plots: list[Path], hardware: str) -> None:
    """The final metrics, the adapter and the plots of the active training run; then end it."""
    import mlflow
    mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    for plot in plots:
        mlflow.log_artifact(str(plot), "plots")
    mlflow.set_tags({"hardware": hardware, "attention": metrics["attention"]})
    mlflow.end_run()


# ---------------------------------------------------------------- evaluate and export: the training run

def _train_json_run_id(train_metrics: Path = Path("metrics/train.json")) -> str | None:
    """The adapter's training run id, as train wrote it in metrics/train.json (a damaged file: said,
    and None: the stage logs into a run of its own)."""
    if not train_metrics.is_file():
        return None
    try:
        run_id = json.loads(train_metrics.read_text(encoding="utf-8")).get("mlflow_run_id")
    except (ValueError, AttributeError):
        run_id = None
    if not isinstance(run_id, str):
        print(f"{train_metrics}: no mlflow_run_id (damaged?); the results go to an MLflow run of their own",
              flush=True)
        return None
    return run_id


def _in_store(mlflow, run_id: str | None) -> str | None:
    """run_id (the adapter's training run), if that run is in this store (and not deleted there:
    MLflow refuses to log into a deleted run)."""
    from mlflow.exceptions import MlflowException
    try:
        info = mlflow.get_run(run_id).info if run_id else None
    except MlflowException:
        return None
    return info.run_id if info and info.lifecycle_stage == "active" else None


@contextlib.contextmanager
def stage_run(params, section: str, train_metrics: Path = Path("metrics/train.json")):
    """The run evaluate or export logs into, with params.yaml's `section` added as params: the
    training run (`mlflow_run_id` in metrics/train.json), unless it is not in this store (trained
    elsewhere) or holds other values of these params (the stage re-ran with other settings): then
    a new run named after the stage, tagged with the training run's id."""
    mlflow = setup()
    from mlflow import MlflowClient
    logged = section_params(params, section)
    train_run_id = _train_json_run_id(train_metrics)
    in_store = _in_store(mlflow, train_run_id)
    known = MlflowClient().get_run(in_store).data.params if in_store else {}
    if in_store and all(known.get(key, value) == value for key, value in logged.items()):
        run_args = {"run_id": in_store}
    else:
        run_args = {"run_name": f"{section}-{time.strftime('%Y%m%d-%H%M%S')}",
                    "tags": {"stage": section, **({"train_run_id": train_run_id} if train_run_id else {})}}
    with mlflow.start_run(**run_args) as run:
        mlflow.log_params(logged)
        yield run


def log_evaluation(params, report: dict, files: list[Path], train_metrics: Path) -> str:
    """evaluate's metrics and files, in its stage_run; its id."""
    import mlflow
    with stage_run(params, "evaluate", train_metrics) as run:
        mlflow.log_metrics({f"eval_{model}_{k}": float(v) for model in ("base", "tuned", "delta")
                            for k, v in report[model].items()})
        mlflow.log_metric("eval_samples", report["samples"])
        for f in files:
            mlflow.log_artifact(str(f), "eval")
        return run.info.run_id


def log_export(params, report: dict) -> str:
    """export's parity figures (metrics/export.json's numbers), in its stage_run; its id."""
    import mlflow
    with stage_run(params, "export") as run:
        mlflow.log_metrics({f"export_{k}": float(v) for k, v in report.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return run.info.run_id


# ---------------------------------------------------------------- model registry

def adapter_md5(adapter_dir: Path) -> str:
    """The adapter's identity in the registry: the md5 of its weights file."""
    import hashlib
    with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def adapter_version(name: str, adapter_dir: Path, holder_run_id: str | None = None):
    """The registry version of this adapter (registered model `name`), created on first use: one
    version per trained adapter (tag adapter_md5), whichever of evaluate and export comes first.
    Its source is the adapter's artifacts in the training run, or, where that run is not in this
    store (trained elsewhere, or restored from DVC's run-cache), in holder_run_id / a new run."""
    mlflow = setup()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client, md5 = MlflowClient(), adapter_md5(adapter_dir)
    found = client.search_model_versions(f"name = '{name}' and tags.adapter_md5 = '{md5}'")
    if found:
        return max(found, key=lambda v: int(v.version))
    training_run_id = _in_store(mlflow, _train_json_run_id())
    run_id = training_run_id or holder_run_id
    if run_id is None:
        with mlflow.start_run(run_name="registry", tags={"stage": "registry"}) as run:
            run_id = run.info.run_id
    if not any(a.path == "adapter" for a in client.list_artifacts(run_id)):
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="titletune LoRA adapters (titletune.tracking)")
    # The commit MLflow recorded for the run that holds the adapter (its source tag).
    commit = client.get_run(run_id).data.tags.get("mlflow.source.git.commit", "")
    tags = {"adapter_md5": md5, "training_run_id": training_run_id or "",
            "git_commit": commit, "data_md5": data_md5_from_lock() or "",
            "dvc_experiment": os.environ.get("DVC_EXP_NAME", "")}
    return client.create_model_version(name, source=f"{client.get_run(run_id).info.artifact_uri}/adapter",
                                       run_id=run_id, tags={k: v for k, v in tags.items() if v})


def register_evaluation(name: str, adapter_dir: Path, report: dict, holder_run_id: str, base_model: str):
    """evaluate: the adapter's registry version gets the eval metrics (tuned and tuned - base) as tags."""
    from mlflow import MlflowClient
    version = adapter_version(name, adapter_dir, holder_run_id)
    tags = {f"eval_{model}_{k}": f"{float(v):.6g}" for model in ("tuned", "delta") for k, v in report[model].items()}
    tags.update(eval_samples=str(report["samples"]), base_model=base_model)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return version


def register_export(name: str, adapter_dir: Path, merged_dir: Path, report: dict, holder_run_id: str):
    """export: the merged model, logged next to the adapter (artifact `merged` of the version's run),
    and the parity figures, as tags of the adapter's registry version."""
    from mlflow import MlflowClient
    version = adapter_version(name, adapter_dir, holder_run_id)
    client = MlflowClient()
    client.log_artifacts(version.run_id, str(merged_dir), "merged")
    tags = {"merged_model": f"{client.get_run(version.run_id).info.artifact_uri}/merged",
            **{f"export_{k}": str(report[k]) for k in ("dtype", "passed", "token_mismatch", "nll_max_abs_diff")
               if k in report}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return version


def register_gguf(name: str, adapter_dir: Path, gguf_dir: Path, report: dict):
    """gguf: the GGUF files and the Modelfile, logged next to the adapter (artifact `gguf` of the
    version's run), and each type's gate result, as tags of the adapter's registry version."""
    from mlflow import MlflowClient
    version = adapter_version(name, adapter_dir)
    client = MlflowClient()
    client.log_artifacts(version.run_id, str(gguf_dir), "gguf")
    tags = {"gguf": f"{client.get_run(version.run_id).info.artifact_uri}/gguf",
            **{f"gguf_{t}_{k}": str(r[k]) for t, r in report["types"].items()
               for k in ("passed", "size_mb", "answers_identical", "nll_max_abs_diff")}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return version
