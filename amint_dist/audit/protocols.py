"""Audit protocols: which scored samples are members (1) and non-members (0), and which calibrate.

- ``seen``: members from the ``members`` split (what the aMINT head was trained to call members)
  vs ``heldout``; ``unseen``: ``probe`` (trained on for the task only) vs ``heldout``;
  ``null``: two disjoint halves of ``heldout``, one labelled as if members (must read ~0.5).
- With an exposure ledger, a member counts only if training consumed it (ledger > 0) and a
  non-member only if it never did (ledger == 0); the excluded ones are counted.
- Every choice is a pure function of (seed, key): the calibration share (the same for every
  protocol, so heldout samples calibrate or evaluate consistently in ``seen`` and ``unseen``),
  the null halves, and the subsampling that balances the evaluation classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from amint_dist.audit.scoring import Scored
from amint_dist.data.splits import hash_unit
from amint_dist.records.ledger import ExposureLedger

NONMEMBER_SPLIT = "heldout"
PROTOCOLS: dict[str, tuple[str, str]] = {  # name -> (member split, description)
    "seen": ("members", "members split (MINT positives in training) vs heldout"),
    "unseen": ("probe", "probe split (task training only, never MINT positives) vs heldout"),
    "null": (NONMEMBER_SPLIT, "two disjoint halves of heldout, one labelled member: must read ~0.5"),
}


@dataclass
class ProtocolSamples:
    """One protocol's evaluation and calibration samples: columns key, split, label, then methods."""

    name: str
    evaluation: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]
    counts: dict = field(default_factory=dict)


def key_units(seed: int, purpose: str, keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) number per key for one ``purpose``, independent of order and of other purposes."""
    return np.array([hash_unit(seed, f"audit:{purpose}:{k}") for k in keys], dtype=np.float64)


def _consumed(ledger: ExposureLedger | None, split: str, scored: Scored) -> np.ndarray | None:
    return None if ledger is None else ledger.counts[split][scored["index"]] > 0


def _rows(scored: Scored, split: str, mask: np.ndarray, label: int, methods: list[str]) -> dict[str, np.ndarray]:
    n = int(mask.sum())
    out = {"key": scored["key"][mask], "split": np.full(n, split), "label": np.full(n, label, np.int8)}
    return {**out, **{m: scored[m][mask] for m in methods}}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _balance(rows: dict[str, np.ndarray], seed: int, protocol: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Keep every sample of the smaller class and as many of the larger, lowest key hash first."""
    labels = rows["label"]
    n = min(int((labels == 1).sum()), int((labels == 0).sum()))
    rank = key_units(seed, f"balance:{protocol}", rows["key"])
    keep = np.zeros(labels.size, bool)
    dropped = {}
    for value, name in ((1, "members"), (0, "nonmembers")):
        idx = np.flatnonzero(labels == value)
        keep[idx[np.argsort(rank[idx], kind="stable")[:n]]] = True
        dropped[name] = int(idx.size - n)
    return {k: v[keep] for k, v in rows.items()}, dropped


def build_protocol(name: str, scored: Mapping[str, Scored], ledger: ExposureLedger | None, methods: list[str],
                   seed: int, calibration_fraction: float) -> ProtocolSamples:
    """Select, label, split into calibration/evaluation and balance one protocol's samples."""
    member_split = PROTOCOLS[name][0]
    held = scored[NONMEMBER_SPLIT]
    held_consumed = _consumed(ledger, NONMEMBER_SPLIT, held)
    clean = np.ones(held["key"].size, bool) if held_consumed is None else ~held_consumed
    counts = {"nonmembers_excluded_consumed": int((~clean).sum())}
    if name == "null":
        first_half = key_units(seed, "null-half", held["key"]) < 0.5
        member_mask, member_scored = clean & first_half, held
        nonmember_mask = clean & ~first_half
    else:
        member_scored = scored[member_split]
        consumed = _consumed(ledger, member_split, member_scored)
        member_mask = np.ones(member_scored["key"].size, bool) if consumed is None else consumed
        counts["members_excluded_not_consumed"] = int((~member_mask).sum())
        nonmember_mask = clean
    member_calibrates = key_units(seed, "calibration", member_scored["key"]) < calibration_fraction
    held_calibrates = key_units(seed, "calibration", held["key"]) < calibration_fraction
    parts = {
        role: _concat([_rows(member_scored, member_split, member_mask & (member_calibrates == pick), 1, methods),
                       _rows(held, NONMEMBER_SPLIT, nonmember_mask & (held_calibrates == pick), 0, methods)])
        for role, pick in (("calibration", True), ("evaluation", False))
    }
    parts["evaluation"], dropped = _balance(parts["evaluation"], seed, name)
    counts.update({
        "n_members": int((parts["evaluation"]["label"] == 1).sum()),
        "n_nonmembers": int((parts["evaluation"]["label"] == 0).sum()),
        "n_calibration_members": int((parts["calibration"]["label"] == 1).sum()),
        "n_calibration_nonmembers": int((parts["calibration"]["label"] == 0).sum()),
        "balancing_dropped": dropped,
    })
    return ProtocolSamples(name, parts["evaluation"], parts["calibration"], counts)
