"""The split rule: a pure, documented function of (seed, key)."""

import hashlib
import math
import random

import pytest

from amint_dist.data.splits import SPLITS, assign_split, hash_unit, split_of, validate_fractions

FRACTIONS = {"members": 0.4, "probe": 0.1, "external": 0.25, "heldout": 0.25}
KEYS = [f"n{i % 1000:04d}_{i:06d}" for i in range(20_000)]


def test_hash_unit_is_the_documented_rule():
    """Anyone can recompute u from (seed, key) with hashlib alone, as HASH_RULE states."""
    for seed, key in [(0, "digit_0000"), (7, "train__n01440764_10026"), (123, "é/ü")]:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        assert hash_unit(seed, key) == int.from_bytes(digest[:8], "big") / 2**64
        assert 0.0 <= hash_unit(seed, key) < 1.0


def test_assignment_is_order_independent_and_seeded():
    """The split of a key depends only on (seed, key): any order gives the same map; the seed changes it."""
    forward = {k: assign_split(0, k, FRACTIONS) for k in KEYS[:5000]}
    shuffled = KEYS[:5000]
    random.Random(1).shuffle(shuffled)
    assert {k: assign_split(0, k, FRACTIONS) for k in shuffled} == forward
    other_seed = {k: assign_split(1, k, FRACTIONS) for k in KEYS[:5000]}
    assert sum(forward[k] != other_seed[k] for k in forward) > 1000


def test_fractions_within_binomial_tolerance():
    """On 20,000 keys each split's count is within 4 binomial sigmas of n * fraction."""
    counts = dict.fromkeys(SPLITS, 0)
    for key in KEYS:
        counts[assign_split(0, key, FRACTIONS)] += 1
    n = len(KEYS)
    for split, p in FRACTIONS.items():
        assert abs(counts[split] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (split, counts)


def test_zero_fraction_split_gets_nothing_and_edges_are_covered():
    """A split with fraction 0 never receives a key; u close to 1 falls in the last non-empty split."""
    fractions = validate_fractions({"members": 0.5, "probe": 0.0, "external": 0.5})
    assert {assign_split(3, k, fractions) for k in KEYS[:3000]} == {"members", "external"}
    assert split_of(0.0, fractions) == "members"
    assert split_of(1.0 - 2**-53, fractions) == "external"
    assert split_of(1.0, fractions) == "external"  # float rounding guard


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"members": -0.1, "probe": 0.6, "external": 0.25, "heldout": 0.25}, "members=-0.1"),
        ({"members": 0.4, "probe": 0.1, "external": 0.25, "heldout": 0.2}, "sum to 1"),
        ({"members": 0.6, "probe": 0.1, "external": 0.25, "heldout": 0.25}, "sum to 1"),
        ({"members": 0.4, "probe": 0.1, "external": 0.25, "test": 0.25}, "unknown split name"),
        ({"members": float("nan"), "heldout": 1.0}, "members=nan"),
    ],
)
def test_validate_fractions_refuses_bad_fractions(fractions, message):
    """Negative, non-finite, not summing to 1, or unknown split names: one clear ValueError."""
    with pytest.raises(ValueError, match=message):
        validate_fractions(fractions)


def test_validate_fractions_canonical_order():
    """Missing splits count as 0 and the result is in canonical split order."""
    assert list(validate_fractions({"heldout": 0.5, "members": 0.5})) == list(SPLITS)
