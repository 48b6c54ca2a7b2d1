"""Reference runs' member sets: a key-hash subset of a pool of splits, decided by (seed, key) alone.

Rule (``SUBSET_RULE``): a sample of a pool split is read (trained on, task and MINT positive) when
``hash_unit(seed, f"subset:{key}") < fraction``. The ``subset:`` prefix makes the choice independent of the
dataset's own split hash (``{seed}:{key}``), so reference run ``r`` (``seed=r``) draws a fresh half of the pool;
anyone holding the keys recomputes it, and the run's exposure ledger records what was actually read.
"""

from __future__ import annotations

from dataclasses import dataclass

from amint_dist.data.splits import hash_unit

SUBSET_RULE = ("a pool sample is read when hash_unit(seed, f'subset:{key}') < fraction, i.e. the first 8 bytes of "
               "sha256(f'{seed}:subset:{key}') as a big-endian integer / 2**64 < fraction")


@dataclass(frozen=True)
class SubsetRule:
    """Which keys of a pool split a reference run reads."""

    seed: int
    fraction: float

    def keeps(self, key: str) -> bool:
        return hash_unit(self.seed, f"subset:{key}") < self.fraction

    def kept(self, keys: list[str]) -> list[bool]:
        return [self.keeps(k) for k in keys]
