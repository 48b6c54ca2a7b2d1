"""Step inputs: one member batch, plus probe (task only) and external (MINT negatives) batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from amint_dist.data.pipeline import ShardedSplitStream, make_loader


class CyclingBatches:
    """Endless batches of a split, epoch after epoch, with a resumable (epoch, position) cursor."""

    def __init__(self, stream: ShardedSplitStream, epoch: int = 0, position: int = 0):
        self.stream, self.epoch, self.position = stream, epoch, position
        self._batches: Iterator[dict] | None = None

    def cursor(self) -> list[int]:
        return [self.epoch, self.position]

    def next(self) -> dict:
        if self._batches is None:
            self.stream.set_epoch(self.epoch, self.position)
            self._batches = iter(make_loader(self.stream))
        batch = next(self._batches, None)
        if batch is None:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            return self.next()
        self.position += 1
        return batch


def combine(parts: Mapping[str, dict], device: torch.device) -> dict:
    """Concatenate member/probe/external batches into one forward's tensors and loss masks."""
    rows = {name: len(b["label"]) for name, b in parts.items()}
    cat = lambda key: torch.cat([b[key] for b in parts.values()])  # noqa: E731
    split_of_row = torch.cat([torch.full((n,), i) for i, n in enumerate(rows.values())])
    names = list(rows)
    valid = cat("valid")
    is_member_row = split_of_row == names.index("members")
    is_external_row = split_of_row == names.index("external")
    return {
        "image": cat("image").to(device, non_blocking=True),
        "label": cat("label").to(device, non_blocking=True),
        "task_mask": (valid & ~is_external_row).to(device),
        "mint_mask": (valid & (is_member_row | is_external_row)).to(device),
        "is_member": is_member_row.to(device),
        "is_external": is_external_row.to(device),
        "valid": valid,
    }


def skipped_entries(parts: Mapping[str, dict]) -> list[tuple[str, str]]:
    """(key or shard, reason) of the samples the readers skipped since their previous batches."""
    return [entry for b in parts.values() for entry in b["skipped"]]
