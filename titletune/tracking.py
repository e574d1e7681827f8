"""MLflow: the store, the training run and its tags, and evaluate's results on that same run.

What MLflow and transformers record by themselves is not repeated here: MLflow tags each run
with its source (`mlflow.source.git.commit` when the command runs from a git checkout,
`mlflow.source.name`), and transformers' MLflow callback (`report_to=["mlflow"]` in
training.sft_config) logs every SFTConfig argument and the model config as params and the
losses per step. Ours: the DVC experiment, the md5 of the training data, and the params that
do not reach SFTConfig (model, format, LoRA).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import yaml

from titletune.cli import Interrupted

# train params that do not reach SFTConfig as they are (the callback logs those it gets): LoRA,
# gradient checkpointing (given to Unsloth), gpus and `optim: auto` (resolved by the hardware).
OURS = ("gpus", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "gradient_checkpointing", "optim")


def setup():
    """The store: MLFLOW_TRACKING_URI (a team server) if set, else mlflow.db (sqlite, git-ignored)
    in the repository root; `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it."""
    import mlflow
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').absolute()}")
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "titletune"))
    return mlflow


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


def start_training_run(model, fmt, train):
    """The train stage's run, named after the DVC experiment (`dvc exp run -n NAME`), if any."""
    mlflow = setup()
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(run_name=exp_name)
    mlflow.set_tags({k: v for k, v in {"dvc_experiment": exp_name, "data_md5": data_md5_from_lock(),
                                       "stage": "train"}.items() if v})
    mlflow.log_params({**{f"model.{k}": v for k, v in model.model_dump().items()},
                       **{f"format.{k}": v for k, v in fmt.model_dump().items()},
                       **{f"train.{k}": getattr(train, k) for k in OURS}})
    return run


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


def log_evaluation(train_metrics: Path, report: dict, files: list[Path], settings: dict) -> str:
    """Log evaluate's metrics and files to the training run (`mlflow_run_id` in metrics/train.json);
    if that run is not in this store (trained elsewhere), to a new run tagged with its id."""
    mlflow = setup()
    from mlflow.exceptions import MlflowException
    train_run_id = json.loads(train_metrics.read_text()).get("mlflow_run_id") if train_metrics.is_file() else None
    try:
        run_args = {"run_id": mlflow.get_run(train_run_id).info.run_id} if train_run_id else None
    except MlflowException:
        run_args = None
    if run_args is None:
        run_args = {"run_name": "evaluate",
                    "tags": {"stage": "evaluate", **({"train_run_id": train_run_id} if train_run_id else {})}}
    with mlflow.start_run(**run_args) as run:
        mlflow.log_metrics({f"eval_{model}_{k}": float(v) for model in ("base", "tuned", "delta")
                            for k, v in report[model].items()})
        mlflow.log_metric("eval_samples", report["samples"])
        # Tags, not params: evaluate may be re-run with other settings on the same training run.
        mlflow.set_tags({f"evaluate.{k}": str(v) for k, v in settings.items()})
        for f in files:
            mlflow.log_artifact(str(f), "eval")
        return run.info.run_id


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


# ---------------------------------------------------------------- model registry

def adapter_md5(adapter_dir: Path) -> str:
    """The adapter's identity in the registry: the md5 of its weights file."""
    import hashlib
    with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def git_commit() -> str | None:
    """The commit the stage runs at (HEAD of the checkout it runs in), or None outside git."""
    import subprocess
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _training_run_id(mlflow, train_metrics: Path = Path("metrics/train.json")) -> str | None:
    """The adapter's training run (`mlflow_run_id` in metrics/train.json), if it is in this store."""
    from mlflow.exceptions import MlflowException
    run_id = json.loads(train_metrics.read_text()).get("mlflow_run_id") if train_metrics.is_file() else None
    try:
        return mlflow.get_run(run_id).info.run_id if run_id else None
    except MlflowException:
        return None


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
    run_id = _training_run_id(mlflow) or holder_run_id
    if run_id is None:
        with mlflow.start_run(run_name="registry", tags={"stage": "registry"}) as run:
            run_id = run.info.run_id
    if not any(a.path == "adapter" for a in client.list_artifacts(run_id)):
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="titletune LoRA adapters (titletune.tracking)")
    tags = {"adapter_md5": md5, "training_run_id": _training_run_id(mlflow) or "",
            "git_commit": git_commit() or "", "data_md5": data_md5_from_lock() or "",
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


def register_export(name: str, adapter_dir: Path, merged_dir: Path, report: dict):
    """export: the merged model, logged next to the adapter (artifact `merged` of the version's run),
    and the parity figures, as tags of the adapter's registry version."""
    from mlflow import MlflowClient
    version = adapter_version(name, adapter_dir)
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
