"""Helpers shared by the reliability tests (test_crash_safety, test_bad_data, test_safe_keys_and_fuzz): read back
what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EPOCHS = 2


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def keys_of(root: Path, split: str) -> list[str]:
    return (root / split / "keys.txt").read_text().split()
