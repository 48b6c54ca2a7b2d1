"""The optional per-rank exposure trace (``train.exposure_log=true``): every consumed sample, for verification."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from amint_dist.io import atomic_write_text, complete_lines


class ExposureTrace:
    """``RUN/exposure_log/rank-NNNNN.tsv``: a ``step, split, index, key`` line per sample that entered a step.

    Appends are buffered; the loop calls :meth:`sync` (flush and fsync) before writing a checkpoint, so every
    step a checkpoint covers is in the trace. Opened on a resume from step S, lines of steps >= S (replayed now)
    and a torn last line are dropped: the trace stays exact.
    """

    def __init__(self, run_dir: Path, rank: int, resume_step: int, world: int = 1):
        path = run_dir / "exposure_log" / f"rank-{rank:05d}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_from(path, resume_step)
        if rank == 0:  # a resume at a smaller world size: ranks gone no longer drop their replayed lines
            for gone in path.parent.glob("rank-*.tsv"):
                if int(gone.stem.split("-")[1]) >= world:
                    _drop_from(gone, resume_step)
        self._file = open(path, "a", buffering=1 << 16)

    def record(self, step: int, split: str, batch: Mapping) -> None:
        """The valid rows of one split's micro-batch, consumed by optimizer step ``step``."""
        self._file.write("".join(f"{step}\t{split}\t{i}\t{k}\n"
                                 for i, k, v in zip(batch["index"].tolist(), batch["key"], batch["valid"]) if v))

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _drop_from(path: Path, step: int) -> None:
    """Keep the complete lines of ``path`` (if it exists) of steps before ``step``."""
    if path.exists():
        atomic_write_text(path, "".join(line for line in complete_lines(path) if int(line.split("\t", 1)[0]) < step))
