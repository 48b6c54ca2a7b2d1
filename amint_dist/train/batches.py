"""Step inputs: one member batch, plus probe (task only) and external (MINT negatives) batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from amint_dist.data.pipeline import ShardedSplitStream, make_loader


class CyclingBatches:
    """Endless batches of a split, epoch after epoch, with a resumable (epoch, position) cursor.

    One endless loader (``make_loader(endless=True)``): its workers persist and read ahead across epoch ends.
    """

    def __init__(self, stream: ShardedSplitStream, epoch: int = 0, position: int = 0):
        self.stream, self.epoch, self.position = stream, epoch, position
        self._batches: Iterator[dict] | None = None

    def cursor(self) -> list[int]:
        return [self.epoch, self.position]

    def _epoch_length(self) -> int:
        return len(self.stream)

    def next(self) -> dict:
        if self._batches is None:
            while self.position >= self._epoch_length():  # a cursor at an epoch's end: the next epoch
                self.epoch, self.position = self.epoch + 1, 0
            self.stream.set_epoch(self.epoch, self.position)
            self._batches = iter(make_loader(self.stream, pin_memory=torch.cuda.is_available(), endless=True))
        batch = next(self._batches)
        self.position += 1
        if self.position == self._epoch_length():
            self.epoch, self.position = self.epoch + 1, 0
        return batch


TASK_PARTS = ("members", "probe")  # rows with a task loss (and a reference run's positives)
MINT_POSITIVE_PARTS = ("members",)  # a reference run's: its pool splits
SHIFTED = "_shifted"  # suffix of the shifted copies of a part: MINT negatives


def combine(parts: Mapping[str, dict], device: torch.device,
            memory_format: torch.memory_format = torch.contiguous_format,
            positives: tuple[str, ...] = MINT_POSITIVE_PARTS) -> dict:
    """Concatenate the step's batches into one forward's tensors (images in ``memory_format``) and per-row
    loss masks; ``positives``: the parts that are MINT positives (and task rows)."""
    def rows_of(names: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([torch.full((len(b["label"]),), name in names) for name, b in parts.items()])

    negatives = ("external", *(name for name in parts if name.endswith(SHIFTED)))

    cat = lambda key: torch.cat([b[key] for b in parts.values()])  # noqa: E731
    # each part to the device first, then one cat there: copies from the loaders' pinned batches (on CUDA)
    # stay asynchronous, where a CPU-side cat would make a pageable (synchronous) copy
    on_device = lambda key: torch.cat([b[key].to(device, non_blocking=True) for b in parts.values()])  # noqa: E731
    valid = cat("valid")
    is_member = rows_of(positives)
    return {
        "image": on_device("image").contiguous(memory_format=memory_format),
        "label": on_device("label"),
        "task_mask": (valid & rows_of(TASK_PARTS + positives)).to(device),
        "mint_mask": (valid & (is_member | rows_of(negatives))).to(device),
        "is_member": is_member.to(device),
        "is_external": rows_of(("external",)).to(device),
        "valid": valid,
    }


def skipped_entries(parts: Mapping[str, dict]) -> list[tuple[str, str]]:
    """(key or shard, reason) of the samples the readers skipped since their previous batches."""
    return [entry for b in parts.values() for entry in b["skipped"]]
