"""LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles") on per-sample signals.

Inputs: the audited model's signal ``target`` [N] and the K reference models' ``signals`` [K, N] on the same
samples, with ``is_in`` [K, N] (sample n was in reference k's training data, from k's exposure ledger).

- online: fit a Gaussian to the IN signals and one to the OUT signals of each sample; the score is the log
  likelihood ratio log N(t; mu_in, s_in) - log N(t; mu_out, s_out).
- offline: only the OUT Gaussian; the score is the one-sided test's statistic (t - mu_out) / s_out (the
  paper's 1 - P[Z > t], Z ~ N(mu_out, s_out), is a monotone function of it: the same ranking).
- per-sample variance: each sample's own spread (needs >= 2 signals in the group); fixed variance: one
  pooled within-sample variance per group (IN, OUT), the paper's choice for few reference models.

The global quantities (fixed spreads, the IN - OUT gap below) are estimated on the samples ``fit`` selects: the
audit passes those of the splits the reference runs drew their subsets from, the same for every protocol.

Fallbacks, for samples a group is empty for (e.g. IN for no reference run): the mean is the sample's other
group's mean shifted by the global IN - OUT gap (mean of all IN signals minus mean of all OUT signals), and
the variance is the group's fixed variance; so is a per-sample variance with fewer than 2 signals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_STD = 1e-6  # floor of every standard deviation (identical signals would divide by zero)


@dataclass(frozen=True)
class GroupFit:
    """Per-sample Gaussian of one group (IN or OUT): means, per-sample and fixed standard deviations, counts."""

    mean: np.ndarray
    std: np.ndarray
    fixed_std: float
    count: np.ndarray


def _fit_group(signals: np.ndarray, member: np.ndarray, fit: np.ndarray) -> GroupFit:
    """Means and spreads of each sample's signals where ``member`` holds (NaN mean where there are none); the
    fixed spread from the samples ``fit`` selects."""
    count = member.sum(axis=0)
    total = np.where(member, signals, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        squares = np.where(member, (signals - mean) ** 2, 0.0).sum(axis=0)
        per_sample = np.sqrt(squares / (count - 1))
    dof = np.clip(count - 1, 0, None)[fit].sum()
    if dof > 0:
        fixed = float(np.sqrt(squares[fit & (count > 1)].sum() / dof))
    else:  # one signal per sample at most (K = 1): the spread across samples, an upper bound
        fixed = float(np.std(signals[:, fit][member[:, fit]])) if member[:, fit].any() else 1.0
    fixed = max(fixed, MIN_STD)
    std = np.where(count > 1, np.maximum(per_sample, MIN_STD), fixed)
    return GroupFit(mean, std, fixed, count)


def fit_groups(signals: np.ndarray, is_in: np.ndarray, fit: np.ndarray | None = None) -> tuple[GroupFit, GroupFit]:
    """IN and OUT fits with the documented fallback for empty groups; the global quantities (fixed spreads, the
    IN - OUT gap) from the samples ``fit`` selects (default: all)."""
    signals, is_in = np.asarray(signals, np.float64), np.asarray(is_in, bool)
    if signals.ndim != 2 or signals.shape != is_in.shape:
        raise ValueError(f"reference signals {signals.shape} and IN/OUT {is_in.shape} must be [K, N] alike")
    fit = np.ones(signals.shape[1], bool) if fit is None else np.asarray(fit, bool)
    fit_in, fit_out = _fit_group(signals, is_in, fit), _fit_group(signals, ~is_in, fit)
    inside, outside = signals[:, fit][is_in[:, fit]], signals[:, fit][~is_in[:, fit]]
    gap = float(inside.mean() - outside.mean()) if inside.size and outside.size else 0.0
    mean_in = np.where(fit_in.count > 0, fit_in.mean, fit_out.mean + gap)
    mean_out = np.where(fit_out.count > 0, fit_out.mean, fit_in.mean - gap)
    return (GroupFit(mean_in, fit_in.std, fit_in.fixed_std, fit_in.count),
            GroupFit(mean_out, fit_out.std, fit_out.fixed_std, fit_out.count))


def _log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray | float) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def lira_online(target: np.ndarray, signals: np.ndarray, is_in: np.ndarray, fixed_variance: bool,
                fit: np.ndarray | None = None) -> np.ndarray:
    """Log likelihood ratio of the target signal under the IN vs the OUT Gaussian (higher = member); ``fit``:
    :func:`fit_groups`'s."""
    fit_in, fit_out = fit_groups(signals, is_in, fit)
    s_in = fit_in.fixed_std if fixed_variance else fit_in.std
    s_out = fit_out.fixed_std if fixed_variance else fit_out.std
    t = np.asarray(target, np.float64)
    return _log_normal(t, fit_in.mean, s_in) - _log_normal(t, fit_out.mean, s_out)


def lira_offline(target: np.ndarray, signals: np.ndarray, is_in: np.ndarray, fixed_variance: bool,
                 fit: np.ndarray | None = None) -> np.ndarray:
    """One-sided statistic (t - mu_out) / s_out of the OUT Gaussian alone (higher = member)."""
    _, fit_out = fit_groups(signals, is_in, fit)
    s_out = fit_out.fixed_std if fixed_variance else fit_out.std
    return (np.asarray(target, np.float64) - fit_out.mean) / s_out
