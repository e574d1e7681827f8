"""titletune/training/resuming.py: which checkpoints a run resumes from, and which it clears."""
from __future__ import annotations

from titletune.params import load_params
from titletune.training.resuming import (CHECKPOINT_DIR, checkpoint_dir, last_checkpoint_step, resumable_checkpoint,
                                         run_fingerprint)


class Data:
    def __init__(self, fingerprint: str):
        self._fingerprint = fingerprint


def test_the_fingerprint_changes_with_the_params_and_the_data():
    train = load_params("train")
    base = run_fingerprint({"train": train}, Data("a"))
    assert base == run_fingerprint({"train": train}, Data("a"))
    assert base != run_fingerprint({"train": train}, Data("b"))
    assert base != run_fingerprint({"train": train.model_copy(update={"learning_rate": 0.1})}, Data("a"))


def test_a_complete_checkpoint_is_kept_and_other_runs_are_cleared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine, other = checkpoint_dir("mine"), CHECKPOINT_DIR / "other"
    (mine / "checkpoint-4").mkdir(parents=True)
    (mine / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (mine / "checkpoint-8").mkdir()                     # cut short while being saved: no state file
    (other / "checkpoint-2").mkdir(parents=True)
    assert resumable_checkpoint("mine")
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoint-4"] and not other.exists()


def test_without_a_complete_checkpoint_the_run_starts_over_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (checkpoint_dir("mine") / "checkpoint-8").mkdir(parents=True)
    (checkpoint_dir("mine") / "loss_before.json").write_text("{}")
    assert not resumable_checkpoint("mine")
    assert checkpoint_dir("mine").is_dir() and not any(checkpoint_dir("mine").iterdir())


def test_the_last_complete_checkpoint_and_its_step_come_from_its_trainer_state(tmp_path, monkeypatch):
    from transformers.trainer_callback import TrainerState
    monkeypatch.chdir(tmp_path)
    mine = checkpoint_dir("mine")
    assert last_checkpoint_step("mine") is None
    for step in (4, 8):
        (mine / f"checkpoint-{step}").mkdir(parents=True)
        TrainerState(global_step=step).save_to_json(str(mine / f"checkpoint-{step}" / "trainer_state.json"))
    (mine / "checkpoint-12").mkdir()                    # cut short while being saved
    assert last_checkpoint_step("mine") == 8


def test_a_link_among_the_checkpoints_is_removed_never_followed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("not a checkpoint")
    CHECKPOINT_DIR.mkdir(parents=True)
    (CHECKPOINT_DIR / "other").symlink_to(precious)
    (checkpoint_dir("mine")).mkdir()
    (checkpoint_dir("mine") / "checkpoint-4").symlink_to(precious)
    assert not resumable_checkpoint("mine")
    assert (precious / "keep.txt").is_file() and not (CHECKPOINT_DIR / "other").is_symlink()
