"""TPR at fixed FPRs (0, 1e-4, 1e-3, 1e-2, 0.1) with exact Clopper-Pearson intervals.

A target FPR f allows ``k = floor(f * n)`` false positives among the n non-members the threshold is chosen on;
the threshold is the lowest one that admits at most k of them (``score >= t`` is "member"). It is chosen on
the protocol's calibration non-members when it has some (never on evaluation samples), and read off the
evaluation non-members otherwise (optimistic: ``threshold_from`` says which). On the evaluation samples the
row then reports the TPR and the FPR reached, each with its exact 95% interval. An FPR below 1 / n is not
resolvable: only "no false positive at all" qualifies (``false_positives_allowed`` 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binomtest

FIXED_FPRS = (0.0, 1e-4, 1e-3, 1e-2, 0.1)


def allowed_false_positives(fpr: float, n_nonmembers: int) -> int:
    """How many of ``n_nonmembers`` a target ``fpr`` may call members (1% of 300 is 3)."""
    return math.floor(fpr * n_nonmembers + 1e-9)


def threshold_at_fpr(nonmember_scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold ``t`` with at most ``allowed_false_positives`` non-member scores ``>= t``."""
    ranked = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    k = allowed_false_positives(fpr, ranked.size)
    return -math.inf if k >= ranked.size else float(np.nextafter(ranked[k], math.inf))


def exact_proportion(hits: int, n: int) -> tuple[float, list[float]]:
    """hits / n with its Clopper-Pearson 95% interval (nan, [0, 1] when n is 0)."""
    if n == 0:
        return math.nan, [0.0, 1.0]
    ci = binomtest(hits, n).proportion_ci(0.95, method="exact")
    return hits / n, [float(ci.low), float(ci.high)]


def fixed_fpr_rows(labels: np.ndarray, scores: np.ndarray, fprs: Sequence[float] = FIXED_FPRS,
                   calibration_nonmembers: np.ndarray | None = None) -> list[dict]:
    """Per target FPR: the threshold (from ``calibration_nonmembers`` when given and not empty, else from the
    evaluation non-members), the evaluation TPR and FPR it gives, each with an exact 95% interval."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    members, nonmembers = scores[labels == 1], scores[labels == 0]
    calibrated = calibration_nonmembers is not None and np.asarray(calibration_nonmembers).size > 0
    chosen_on = np.asarray(calibration_nonmembers, dtype=np.float64) if calibrated else nonmembers
    rows = []
    for fpr in fprs:
        threshold = threshold_at_fpr(chosen_on, fpr)
        hits, false_positives = int(np.sum(members >= threshold)), int(np.sum(nonmembers >= threshold))
        tpr, tpr_ci = exact_proportion(hits, members.size)
        reached, reached_ci = exact_proportion(false_positives, nonmembers.size)
        rows.append({"fpr": fpr, "threshold": threshold,
                     "threshold_from": "calibration" if calibrated else "evaluation",
                     "n_threshold_nonmembers": int(chosen_on.size),
                     "false_positives_allowed": allowed_false_positives(fpr, chosen_on.size),
                     "tpr": tpr, "ci95": tpr_ci, "true_positives": hits, "n_members": int(members.size),
                     "evaluation_fpr": reached, "evaluation_fpr_ci95": reached_ci, "false_positives": false_positives,
                     "n_nonmembers": int(nonmembers.size), "nonmembers_at_fpr": fpr * nonmembers.size})
    return rows


def _header(row: Mapping) -> str:
    return f"FPR {row['fpr']:g} (= {row['nonmembers_at_fpr']:.3g} of {row['n_nonmembers']} non-members)"


def _cell(row: Mapping) -> str:
    lo, hi = row["ci95"]
    return f"{row['tpr']:.3f} [{lo:.3f}, {hi:.3f}], FPR {row['evaluation_fpr']:.3f}"


def fixed_fpr_markdown(protocol: str, table: Mapping[str, list[dict]]) -> list[str]:
    """report.md's table of one protocol: TPR [exact 95% CI] and the FPR reached, per method and target FPR."""
    if not table:
        return []
    first = next(iter(table.values()))
    n, source = first[0]["n_threshold_nonmembers"], first[0]["threshold_from"]
    where = (f"thresholds chosen on the {n} calibration non-members" if source == "calibration" else
             f"no calibration share: thresholds read off the {n} evaluation non-members (optimistic)")
    title = (f"TPR at fixed FPR, `{protocol}` ({where}; an FPR below 1/{n} allows no false positive; "
             "exact 95% intervals; the FPR reached on the evaluation non-members after the comma):")
    lines = [title, "",
             "| method | " + " | ".join(_header(r) for r in first) + " |", "|---|" + "---|" * len(first)]
    lines += [f"| {m} | " + " | ".join(_cell(r) for r in rows) + " |" for m, rows in table.items()]
    return lines + [""]
