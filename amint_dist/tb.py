"""Rank-0 monitoring: TensorBoard scalars/histograms/figures and the per-epoch metrics.jsonl.

Crash consistency: metrics.jsonl is rewritten atomically per line (never torn). A run resumed from a checkpoint
at (step S, epoch E) keeps the lines of epochs before E (written before the checkpoint, unchanged) and drops
the later ones, which the replay writes again; TensorBoard gets ``purge_step=S+1``, so the events the killed
run logged after its checkpoint are hidden and replaced by the replay's: one point per step, one line per epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from amint_dist.io import atomic_append_line, atomic_write_text, complete_lines


class Monitor:
    """Writes only when ``enabled`` (rank 0); every other rank gets a no-op monitor."""

    def __init__(self, run_dir: Path, enabled: bool, resume_at: tuple[int, int] | None = None):
        """``resume_at``: (step, epoch) of the checkpoint a resumed run continues from."""
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        purge = None
        if enabled and resume_at is not None:
            step, epoch = resume_at
            purge = step + 1
            kept = [line for line in complete_lines(self.metrics_path) if _epoch_of(line) < epoch]
            atomic_write_text(self.metrics_path, "".join(kept))
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge) if enabled else None
        self.forward: Callable[..., None] | None = None  # optional trackers: (values, step=step), train.log_with


    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.forward:
            self.forward(dict(values), step=step)

    def histogram(self, name: str, values: np.ndarray, step: int) -> None:
        if self.writer and len(values):
            self.writer.add_histogram(name, values, step)

    def figure(self, name: str, figure: Any, step: int) -> None:
        if self.writer:
            self.writer.add_figure(name, figure, step, close=False)

    def epoch_line(self, record: Mapping[str, Any]) -> None:
        """Add one JSON line per epoch (the file rewritten atomically: a crash never leaves a torn line)."""
        if not self.enabled:
            return
        atomic_append_line(self.metrics_path, json.dumps(record, sort_keys=True))
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _epoch_of(line: str) -> float:
    """The ``epoch`` of a metrics.jsonl line (inf for a line that is not one: dropped on resume)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
