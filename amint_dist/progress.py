"""Progress bars a person reads: tqdm on stderr, redrawn every 0.5 s on a terminal and every 30 s in a log file
(non-TTY stderr), so that a batch job's log gets a few lines per bar, not one per step.

A floor module like :mod:`amint_dist.io` (nothing from training, audit or data).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand); silent when not ``enabled`` (ranks other than 0)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=min_interval())


def min_interval() -> float:
    """Seconds between redraws: 0.5 on a terminal, 30 when stderr goes to a file or pipe."""
    return 0.5 if sys.stderr.isatty() else 30.0
