"""Resumable training position: steps, epoch, data cursors and reader layout, loss normalisers and balancer, skip
counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # member epoch in progress
    batch_in_epoch: int = 0  # member micro-batches of ``epoch`` already consumed on each rank
    cursors: dict[str, list[int]] = field(default_factory=dict)  # split -> [epoch, batch position]
    loss_norms: list[float] | None = None  # first-step (task, mint) losses, averaged over ranks
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples skipped, all ranks
    world_size: int = 1
    epoch_skipped: list[list[str]] = field(default_factory=list)  # [key or shard, reason] of this epoch, all ranks
    balancer: dict | None = None  # mint.balancer=famo: its task-weight logits and their Adam state
    # added to ``step`` for the LR schedule and the run's end (``train.max_steps`` included): 0 but after a resume at
    # another world size, whose steps per epoch differ (None: set by the trainer at that epoch boundary)
    schedule_shift: int | None = 0
    # the reader layout that saved the position: {"readers": per rank, "batch_sizes": {split: rows per rank}} (None:
    # not recorded, by a checkpoint older than the record; ``train.elastic``)
    layout: dict | None = None

    def count_skips(self, reasons: Counter) -> None:
        """Add skipped-sample counts (already summed over ranks)."""
        for reason, n in reasons.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def add_skips(self, entries: list[tuple[str, str]]) -> None:
        """Add every rank's newly skipped (key, reason) pairs: counts and this epoch's list."""
        self.count_skips(Counter(reason for _, reason in entries))
        self.epoch_skipped.extend([str(what), str(reason)] for what, reason in entries)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"train_state.json has unknown fields {sorted(unknown)}")
        return cls(**data)
