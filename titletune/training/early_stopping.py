"""Early stopping on the validation loss (train.early_stopping_patience), with transformers' own callback."""
from __future__ import annotations

from transformers import EarlyStoppingCallback


def early_stopping_args(tp) -> dict:
    """With train.early_stopping_patience: keep the checkpoint of the lowest validation loss and
    load it when training ends (the trainer evaluates a dict of sets: the split `val` is
    eval_val_loss). params checks that save_steps is a multiple of eval_steps."""
    if not tp.early_stopping_patience:
        return {}
    return {"load_best_model_at_end": True, "metric_for_best_model": "eval_val_loss", "greater_is_better": False}


class ValLossEarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback on the validation split alone: the trainer evaluates a
    dict of sets and calls on_evaluate once per set; the other set (train_subset) has no
    eval_val_loss, and transformers' callback would warn for it that early stopping is disabled."""

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if args.metric_for_best_model in metrics:
            super().on_evaluate(args, state, control, metrics, **kwargs)


def early_stopping_callbacks(tp) -> list:
    """transformers' own EarlyStoppingCallback, or nothing (train.early_stopping_patience 0)."""
    return [ValLossEarlyStopping(early_stopping_patience=tp.early_stopping_patience)] \
        if tp.early_stopping_patience else []


def stopping_metrics(trainer, log_history: list[dict], tp) -> dict:
    """Why training stopped and which step's adapter is kept (metrics/train.json). Call it when
    training has ended, before any other evaluation (losses() would count as one more evaluation
    without improvement); log_history: the trainer's at that point."""
    stopper = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    stopped = bool(stopper) and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience \
        and trainer.state.global_step < trainer.state.max_steps   # at max_steps it ends anyway
    best_step = best_val_loss = None
    if stopper and trainer.state.best_model_checkpoint:   # the best step was saved: its weights are kept
        best_step = trainer.state.best_global_step
        best_val_loss = next((e["eval_val_loss"] for e in log_history
                              if e.get("step") == best_step and "eval_val_loss" in e), None)
    reason = (f"early stopping: the validation loss did not improve for {tp.early_stopping_patience} evaluations"
              if stopped else "max_steps" if tp.max_steps > 0 else "num_train_epochs")
    return {"stopped_early": stopped, "stop_reason": reason, "best_step": best_step, "best_val_loss": best_val_loss}
