"""Audit figures: ROC curves (linear and log-log; method and AUC in the legend, the calibrated operating points
marked, a bootstrap band around the lead MINT head's curve) and member/non-member score histograms on a
log-odds scale (probabilities near 0 or 1 would otherwise fall into one bin).

Figures are plain ``matplotlib.figure.Figure`` objects on the Agg canvas (no pyplot state,
no display needed): the caller may save them, hand them to TensorBoard's
``SummaryWriter.add_figure``, or simply drop them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from amint_dist.audit.metrics import roc_auc, roc_band, roc_points
from amint_dist.io import atomic_write_bytes

LabelledScores = tuple[ArrayLike, ArrayLike]
BAND_METHODS = ("amint", "passive")  # the first one present gets the bootstrap band
LOG_ODDS_LIMIT = 36.0  # |log-odds| a float64 probability can still resolve (1 - p >= ~1e-16)


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-16, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)


def _log_odds_of_log(log_p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) from log p (the loss score), exact where p rounds to 1."""
    return np.clip(log_p - np.log(np.maximum(-np.expm1(log_p), 1e-300)), -LOG_ODDS_LIMIT, LOG_ODDS_LIMIT)


def _log_magnitude(negative: np.ndarray) -> np.ndarray:
    """-log10(-score) for scores <= 0 (negative entropies): members, near 0, spread to the right."""
    return -np.log10(np.maximum(-negative, 1e-16))


# how each method's scores are histogrammed (monotone: members stay to the right); others as they are
DISPLAY: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "amint": (_log_odds, "MINT logit"),
    "passive": (_log_odds, "MINT logit"),
    "confidence": (_log_odds, "log-odds of the true class"),
    "loss": (_log_odds_of_log, "log-odds of the true class"),
    "entropy": (_log_magnitude, "-log10(entropy)"),
    "modified_entropy": (_log_magnitude, "-log10(modified entropy)"),
}


def display_scores(method: str, scores: ArrayLike) -> tuple[np.ndarray, str]:
    """``scores`` on the histogram's scale and its axis label."""
    transform, label = DISPLAY.get(method, (lambda x: x, "score"))
    return transform(np.asarray(scores, dtype=np.float64)), label


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically (rendered in memory, then temp file and rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw_roc(linear, loglog, curves: Mapping[str, LabelledScores], thresholds: Mapping[str, float | None]) -> None:
    """One curve per method on a linear and a log-log axis, AUC in the legend; each method's calibrated
    threshold (chosen on calibration data) marked where it lands on these samples; a 95% bootstrap band
    around the lead MINT head's curve."""
    n_neg_max = 1
    band = next((m for m in BAND_METHODS if m in curves), None)
    marked = next((m for m in curves if thresholds.get(m) is not None), None)  # the legend names the marker once
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels), np.asarray(scores)
        fpr, tpr, _ = roc_points(labels, scores)
        n_neg_max = max(n_neg_max, int(np.sum(labels == 0)))
        label = f"{name} (AUC {roc_auc(labels, scores):.3f})"
        for ax in (linear, loglog):
            color = ax.plot(fpr, tpr, label=label)[0].get_color()
            if thresholds.get(name) is not None:
                chosen = scores >= thresholds[name]
                ax.plot(chosen[labels == 0].mean(), chosen[labels == 1].mean(), "o", color=color, ms=6,
                        label="calibrated threshold" if name == marked else None)
            if name == band:
                grid = np.r_[0.0, np.geomspace(1e-4, 1.0, 200)]
                lo, hi = roc_band(labels, scores, grid)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, step="post", label=f"{name} 95% bootstrap band")
    low = min(1e-3, 1.0 / n_neg_max)
    for ax, lim in ((linear, 0.0), (loglog, low)):
        ax.plot([lim, 1], [lim, 1], "k--", lw=0.8, label="chance")
        ax.set(xlim=(lim, 1), ylim=(lim, 1), xlabel="false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    loglog.set(xscale="log", yscale="log")
    linear.legend(loc="lower right", fontsize="small")


def plot_roc(
    curves: Mapping[str, LabelledScores], path: str | os.PathLike | None, title: str = "ROC",
    thresholds: Mapping[str, float | None] | None = None,
) -> Figure:
    """Linear and log-log ROC panels, one curve per method, AUC in the legend; ``thresholds`` (method ->
    calibrated threshold) are marked.

    The log-log panel starts at ``min(1e-3, 1 / n_non_members)``; FPR = 0 points are clipped.
    Written to ``path`` as a PNG unless ``path`` is None.
    """
    fig = _new_figure(11, 5)
    _draw_roc(*fig.subplots(1, 2), curves, thresholds or {})
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_rocs(
    protocols: Mapping[str, Mapping[str, LabelledScores]], path: str | os.PathLike | None,
    thresholds: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Figure:
    """``plot_roc``'s two panels, one row per protocol (titled by it), ``thresholds[protocol]`` marked. Written
    to ``path`` unless None."""
    fig = _new_figure(11, 4.5 * len(protocols))
    for (linear, loglog), (protocol, curves) in zip(fig.subplots(len(protocols), 2, squeeze=False), protocols.items()):
        _draw_roc(linear, loglog, curves, (thresholds or {}).get(protocol) or {})
        linear.set_title(f"{protocol}: linear")
        loglog.set_title(f"{protocol}: log-log")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_score_histograms(
    protocols: Mapping[str, Mapping[str, LabelledScores]], path: str | os.PathLike | None
) -> Figure:
    """One row per protocol, one column per method: member vs non-member score histograms on the method's
    log-odds scale (``display_scores``).

    Written to ``path`` as a PNG unless ``path`` is None.
    """
    methods = list(dict.fromkeys(m for per_method in protocols.values() for m in per_method))
    fig = _new_figure(3.2 * len(methods), 2.6 * len(protocols))
    axes = fig.subplots(len(protocols), len(methods), squeeze=False)
    for row, (protocol, per_method) in zip(axes, protocols.items()):
        for ax, method in zip(row, methods):
            if method not in per_method:
                ax.set_axis_off()
                continue
            labels = np.asarray(per_method[method][0])
            scores, xlabel = display_scores(method, per_method[method][1])
            bins = np.histogram_bin_edges(scores, bins=40)
            for value, name in ((1, "member"), (0, "non-member")):
                ax.hist(scores[labels == value], bins=bins, density=True, alpha=0.5, label=name)
            ax.set_title(f"{protocol} / {method}", fontsize="small")
            ax.set_xlabel(xlabel, fontsize="small")
            ax.legend(fontsize="x-small", loc="upper left")
    if path is not None:
        save_figure(fig, path)
    return fig
