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
