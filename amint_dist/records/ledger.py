"""Exposure ledger: per split, per sample index, how many times the sample entered an optimizer step."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from amint_dist.io import atomic_write_bytes


class ExposureLedger:
    """Counts per sample (int32: 4 bytes per sample, ~5 MB for ImageNet-1k) for one rank."""

    def __init__(self, sizes: Mapping[str, int]):
        self.counts = {split: np.zeros(n, dtype=np.int32) for split, n in sizes.items()}

    def record(self, split: str, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count the valid rows of a batch (padding and skipped samples never count; all rows without ``valid``)."""
        idx = (indices if valid is None else indices[valid]).numpy()
        np.add.at(self.counts[split], idx, 1)

    def digest(self) -> str:
        """sha256 of the counts (split names, sizes, little-endian int32 values): the same for equal ledgers,
        whatever the file's compression or time stamps; the audit trail records it."""
        h = hashlib.sha256()
        for split in sorted(self.counts):
            h.update(f"{split}:{len(self.counts[split])}\n".encode())
            h.update(self.counts[split].astype("<i4").tobytes())
        return h.hexdigest()

    def total(self) -> dict[str, int]:
        return {split: int(c.sum()) for split, c in self.counts.items()}

    def summed(self, reduce_sum) -> ExposureLedger:
        """Ledger summed over ranks with ``reduce_sum(tensor) -> tensor`` (e.g. accelerator.reduce, which returns
        a new tensor). Summed in int32 as counted, without zero-filled or widened copies: the end of training
        holds one extra ledger, not three (docs/performance.md)."""
        out = ExposureLedger({})
        out.counts = {split: reduce_sum(torch.from_numpy(c)).numpy() for split, c in self.counts.items()}
        return out

    def save(self, path: str | Path) -> None:
        """Atomically write one int32 array per split name to an ``.npz``."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.counts)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, sizes: Mapping[str, int]) -> ExposureLedger:
        """Read a ledger and check it matches the dataset's split sizes."""
        ledger = cls(sizes)
        with np.load(path, allow_pickle=False) as data:
            for split, n in sizes.items():
                if split not in data or data[split].shape != (n,):
                    found = data[split].shape if split in data else "missing"
                    raise ValueError(f"ledger {path} does not match the dataset: split {split} has {found}, expected ({n},)")
                ledger.counts[split] = data[split].astype(np.int32)
        return ledger

    def __iadd__(self, other: ExposureLedger) -> ExposureLedger:
        for split, c in other.counts.items():
            self.counts[split] += c
        return self
