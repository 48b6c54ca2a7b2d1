"""The skipped-sample budget (``data.max_skip_fraction``): stop a run whose data is mostly broken."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class SkipBudgetExceeded(ValueError):
    """More samples were skipped than ``data.max_skip_fraction`` allows."""


@dataclass(frozen=True)
class SkipBudget:
    """Stop when skipped / read > ``cap``, read counting every sample the readers delivered or skipped.

    Mid-epoch the share is judged only once ``floor`` samples were read, enough that one lost shard alone
    cannot exceed the cap; at an epoch's end it is always judged. ``cap`` 0 tolerates no skip, 1 any.
    """

    cap: float
    floor: int = 0

    @classmethod
    def for_dataset(cls, cap: float, manifest: Mapping) -> SkipBudget:
        largest = max((int(s["num_samples"]) for m in manifest["splits"].values() for s in m["shards"]), default=1)
        return cls(float(cap), 0 if cap <= 0 else math.ceil(largest / cap))

    def check(self, skipped: Mapping[str, int], read: int, epoch_end: bool, examples: Sequence[Sequence[str]] = ()) -> None:
        """Raise SkipBudgetExceeded (the same on every rank: call with rank-summed numbers) when over budget."""
        n = sum(skipped.values())
        if self.cap >= 1 or n <= self.cap * read or (not epoch_end and read < self.floor):
            return
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(skipped.items(), key=lambda rc: -rc[1]))
        first = ", ".join(str(e[0]) for e in examples[:3])
        raise SkipBudgetExceeded(
            f"data.max_skip_fraction={self.cap:g} exceeded: {n} of {read} samples read so far "
            f"({n / max(read, 1):.1%}) were skipped ({reasons}{'; e.g. ' + first if first else ''}): "
            "repair the dataset root, or raise data.max_skip_fraction")
