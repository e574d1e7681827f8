"""titletune/training/loss_log.py: the per-step loss rows, CSV and plot."""
from __future__ import annotations

import csv

from titletune.training.loss_log import step_rows, write_step_log

HISTORY = [{"loss": 2.0, "learning_rate": 1e-3, "step": 2}, {"eval_val_loss": 1.9, "step": 2},
           {"eval_train_subset_loss": 1.8, "step": 2}, {"loss": 1.5, "learning_rate": 5e-4, "step": 4},
           {"train_runtime": 3.0, "step": 4}]


def test_rows_join_train_and_validation_losses_by_step():
    assert step_rows(HISTORY) == [{"step": 2, "train_loss": 2.0, "learning_rate": 1e-3, "val_loss": 1.9},
                                  {"step": 4, "train_loss": 1.5, "learning_rate": 5e-4}]


def test_the_log_is_a_csv_and_a_png(tmp_path):
    write_step_log(step_rows(HISTORY), tmp_path / "log.csv", tmp_path / "curve.png")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in rows] == [("2", "2.0", "1.9"), ("4", "1.5", "")]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
