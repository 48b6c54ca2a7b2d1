"""The blind baseline: a model-free membership classifier that sees only the inputs.

Logistic regression on the images average-pooled to a small grid (``signals.PIXEL_GRID``), standardised,
fitted on each protocol's calibration share only and scored on its evaluation share. No model is involved,
so on an honest key-hash split it must read chance (AUC ~0.5); when its AUC interval lies above 0.5 the
members and non-members differ as data (a distribution shift), and every other figure of that protocol
measures the split, not the model: the report says so first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from amint_dist.audit.protocols import ProtocolSamples
from amint_dist.audit.scoring import Scored

BLIND = "blind"
BLIND_C = 0.1  # strong L2 regularisation: a few dozen calibration samples per protocol must not overfit noise
DESCRIPTION = ("blind baseline: logistic regression on downsampled pixels (no model), fitted on the calibration "
               "share; must read ~0.5, else the split is distribution-shifted")


def _features(signals: Mapping[str, Scored], rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """Pixel features of the protocol rows (by split and key)."""
    lookup = {split: dict(zip(s["key"].tolist(), range(s["key"].size))) for split, s in signals.items()}
    return np.stack([signals[split]["pixels"][lookup[split][key]]
                     for split, key in zip(rows["split"].tolist(), rows["key"].tolist())])


def add_blind_scores(samples: ProtocolSamples, signals: Mapping[str, Scored], seed: int) -> None:
    """Fit on ``samples.calibration``, add the ``blind`` column to both shares (the calibration share's scores
    are in-sample; only the evaluation share's are reported)."""
    calibration, evaluation = samples.calibration, samples.evaluation
    labels = calibration["label"]
    if not 0 < int(labels.sum()) < labels.size:  # nothing to fit: a constant score (reads chance)
        for part in (calibration, evaluation):
            part[BLIND] = np.zeros(part["label"].size)
        return
    model = make_pipeline(StandardScaler(), LogisticRegression(C=BLIND_C, max_iter=2000, random_state=seed))
    model.fit(_features(signals, calibration), labels)
    for part in (calibration, evaluation):
        part[BLIND] = model.decision_function(_features(signals, part)) if part["label"].size else np.zeros(0)


def shift_warnings(results: Mapping[str, dict]) -> list[str]:
    """One line per protocol whose blind AUC interval lies above 0.5."""
    lines = []
    for name, protocol in results.items():
        auc = protocol.get("methods", {}).get(BLIND, {}).get("auc") or {}
        if auc.get("ci95") and auc["ci95"][0] > 0.5:
            lines.append(f"DISTRIBUTION SHIFT in protocol {name}: the blind baseline (inputs only, no model) separates "
                         f"its members from its non-members (AUC {auc['value']:.3f} [{auc['ci95'][0]:.2f}, "
                         f"{auc['ci95'][1]:.2f}]); its figures measure the split, not the model")
    return lines
