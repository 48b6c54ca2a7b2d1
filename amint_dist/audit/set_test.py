"""Set-level evidence for "was this set used?": pure functions over score arrays (higher = more likely member).

- A one-sided Mann-Whitney U test: are the suspect scores stochastically larger than the scores of
  known non-members (the reference)? Exact under the null that the suspect set is drawn like the reference.
- The used fraction pi of the suspect set, estimated from AUCs: a suspect set that mixes members (share pi)
  and non-members has AUC(suspect vs reference) = pi * AUC(members vs reference) + (1 - pi) * 0.5 exactly
  (an AUC is a mean over pairs), so pi = (AUC_s - 0.5) / (AUC_m - 0.5), clipped to [0, 1]. Its interval is a
  percentile bootstrap over the suspect, member and reference samples together.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import mannwhitneyu, rankdata

MIN_MEMBER_AUC_MARGIN = 0.02  # below AUC 0.52 on the members the fraction is not identifiable: reported as null


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie): the Mann-Whitney U statistic over n_pos * n_neg."""
    ranks = rankdata(np.concatenate([positives, negatives]))[:positives.size]
    u = ranks.sum() - positives.size * (positives.size + 1) / 2
    return float(u) / (positives.size * negatives.size)


def rank_test(suspect: np.ndarray, reference: np.ndarray) -> dict:
    """One-sided Mann-Whitney U (suspect > reference): U, its AUC and the p-value."""
    result = mannwhitneyu(suspect, reference, alternative="greater")
    return {"u": float(result.statistic), "auc": float(result.statistic) / (suspect.size * reference.size),
            "p_value": float(result.pvalue)}


def used_fraction(suspect: np.ndarray, members: np.ndarray, reference: np.ndarray) -> float | None:
    """(AUC(suspect vs reference) - 0.5) / (AUC(members vs reference) - 0.5) in [0, 1]; None if not identifiable."""
    margin = auc(members, reference) - 0.5 if members.size else 0.0
    if margin < MIN_MEMBER_AUC_MARGIN:
        return None
    return float(np.clip((auc(suspect, reference) - 0.5) / margin, 0.0, 1.0))


def fraction_interval(suspect: np.ndarray, members: np.ndarray, reference: np.ndarray, n_boot: int, seed: int,
                      level: float = 0.95) -> dict:
    """:func:`used_fraction` with a percentile bootstrap interval (every sample set resampled)."""
    value = used_fraction(suspect, members, reference)
    if value is None:
        return {"value": None, "ci95": None}
    rng = np.random.default_rng(seed)
    draws = [used_fraction(*(a[rng.integers(0, a.size, a.size)] for a in (suspect, members, reference)))
             for _ in range(n_boot)]
    draws = np.array([d for d in draws if d is not None])
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if draws.size else (0.0, 1.0)
    return {"value": value, "ci95": [float(lo), float(hi)]}


def set_test(suspect: Mapping[str, np.ndarray], members: Mapping[str, np.ndarray],
             reference: Mapping[str, np.ndarray], n_boot: int, seed: int) -> dict[str, dict]:
    """Per method: the rank test against the reference and the used fraction with its interval."""
    return {m: {**rank_test(suspect[m], reference[m]),
                "fraction": fraction_interval(suspect[m], members[m], reference[m], n_boot, seed)}
            for m in suspect}


def verdict(p_value: float, alpha: float) -> str:
    """'used' when the one-sided test rejects at ``alpha``, else 'no evidence'."""
    return "used" if p_value < alpha else "no evidence"
