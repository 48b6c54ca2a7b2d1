"""Deterministic member/non-member split: a sample's split is a pure function of (seed, key)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

SPLITS: tuple[str, ...] = ("members", "probe", "external", "heldout", "validation")
TRAINING_SPLITS: tuple[str, ...] = ("members", "probe", "external")  # what training reads; the rest it never touches
HASH_RULE = (
    "u = int.from_bytes(sha256(f'{seed}:{key}'.encode())[:8], 'big') / 2**64; "
    "split = first of (members, probe, external, heldout, validation) whose cumulative fraction exceeds u; "
    "within a split, samples are indexed in increasing (u, key) order"
)


def hash_unit(seed: int, key: str) -> float:
    """Map (seed, key) to a uniform number in [0, 1) with sha256 (first 8 bytes, big-endian)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Return fractions in canonical split order; refuse unknown splits, negatives and sums != 1."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) in fractions: {sorted(unknown)}; valid: {list(SPLITS)}")
    out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    for name, value in out.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"split fraction {name}={value} must be within [0, 1]")
    if not math.isclose(sum(out.values()), 1.0, abs_tol=1e-9):
        raise ValueError(f"split fractions must sum to 1, got {sum(out.values()):.6f} ({out})")
    return out


def split_of(u: float, fractions: Mapping[str, float]) -> str:
    """Split whose cumulative fraction range contains ``u`` (fractions in canonical order)."""
    cumulative = 0.0
    for name in SPLITS:
        cumulative += fractions[name]
        if u < cumulative:
            return name
    return next(s for s in reversed(SPLITS) if fractions[s] > 0)  # u within float rounding of 1


def assign_split(seed: int, key: str, fractions: Mapping[str, float]) -> str:
    """The split of ``key``: anyone with the seed and the key can recompute it."""
    return split_of(hash_unit(seed, key), fractions)
