"""Rank-0 monitoring: TensorBoard scalars/histograms/figures and the per-epoch metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class Monitor:
    """Writes only when ``enabled`` (rank 0); every other rank gets a no-op monitor."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = SummaryWriter(str(run_dir / "tb")) if enabled else None
        self.metrics_path = run_dir / "metrics.jsonl"

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def histogram(self, name: str, values: np.ndarray, step: int) -> None:
        if self.writer and len(values):
            self.writer.add_histogram(name, values, step)

    def figure(self, name: str, figure: Any, step: int) -> None:
        if self.writer:
            self.writer.add_figure(name, figure, step, close=False)

    def epoch_line(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line per epoch (append + flush + fsync: earlier lines are never rewritten)."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
