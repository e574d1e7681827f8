"""titletune/training/early_stopping.py: the SFTConfig keys, the callback on a dict of eval sets, why training stopped."""
from __future__ import annotations

from types import SimpleNamespace as NS

from titletune.params import load_params
from titletune.training.early_stopping import early_stopping_args, early_stopping_callbacks, stopping_metrics

TRAIN = load_params("train")
ON = TRAIN.model_copy(update=dict(early_stopping_patience=1, eval_steps=2, save_steps=2))
ARGS = NS(metric_for_best_model="eval_val_loss", greater_is_better=False)   # what early_stopping_args sets
HISTORY = [{"step": 2, "eval_val_loss": 1.0}, {"step": 4, "eval_val_loss": 1.5}]


def test_off_adds_nothing_and_on_keeps_the_lowest_validation_loss():
    assert early_stopping_args(TRAIN) == {} and early_stopping_callbacks(TRAIN) == []
    assert early_stopping_args(ON) == {"load_best_model_at_end": True, "metric_for_best_model": "eval_val_loss",
                                       "greater_is_better": False}


def test_only_the_validation_set_counts():
    [stopper] = early_stopping_callbacks(ON)
    state, control = NS(best_metric=1.0), NS(should_training_stop=False)
    stopper.on_evaluate(ARGS, state, control, metrics={"eval_train_subset_loss": 9.0})   # the other eval set
    assert (stopper.early_stopping_patience_counter, control.should_training_stop) == (0, False)
    stopper.on_evaluate(ARGS, state, control, metrics={"eval_val_loss": 1.5})            # no improvement
    assert (stopper.early_stopping_patience_counter, control.should_training_stop) == (1, True)


def stopped_at(step: int, max_steps: int) -> dict:
    [stopper] = early_stopping_callbacks(ON)
    stopper.early_stopping_patience_counter = 1
    trainer = NS(callback_handler=NS(callbacks=[stopper]),
                 state=NS(best_model_checkpoint="x/checkpoint-2", best_global_step=2, global_step=step,
                          max_steps=max_steps))
    return stopping_metrics(trainer, HISTORY, ON)


def test_the_metrics_say_where_and_why_training_stopped():
    assert stopped_at(4, 30) == {"stopped_early": True, "best_step": 2, "best_val_loss": 1.0,
                                 "stop_reason": "early stopping: the validation loss did not improve for 1 evaluations"}
    at_the_end = stopped_at(30, 30)                      # at max_steps it ends anyway
    assert at_the_end["stopped_early"] is False and at_the_end["stop_reason"] == "max_steps"
