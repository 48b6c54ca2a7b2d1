"""Membership scores computed from the audited model's own logits (no extra models).

Every score is oriented like the MINT head: higher = more likely member.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

ScoreFn = Callable[[Any, Any], np.ndarray]


def _to_numpy(x: Any) -> np.ndarray:
    """Numpy view of a numpy array or a (possibly GPU, bf16, grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(a))) as a column, stable for large and -inf entries."""
    m = a.max(axis=1, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=1, keepdims=True))


def _log_probs(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (log-softmax [N, C] in float64, integer labels [N]) after validation."""
    z = _to_numpy(logits).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[1] < 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits [N, C>=2] and labels [N], got {z.shape} and {y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    return z - _logsumexp(z), y


def _is_class(log_p: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Boolean [N, C] mask selecting column ``classes[n]`` in row n."""
    return np.arange(log_p.shape[1]) == classes[:, None]


def loss_score(logits: Any, labels: Any) -> np.ndarray:
    """Negative cross-entropy of the true class (Yeom et al. 2018)."""
    log_p, y = _log_probs(logits, labels)
    return log_p[np.arange(y.size), y]


def confidence_score(logits: Any, labels: Any) -> np.ndarray:
    """Softmax probability of the true class."""
    return np.exp(loss_score(logits, labels))


def entropy_score(logits: Any, labels: Any) -> np.ndarray:
    """Negative entropy of the predicted distribution (labels unused, kept for one signature)."""
    log_p, _ = _log_probs(logits, labels)
    return np.sum(np.exp(log_p) * log_p, axis=1)


def _log1m_probs(log_p: np.ndarray) -> np.ndarray:
    """log(1 - p) for every class, accurate even when the top class has p == 1.0 in floats.

    For the top class 1 - p is the sum of the other classes' probabilities (log-sum-exp);
    every other class has p <= 0.5, where log1p(-p) is accurate.
    """
    top = _is_class(log_p, np.argmax(log_p, axis=1))
    others = _logsumexp(np.where(top, -np.inf, log_p))
    return np.where(top, others, np.log1p(-np.where(top, 0.0, np.exp(log_p))))


def modified_entropy_score(logits: Any, labels: Any) -> np.ndarray:
    """Negative modified entropy Mentr (Song & Mittal 2021).

    Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i); members have low Mentr.
    """
    log_p, y = _log_probs(logits, labels)
    log1m_p = _log1m_probs(log_p)
    terms = np.where(_is_class(log_p, y), np.exp(log1m_p) * log_p, np.exp(log_p) * log1m_p)
    return terms.sum(axis=1)


BASELINES: dict[str, ScoreFn] = {
    "loss": loss_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "modified_entropy": modified_entropy_score,
}
