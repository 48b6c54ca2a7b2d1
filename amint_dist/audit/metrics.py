"""Membership-inference metrics with stratified bootstrap confidence intervals.

Conventions used throughout: label 1 = member, 0 = non-member; a higher score means "more
likely member"; a threshold ``t`` predicts "member" for every sample with ``score >= t``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _as_arrays(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (boolean member mask, float64 scores)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), s


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    """Return (n_members, n_non_members), refusing a set without both classes."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need members and non-members, got {n_pos} and {n_neg}")
    return n_pos, n_neg


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in decreasing order with the true/false positive counts at each.

    Entry k holds the counts of members/non-members with ``score >= distinct[k]``.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_group]
    fp = np.cumsum(~y_sorted)[last_of_group]
    return s_sorted[last_of_group], tp, fp


def roc_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct threshold: (fpr, tpr, thresholds), starting at (0, 0, +inf)."""
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _class_counts(y)
    thresholds, tp, fp = _cumulative_counts(y, s)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thresholds]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; ties count one half (same value as sklearn's roc_auc_score)."""
    fpr, tpr, _ = roc_points(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)  # trapezoids


def tpr_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float) -> float:
    """Highest TPR over thresholds whose empirical FPR is at most ``fpr``.

    Candidate thresholds are "reject all" (+inf) and every distinct score, so no interpolation
    between ROC points: when only "reject all" qualifies (too few non-members to resolve
    ``fpr``, or a non-member holds the top score) the answer is 0.0.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    roc_fpr, roc_tpr, _ = roc_points(labels, scores)
    return float(roc_tpr[roc_fpr <= fpr].max())


def roc_band(labels: ArrayLike, scores: ArrayLike, grid: ArrayLike, n_boot: int = 200, seed: int = 0,
             alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile ``1 - alpha`` band of the TPR at each FPR of ``grid`` (the highest TPR whose FPR is
    at most the grid value, as :func:`tpr_at_fpr`) under a stratified bootstrap (members and non-members
    resampled separately)."""
    y, s = _as_arrays(labels, scores)
    _class_counts(y)
    grid = np.asarray(grid, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    curves = np.empty((n_boot, grid.size))
    for b in range(n_boot):
        take = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        fpr, tpr, _ = roc_points(y[take], s[take])
        curves[b] = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    lo, hi = np.quantile(curves, [alpha / 2, 1 - alpha / 2], axis=0)
    return lo, hi


def accuracy_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Fraction of samples classified correctly by ``score >= threshold``."""
    y, s = _as_arrays(labels, scores)
    return float(np.mean((s >= threshold) == y))


def balanced_accuracy_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Mean of TPR and TNR of ``score >= threshold``."""
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _class_counts(y)
    predicted = s >= threshold
    return float(0.5 * (np.sum(predicted & y) / n_pos + np.sum(~predicted & ~y) / n_neg))


def choose_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """Threshold maximising balanced accuracy; use it on calibration data only.

    Among equally good cut points the strictest (highest) wins. The returned value is the
    midpoint between the chosen distinct score and the next lower one, so that the decision
    on the calibration data is unchanged and unseen scores inside the gap are split evenly.
    Always finite (the lowest candidate is "accept all" at the minimum score).
    """
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _class_counts(y)
    thresholds, tp, fp = _cumulative_counts(y, s)
    balanced = 0.5 * (tp / n_pos + 1.0 - fp / n_neg)
    k = int(np.argmax(balanced))
    if k + 1 == thresholds.size:
        return float(thresholds[k])
    upper, lower = thresholds[k], thresholds[k + 1]
    middle = lower + (upper - lower) / 2
    return float(middle if lower < middle <= upper else upper)


def bootstrap_ci(
    metric_fn: MetricFn,
    labels: ArrayLike,
    scores: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile ``1 - alpha`` interval of ``metric_fn`` under a stratified bootstrap.

    Members and non-members are resampled with replacement separately, keeping both counts,
    so every resample is a valid audit set. A seed fixes which samples are drawn, whatever
    ``metric_fn`` and scores: metrics and methods scored on the same labels share resamples.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be positive")
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _class_counts(y)
    # Resample through per-sample multiplicities, applied to score-sorted data: each resample
    # comes out already sorted, which makes the metrics' own (stable) sorts linear.
    order = np.argsort(-s, kind="stable")
    y_sorted, s_sorted = y[order], s[order]
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    counts = np.empty(s.size, np.int64)
    for b in range(n_boot):
        counts[pos] = np.bincount(rng.integers(0, n_pos, n_pos), minlength=n_pos)
        counts[neg] = np.bincount(rng.integers(0, n_neg, n_neg), minlength=n_neg)
        taken = counts[order]
        values[b] = metric_fn(np.repeat(y_sorted, taken), np.repeat(s_sorted, taken))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def metric_with_ci(
    metric_fn: MetricFn, labels: ArrayLike, scores: ArrayLike, n_boot: int = 1000, seed: int = 0
) -> dict:
    """``{"value": metric, "ci95": [lo, hi]}`` with a 95% stratified bootstrap interval."""
    lo, hi = bootstrap_ci(metric_fn, labels, scores, n_boot=n_boot, seed=seed, alpha=0.05)
    return {"value": float(metric_fn(labels, scores)), "ci95": [lo, hi]}


def evaluate_method(
    labels: ArrayLike,
    scores: ArrayLike,
    threshold: float | None,
    is_head: bool,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """All audit metrics of one method on one protocol, each as ``{"value", "ci95"}``.

    ``accuracy`` (probability >= 0.5) only for MINT heads, whose scores are probabilities;
    ``balanced_accuracy`` only when a calibrated ``threshold`` is given.
    """
    metrics: dict[str, MetricFn] = {}
    if is_head:
        metrics["accuracy"] = lambda y, s: accuracy_at(y, s, 0.5)
    if threshold is not None:
        metrics["balanced_accuracy"] = lambda y, s: balanced_accuracy_at(y, s, threshold)
    metrics["auc"] = roc_auc
    metrics["tpr_at_1pct_fpr"] = lambda y, s: tpr_at_fpr(y, s, 0.01)
    metrics["tpr_at_0.1pct_fpr"] = lambda y, s: tpr_at_fpr(y, s, 0.001)
    return {
        name: metric_with_ci(fn, labels, scores, n_boot=n_boot, seed=seed)
        for name, fn in metrics.items()
    }
