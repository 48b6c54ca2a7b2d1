"""RMIA (Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference Attacks").

The signal is the probability the model gives a sample's true class. For a sample x and population samples
z (non-members of the audited model), ``LR(x, z) = (p(x | target) / p(x)) / (p(z | target) / p(z))``, where
p(.) is the probability averaged over reference models; the score of x is the fraction of z with
``LR(x, z) > gamma``.

- online: p(x) averages all K reference models (IN and OUT for x alike).
- offline: only the models x is OUT for, corrected by the paper's linear approximation
  ``p(x) = ((1 + a) * p_out(x) + (1 - a)) / 2`` (``a`` chosen without evaluation data); the same for z.
A sample OUT for no reference model (offline) falls back to all reference models.
"""

from __future__ import annotations

import numpy as np

MIN_PROB = 1e-30  # floor of the averaged probabilities (a ratio's denominator)


def _mean_where(probs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per sample, the mean over the ``chosen`` models (over all models where none is chosen)."""
    count = chosen.sum(axis=0)
    mean = np.where(chosen, probs, 0.0).sum(axis=0) / np.maximum(count, 1)
    return np.where(count > 0, mean, probs.mean(axis=0))


def reference_probability(probs: np.ndarray, is_in: np.ndarray, online: bool, a: float) -> np.ndarray:
    """p(x) from the reference models' probabilities [K, N]: online all of them, offline the OUT ones with the
    linear approximation."""
    probs = np.asarray(probs, np.float64)
    if online:
        return np.maximum(probs.mean(axis=0), MIN_PROB)
    p_out = _mean_where(probs, ~np.asarray(is_in, bool))
    return np.maximum(((1 + a) * p_out + (1 - a)) / 2, MIN_PROB)


def rmia_scores(target: np.ndarray, probs: np.ndarray, is_in: np.ndarray, population_target: np.ndarray,
                population_probs: np.ndarray, gamma: float, online: bool, a: float) -> np.ndarray:
    """Fraction of population samples z with LR(x, z) > gamma, per sample x (higher = member)."""
    ratio_x = np.asarray(target, np.float64) / reference_probability(probs, is_in, online, a)
    population_out = np.zeros(np.shape(population_probs), bool)  # population samples: OUT for every model
    ratio_z = np.asarray(population_target, np.float64) / reference_probability(population_probs, population_out,
                                                                               online, a)
    if ratio_z.size == 0:
        raise ValueError("RMIA needs population samples (the external split is empty)")
    ratio_z = np.sort(ratio_z)
    # LR(x, z) > gamma  <=>  ratio_z < ratio_x / gamma
    return np.searchsorted(ratio_z, ratio_x / gamma, side="left") / ratio_z.size
