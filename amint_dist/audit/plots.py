"""Audit figures: ROC curves (linear and log-log) and member/non-member score histograms.

Figures are plain ``matplotlib.figure.Figure`` objects on the Agg canvas (no pyplot state,
no display needed): the caller may save them, hand them to TensorBoard's
``SummaryWriter.add_figure``, or simply drop them.
"""

from __future__ import annotations

import io
import os
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from amint_dist.audit.metrics import roc_auc, roc_points
from amint_dist.io import atomic_write_bytes

LabelledScores = tuple[ArrayLike, ArrayLike]


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically (rendered in memory, then temp file and rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw_roc(linear, loglog, curves: Mapping[str, LabelledScores]) -> None:
    """One curve per method on a linear and a log-log axis, AUC in the legend."""
    n_neg_max = 1
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_points(labels, scores)
        n_neg_max = max(n_neg_max, int(np.sum(np.asarray(labels) == 0)))
        label = f"{name} (AUC {roc_auc(labels, scores):.3f})"
        for ax in (linear, loglog):
            ax.plot(fpr, tpr, label=label)
    low = min(1e-3, 1.0 / n_neg_max)
    for ax, lim in ((linear, 0.0), (loglog, low)):
        ax.plot([lim, 1], [lim, 1], "k--", lw=0.8, label="chance")
        ax.set(xlim=(lim, 1), ylim=(lim, 1), xlabel="false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    loglog.set(xscale="log", yscale="log")
    linear.legend(loc="lower right", fontsize="small")


def plot_roc(
    curves: Mapping[str, LabelledScores], path: str | os.PathLike | None, title: str = "ROC"
) -> Figure:
    """Linear and log-log ROC panels, one curve per method, AUC in the legend.

    The log-log panel starts at ``min(1e-3, 1 / n_non_members)``; FPR = 0 points are clipped.
    Written to ``path`` as a PNG unless ``path`` is None.
    """
    fig = _new_figure(11, 5)
    _draw_roc(*fig.subplots(1, 2), curves)
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_rocs(
    protocols: Mapping[str, Mapping[str, LabelledScores]], path: str | os.PathLike | None
) -> Figure:
    """``plot_roc``'s two panels, one row per protocol (titled by it). Written to ``path`` unless None."""
    fig = _new_figure(11, 4.5 * len(protocols))
    for (linear, loglog), (protocol, curves) in zip(fig.subplots(len(protocols), 2, squeeze=False), protocols.items()):
        _draw_roc(linear, loglog, curves)
        linear.set_title(f"{protocol}: linear")
        loglog.set_title(f"{protocol}: log-log")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_score_histograms(
    protocols: Mapping[str, Mapping[str, LabelledScores]], path: str | os.PathLike | None
) -> Figure:
    """One row per protocol, one column per method: member vs non-member score histograms.

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
            labels, scores = (np.asarray(a) for a in per_method[method])
            bins = np.histogram_bin_edges(scores, bins=40)
            for value, name in ((1, "member"), (0, "non-member")):
                ax.hist(scores[labels == value], bins=bins, density=True, alpha=0.5, label=name)
            ax.set_title(f"{protocol} / {method}", fontsize="small")
            ax.legend(fontsize="x-small")
    if path is not None:
        save_figure(fig, path)
    return fig
