"""TPR at fixed FPRs (0, 1e-4, 1e-3, 1e-2, 0.1) with exact Clopper-Pearson intervals on the member count.

The threshold is read off the evaluation ROC (as ``metrics.tpr_at_fpr``); the interval covers the
binomial noise of the members only. An FPR below 1 / n_nonmembers is not resolvable: only "no false
positive at all" qualifies, which the ``false_positives_allowed`` column shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binomtest

from amint_dist.audit.metrics import tpr_at_fpr

FIXED_FPRS = (0.0, 1e-4, 1e-3, 1e-2, 0.1)


def fixed_fpr_rows(labels: np.ndarray, scores: np.ndarray, fprs: Sequence[float] = FIXED_FPRS) -> list[dict]:
    """Per FPR: the TPR, its exact 95% interval and how many false positives that FPR allows."""
    n_members, n_nonmembers = int(labels.sum()), int((labels == 0).sum())
    rows = []
    for fpr in fprs:
        hits = round(tpr_at_fpr(labels, scores, fpr) * n_members)
        ci = binomtest(hits, n_members).proportion_ci(0.95, method="exact")
        rows.append({"fpr": fpr, "tpr": hits / n_members, "ci95": [float(ci.low), float(ci.high)],
                     "false_positives_allowed": int(np.floor(fpr * n_nonmembers + 1e-9))})
    return rows


def fixed_fpr_markdown(protocol: str, table: Mapping[str, list[dict]]) -> list[str]:
    """report.md's table: TPR [exact 95% CI] per method at every fixed FPR of one protocol."""
    if not table:
        return []
    first = next(iter(table.values()))
    header = " | ".join(f"FPR {r['fpr']:g} (<= {r['false_positives_allowed']} FP)" for r in first)
    lines = [f"TPR at fixed FPR, `{protocol}` (exact 95% intervals):", "", f"| method | {header} |",
             "|---|" + "---|" * len(first)]
    lines += [f"| {m} | " + " | ".join(f"{r['tpr']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in rows)
              + " |" for m, rows in table.items()]
    return lines + [""]
