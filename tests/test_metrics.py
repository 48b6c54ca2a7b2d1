"""Audit building blocks: metrics, bootstrap intervals, logit baselines, figures."""

import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from amint_dist.audit.baselines import (
    BASELINES,
    confidence_score,
    entropy_score,
    loss_score,
    modified_entropy_score,
)
from amint_dist.audit.metrics import (
    accuracy_at,
    balanced_accuracy_at,
    bootstrap_ci,
    choose_threshold,
    evaluate_method,
    roc_auc,
    roc_band,
    tpr_at_fpr,
)
from amint_dist.audit.plots import plot_roc, plot_score_histograms

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Scores in decreasing order with labels chosen so every ROC step is known by hand:
# threshold 10 9 8 7 6 5 4 3 2 1
# member     1 0 1 1 0 1 0 0 1 0   -> (tp, fp) after each: (1,0)(1,1)(2,1)(3,1)(3,2)(4,2)...
INTERLEAVED = ([1, 0, 1, 1, 0, 1, 0, 0, 1, 0], [10, 9, 8, 7, 6, 5, 4, 3, 2, 1])


@pytest.mark.parametrize("n, pos_frac", [(7, 0.5), (200, 0.5), (1000, 0.05), (5000, 0.7)])
def test_auc_matches_sklearn_with_ties(n, pos_frac):
    rng = np.random.default_rng(n)
    labels = (rng.random(n) < pos_frac).astype(int)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=n) + labels, 1)  # many ties, within and across classes
    assert len(np.unique(scores)) < n
    assert abs(roc_auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-9


def test_auc_by_hand():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    labels, scores = INTERLEAVED  # 25 pairs; member beats non-member in 17 of them
    assert roc_auc(labels, scores) == pytest.approx(17 / 25, abs=1e-12)


def test_auc_refuses_single_class_and_bad_labels():
    with pytest.raises(ValueError):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, float("nan")])


def test_tpr_at_fpr_perfect_separation():
    labels, scores = [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    for fpr in (0.0, 0.001, 0.01, 0.5):
        assert tpr_at_fpr(labels, scores, fpr) == 1.0


@pytest.mark.parametrize(
    "fpr, expected", [(0.0, 0.2), (0.1, 0.2), (0.2, 0.6), (0.4, 0.8), (1.0, 1.0)]
)
def test_tpr_at_fpr_interleaved(fpr, expected):
    assert tpr_at_fpr(*INTERLEAVED, fpr) == pytest.approx(expected)


def test_tpr_at_fpr_top_non_member_and_too_few_negatives():
    labels, scores = [0, 1, 1, 0, 0], [5, 4, 3, 2, 1]
    assert tpr_at_fpr(labels, scores, 0.01) == 0.0  # only "reject all" has FPR < 1/3
    assert tpr_at_fpr(labels, scores, 1 / 3) == 1.0


def test_tpr_at_fpr_ties_across_classes():
    # Threshold 2 admits one member and two non-members at once: no cut inside the tie.
    labels, scores = [1, 1, 0, 0, 0], [3, 2, 2, 2, 1]
    assert tpr_at_fpr(labels, scores, 0.5) == 0.5
    assert tpr_at_fpr(labels, scores, 2 / 3) == 1.0


def test_tpr_at_fpr_matches_sklearn_roc_points():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(rng.normal(size=3000) + 1.5 * labels, 2)
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.0, 0.001, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(labels, scores, target) == tprs[fprs <= target].max()


def test_accuracy_and_balanced_accuracy_by_hand():
    labels, scores = [1, 1, 1, 0, 0], [0.9, 0.4, 0.6, 0.5, 0.1]
    # score >= 0.5 predicts member: [1, 0, 1, 1, 0] -> TPR 2/3, TNR 1/2, 3 of 5 right.
    assert accuracy_at(labels, scores, 0.5) == pytest.approx(3 / 5)
    assert balanced_accuracy_at(labels, scores, 0.5) == pytest.approx(7 / 12)
    assert balanced_accuracy_at(labels, scores, 0.55) == pytest.approx(0.5 * (2 / 3 + 1))


def test_choose_threshold_separates_separable_data():
    labels, scores = [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.6, 0.4, 0.2, 0.1]
    assert choose_threshold(labels, scores) == pytest.approx(0.5)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500)
    scores = rng.random(500) + 1.2 * labels
    threshold = choose_threshold(labels, scores)
    assert scores[labels == 0].max() < threshold <= scores[labels == 1].min()
    assert balanced_accuracy_at(labels, scores, threshold) == 1.0


def test_choose_threshold_prefers_strictest_of_equal_cuts_and_adjacent_floats():
    # Cuts at 4 and at 2 both reach balanced accuracy 0.75; the stricter one wins.
    assert choose_threshold([1, 0, 1, 0], [4, 3, 2, 1]) == 3.5
    lower = 1.0
    upper = np.nextafter(lower, 2.0)  # no float strictly between; naive midpoint rounds to lower
    threshold = choose_threshold([1, 0], [upper, lower])
    assert balanced_accuracy_at([1, 0], [upper, lower], threshold) == 1.0


def test_bootstrap_is_stratified_and_reproducible():
    labels = np.r_[np.ones(30, int), np.zeros(70, int)]
    scores = np.random.default_rng(3).normal(size=100) + labels
    seen = []

    def spy(y, s):
        seen.append((int(y.sum()), y.size))
        return roc_auc(y, s)

    ci = bootstrap_ci(spy, labels, scores, n_boot=50, seed=7)
    assert set(seen) == {(30, 100)}
    assert ci == bootstrap_ci(roc_auc, labels, scores, n_boot=50, seed=7)
    assert ci != bootstrap_ci(roc_auc, labels, scores, n_boot=50, seed=8)
    assert ci[0] < roc_auc(labels, scores) < ci[1]


def test_bootstrap_draws_same_samples_for_every_method():
    # Two "methods" rank the samples in opposite orders; each score encodes its sample id.
    labels = np.r_[np.ones(20, int), np.zeros(30, int)]
    sample_ids = np.random.default_rng(10).permutation(50).astype(float)
    drawn = {1: [], -1: []}
    for sign, record in drawn.items():

        def record_ids(y, s, sign=sign, record=record):
            record.append(np.sort(sign * s))
            return 0.0

        bootstrap_ci(record_ids, labels, sign * sample_ids, n_boot=20, seed=11)
    assert len(drawn[1]) == 20
    for up, down in zip(drawn[1], drawn[-1]):
        np.testing.assert_array_equal(up, down)


def test_bootstrap_ci_width_matches_normal_theory():
    # For a mean, the 95% percentile interval is about mean +- 1.96 standard errors.
    rng = np.random.default_rng(9)
    labels = np.r_[np.ones(2000, int), np.zeros(50, int)]
    scores = rng.normal(size=labels.size)

    def member_mean(y, s):
        return s[y].mean()

    lo, hi = bootstrap_ci(member_mean, labels, scores, n_boot=1000, seed=0)
    standard_error = scores[:2000].std() / math.sqrt(2000)
    assert (hi - lo) / 2 / standard_error == pytest.approx(1.96, abs=0.15)


def test_bootstrap_ci_coverage_of_true_auc():
    d, n, reps = 1.0, 60, 200
    true_auc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))  # Phi(d / sqrt(2))
    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(n, int), np.zeros(n, int)]
    covered = 0
    for rep in range(reps):
        scores = rng.normal(size=2 * n) + d * labels
        lo, hi = bootstrap_ci(roc_auc, labels, scores, n_boot=200, seed=rep)
        covered += lo <= true_auc <= hi
    assert 0.88 <= covered / reps <= 0.99


def test_evaluate_method_keys_and_json():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    probs = 1 / (1 + np.exp(-(rng.normal(size=400) + labels)))
    head = evaluate_method(labels, probs, threshold=0.6, is_head=True, n_boot=20, seed=0)
    assert list(head) == [
        "accuracy",
        "balanced_accuracy",
        "auc",
        "tpr_at_1pct_fpr",
        "tpr_at_0.1pct_fpr",
    ]
    assert head["accuracy"]["value"] == pytest.approx(accuracy_at(labels, probs, 0.5))
    calibrated = balanced_accuracy_at(labels, probs, 0.6)
    assert head["balanced_accuracy"]["value"] == pytest.approx(calibrated)
    assert head["auc"]["value"] == pytest.approx(roc_auc_score(labels, probs))
    for entry in head.values():
        lo, hi = entry["ci95"]
        assert lo <= hi and all(isinstance(v, float) for v in (entry["value"], lo, hi))
    json.dumps(head, allow_nan=False)
    baseline = evaluate_method(labels, probs, threshold=None, is_head=False, n_boot=20, seed=0)
    assert list(baseline) == ["auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"]


LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [-1.0, 4.0, 0.2]])
TARGETS = np.array([0, 1, 1])


def _direct_formulas():
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    p_y = p[np.arange(3), TARGETS]
    mentr = -(1 - p_y) * np.log(p_y)
    for i in range(3):
        for c in range(3):
            if c != TARGETS[i]:
                mentr[i] -= p[i, c] * np.log(1 - p[i, c])
    return {
        "loss": np.log(p_y),
        "confidence": p_y,
        "entropy": (p * np.log(p)).sum(axis=1),
        "modified_entropy": -mentr,
    }


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_match_direct_formulas_numpy_and_torch(name):
    expected = _direct_formulas()[name]
    np.testing.assert_allclose(BASELINES[name](LOGITS, TARGETS), expected, rtol=1e-12)
    from_torch = BASELINES[name](torch.tensor(LOGITS, requires_grad=True), torch.tensor(TARGETS))
    np.testing.assert_allclose(from_torch, expected, rtol=1e-12)


def test_baselines_orientation():
    logits = np.array([[8.0, 0.0, 0.0], [0.1, 0.0, 0.0], [8.0, 0.0, 0.0]])
    targets = np.array([0, 1, 1])  # confident right, unsure, confident wrong
    for name, fn in BASELINES.items():
        confident_right, unsure, confident_wrong = fn(logits, targets)
        assert confident_right > unsure, name
        if name != "entropy":  # entropy ignores the label
            assert confident_right > confident_wrong, name


def test_baselines_stable_for_extreme_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    targets = np.array([0, 0])
    np.testing.assert_allclose(loss_score(logits, targets), [0.0, -1000.0])
    np.testing.assert_allclose(confidence_score(logits, targets), [1.0, 0.0])
    np.testing.assert_allclose(entropy_score(logits, targets), [0.0, 0.0], atol=1e-300)
    # Wrong and certain: (1 - p_y) log p_y = -1000 and p_1 log(1 - p_1) = log(e^-1000) = -1000.
    np.testing.assert_allclose(modified_entropy_score(logits, targets), [0.0, -2000.0], atol=1e-300)


def _read_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    return image


def test_plots_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 300)

    def method(shift):
        return labels, rng.normal(size=300) + shift * labels

    fig = plot_roc({"amint": method(2.0), "loss": method(0.5)}, tmp_path / "roc.png", "seen")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.axes[1].get_xscale() == "log" and fig.axes[0].get_legend() is not None
    _read_png(tmp_path / "roc.png")

    protocols = {
        "seen": {"amint": method(2.0), "loss": method(0.5)},
        "null": {"amint": method(0.0)},
    }
    fig = plot_score_histograms(protocols, tmp_path / "sub" / "scores.png")
    assert np.asarray(fig.axes, dtype=object).size == 4
    _read_png(tmp_path / "sub" / "scores.png")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["roc.png", "scores.png"]


def test_fixed_fpr_rows_count_false_positives_and_give_exact_intervals():
    from amint_dist.audit.fixed_fpr import fixed_fpr_markdown, fixed_fpr_rows
    labels = np.array([1] * 10 + [0] * 20)
    scores = np.concatenate([np.linspace(0.5, 1.0, 10), np.linspace(0.0, 0.6, 20)])  # top non-member 0.6
    rows = fixed_fpr_rows(labels, scores, (0.0, 0.05, 0.1))
    assert [r["false_positives_allowed"] for r in rows] == [0, 1, 2]
    assert rows[0]["tpr"] == 0.8 and rows[2]["tpr"] == 0.9  # 8 members above 0.6; two FPs (0.6, 0.57) admit 0.56
    lo, hi = rows[0]["ci95"]
    assert 0.44 < lo < 0.45 and 0.97 < hi < 0.98  # Clopper-Pearson for 8/10
    assert "| m | 0.800 [0.444, 0.975]" in "\n".join(fixed_fpr_markdown("seen", {"m": rows}))


def test_fixed_fpr_thresholds_come_from_the_calibration_nonmembers():
    from amint_dist.audit.fixed_fpr import fixed_fpr_rows
    calibration = np.linspace(0.0, 0.99, 100)  # 100 calibration non-members: FPR 0.01 allows one (0.99)
    labels = np.array([1] * 4 + [0] * 6)
    scores = np.array([0.995, 0.985, 0.972, 0.5, 0.999, 0.975, 0.1, 0.2, 0.3, 0.4])
    rows = fixed_fpr_rows(labels, scores, (0.0, 0.01, 0.02), calibration_nonmembers=calibration)
    assert [r["threshold_from"] for r in rows] == ["calibration"] * 3
    assert [r["false_positives_allowed"] for r in rows] == [0, 1, 2]
    assert [(r["true_positives"], r["false_positives"]) for r in rows] == [(1, 1), (2, 1), (3, 2)]
    assert 0.99 < rows[0]["threshold"] < 0.990001 and rows[1]["threshold"] > 0.98  # just above the (k+1)-th highest
    assert rows[2]["evaluation_fpr"] == 2 / 6 and rows[2]["nonmembers_at_fpr"] == pytest.approx(0.12)
    lo, hi = rows[1]["ci95"]  # exact interval of 2/4
    assert lo == pytest.approx(0.0675865, abs=1e-6) and hi == pytest.approx(0.9324135, abs=1e-6)
    read_off = fixed_fpr_rows(labels, scores, (0.0,))  # without calibration: the evaluation non-members decide
    assert read_off[0]["threshold_from"] == "evaluation" and read_off[0]["false_positives"] == 0


def test_roc_band_covers_the_curve_and_narrows_with_more_samples():
    rng = np.random.default_rng(3)
    grid = np.array([0.0, 0.01, 0.1, 0.5, 1.0])
    widths = []
    for n in (100, 2000):
        labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
        scores = rng.normal(size=2 * n) + labels
        lo, hi = roc_band(labels, scores, grid, n_boot=200)
        point = np.array([tpr_at_fpr(labels, scores, g) for g in grid])
        assert np.all(lo <= point + 1e-12) and np.all(point <= hi + 1e-12) and hi[-1] == lo[-1] == 1.0
        widths.append(hi[2] - lo[2])
    assert widths[1] < widths[0] / 2


def test_roc_figure_marks_calibrated_points_and_band_histograms_read_log_odds():
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(300), np.zeros(300)].astype(int)
    probs = 1 / (1 + np.exp(-(rng.normal(size=600) * 3 + 12 * labels)))  # members' probabilities round to ~1
    loss = np.log(np.clip(rng.random(600), 1e-3, 1)) * (1 - 0.9 * labels)
    curves = {"amint": (labels, probs), "loss": (labels, loss)}
    fig = plot_roc(curves, None, "seen", thresholds={"amint": 0.5, "loss": None})
    linear = fig.axes[0]
    legend = [t.get_text() for t in linear.get_legend().get_texts()]
    assert f"amint (AUC {roc_auc(labels, probs):.3f})" in legend and f"loss (AUC {roc_auc(labels, loss):.3f})" in legend
    assert "calibrated threshold" in legend and "amint 95% bootstrap band" in legend
    markers = [line for line in linear.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 1  # loss has no calibrated threshold
    chosen = probs >= 0.5
    assert markers[0].get_xdata()[0] == chosen[labels == 0].mean() and markers[0].get_ydata()[0] == chosen[labels == 1].mean()
    assert len(linear.collections) == 1  # the band, around amint only
    hist = plot_score_histograms({"seen": curves}, None)
    amint_axis, loss_axis = hist.axes
    assert amint_axis.get_xlabel() == "MINT logit" and loss_axis.get_xlabel() == "log-odds of the true class"
    edges = [patch.get_x() for patch in amint_axis.patches]
    logits = np.log(np.clip(probs, 1e-16, 1 - 1e-16)) - np.log1p(-np.clip(probs, 1e-16, 1 - 1e-16))
    assert min(edges) == pytest.approx(logits.min()) and max(edges) > 5  # spread over logits, not in one bin at 1
    members_in_top_bin = [p.get_height() for p in amint_axis.patches[:40]]  # the member histogram
    assert max(members_in_top_bin) * (logits.max() - logits.min()) / 40 < 0.5  # no bin holds half the members
