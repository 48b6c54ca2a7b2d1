"""Suspect-set audit: the set-level statistics on synthetic scores (no model); their calibration measured on a
real tiny run's scores; the CLI end to end on a folder of PNG files written from the dataset (and a corrupt one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from amint_dist.audit.set_test import fraction_interval, rank_test, set_test, used_fraction, verdict
from amint_dist.data.sources import ext_of, read_member, tar_groups
from train_helpers import ENV, REPO, load_npz, run_train

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def null_rejections(reference: np.ndarray, pool: np.ndarray, n_sets: int, size: int, alpha: float,
                    rng: np.random.Generator) -> int:
    """How many random ``size``-sets drawn from the non-member ``pool`` the rank test rejects at ``alpha``."""
    return sum(rank_test(rng.choice(pool, size, replace=False), reference)["p_value"] < alpha for _ in range(n_sets))


def mixture_misses(members: np.ndarray, member_pool: np.ndarray, reference: np.ndarray, nonmember_pool: np.ndarray,
                   size: int, repeats: int, rng: np.random.Generator) -> dict[float, int]:
    """Per true fraction, how many of ``repeats`` mixed suspect sets get a 95% interval missing the truth."""
    misses = {}
    for fraction in FRACTIONS:
        k = round(fraction * size)
        missed = 0
        for r in range(repeats):
            suspect = np.concatenate([rng.choice(member_pool, k, replace=False),
                                      rng.choice(nonmember_pool, size - k, replace=False)])
            lo, hi = fraction_interval(suspect, members, reference, 200, r)["ci95"]
            missed += not lo <= k / size <= hi
        misses[fraction] = missed
    return misses


def within_level(rejections: int, n_sets: int, alpha: float) -> bool:
    """The rejection rate is compatible with <= alpha: an exact one-sided binomial test does not reject at 1%."""
    return binomtest(rejections, n_sets, alpha, alternative="greater").pvalue >= 0.01


# ---- the statistics on synthetic scores ----

def test_rank_test_is_calibrated_under_the_null_and_powerful_on_members():
    rng = np.random.default_rng(0)
    rejections = sum(rank_test(rng.normal(size=50), rng.normal(size=80))["p_value"] < 0.05 for _ in range(400))
    assert within_level(rejections, 400, 0.05), rejections
    shifted = rank_test(rng.normal(1.0, 1.0, 50), rng.normal(size=80))
    assert shifted["p_value"] < 1e-6 and shifted["auc"] > 0.7
    assert verdict(shifted["p_value"], 0.01) == "used" and verdict(0.02, 0.01) == "no evidence"


def test_used_fraction_estimates_mixtures_with_covering_intervals():
    rng = np.random.default_rng(1)
    members, reference = rng.normal(1.0, 1.0, 200), rng.normal(size=200)
    misses = mixture_misses(members, rng.normal(1.0, 1.0, 2000), reference, rng.normal(size=2000), 100, 10, rng)
    assert within_level(sum(misses.values()), 10 * len(FRACTIONS), 0.05), misses  # a 95% interval misses 5%
    assert used_fraction(rng.normal(size=100), rng.normal(size=100), reference) is None  # members look like the rest
    assert fraction_interval(members, members, reference, 50, 0)["value"] == 1.0


def test_set_test_reports_every_method():
    rng = np.random.default_rng(2)
    scores = {m: rng.normal(size=30) for m in ("amint", "loss")}
    out = set_test(scores, {m: rng.normal(1, 1, 40) for m in scores}, {m: rng.normal(size=40) for m in scores}, 20, 0)
    assert set(out) == {"amint", "loss"}
    assert {"u", "auc", "p_value", "fraction"} <= set(out["amint"])
