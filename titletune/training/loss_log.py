"""The per-step losses of a run: metrics/train_log.csv (DVC plots) and metrics/loss_curve.png."""
from __future__ import annotations

import csv
from pathlib import Path

from titletune.cli import atomic_path, new_figure, write_png


def step_rows(log_history: list[dict]) -> list[dict]:
    """Per-step (train_loss, val_loss, learning_rate) rows from the trainer's log history,
    which a resumed run restores from its checkpoint."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        row = rows.setdefault(entry.get("step", 0), {"step": entry.get("step", 0)})
        if "loss" in entry:
            row["train_loss"], row["learning_rate"] = entry["loss"], entry.get("learning_rate")
        if "eval_val_loss" in entry:
            row["val_loss"] = entry["eval_val_loss"]
    return [rows[s] for s in sorted(rows) if len(rows[s]) > 1]


def write_step_log(rows: list[dict], csv_path: Path, png_path: Path) -> None:
    """The per-step losses as CSV (DVC plots) and as a PNG."""
    fields = ["step", "train_loss", "val_loss", "learning_rate"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})

    fig, ax = new_figure(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss (completion tokens)", title="titletune: training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    write_png(fig, png_path, bbox_inches="tight")
