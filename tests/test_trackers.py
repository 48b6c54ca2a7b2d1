"""train.log_with: Accelerate's trackers get the very scalars TensorBoard gets (a real tracker, read back)."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import run_train

from amint_dist.train.trackers import flat_config


def tracker_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """Accelerate's tensorboard tracker writes RUN/trackers/<run name>/events.*."""
    events = EventAccumulator(str(run_dir / "trackers" / run_dir.name), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_tracker_receives_the_runs_scalars_at_the_same_steps(tmp_path, train_root):
    from reliability_helpers import scalars

    run_dir = tmp_path / "run"
    run_train(run_dir, train_root, "train.max_steps=6", "train.log_every=2", "train.log_with=[tensorboard]")
    for tag in ("train/task_loss", "train/mint_loss", "train/lr"):
        ours, theirs = scalars(run_dir, tag), tracker_scalars(run_dir, tag)
        assert len(ours) >= 3 and [s for s, _ in theirs] == [s for s, _ in ours], tag
        assert [v for _, v in theirs] == pytest.approx([v for _, v in ours]), tag


def test_no_tracker_by_default_and_unusable_ones_are_one_line(tmp_path, train_root, capsys):
    from test_train import train_cli_error

    run_train(tmp_path / "plain", train_root, "train.max_steps=1")
    assert not (tmp_path / "plain" / "trackers").exists()
    assert "train.log_with=['nosuch']: unknown tracker 'nosuch'" in train_cli_error(
        tmp_path, train_root, ["train.log_with=[nosuch]"], capsys)
    assert "mlflow is not installed here" in train_cli_error(tmp_path, train_root, ["train.log_with=[mlflow]"], capsys)


def test_the_run_configuration_is_flat_and_scalar():
    flat = flat_config({"train": {"epochs": 3, "log_with": ["tensorboard"]}, "run": {"dir": None}})
    assert flat == {"train.epochs": 3, "train.log_with": "['tensorboard']", "run.dir": "None"}
