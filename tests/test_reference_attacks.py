"""LiRA, RMIA, the logit-scaled confidence and the blind baseline on synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from amint_dist.audit.blind import BLIND, add_blind_scores, shift_warnings
from amint_dist.audit.lira import fit_groups, lira_offline, lira_online
from amint_dist.audit.protocols import ProtocolSamples
from amint_dist.audit.report import evaluate_protocol
from amint_dist.audit.rmia import reference_probability, rmia_scores
from amint_dist.audit.signals import logit_confidence


def gaussian_world(n: int, k: int, gap: float, sd_in: float, sd_out: float, seed: int = 0):
    """Per-sample means spread widely (sd 3); reference k is IN for a random half of the samples."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, n)
    is_in = rng.random((k, n)) < 0.5
    signals = np.where(is_in, rng.normal(mu + gap, sd_in, (k, n)), rng.normal(mu, sd_out, (k, n)))
    member = rng.random(n) < 0.5
    target = np.where(member, rng.normal(mu + gap, sd_in), rng.normal(mu, sd_out))
    return mu, is_in, signals, member, target


def test_lira_online_per_sample_variance_is_the_analytic_likelihood_ratio():
    mu, is_in, signals, _, target = gaussian_world(300, 800, gap=1.0, sd_in=0.5, sd_out=2.0)
    expected = norm.logpdf(target, mu + 1.0, 0.5) - norm.logpdf(target, mu, 2.0)
    score = lira_online(target, signals, is_in, fixed_variance=False)
    central = np.abs(expected) < 5  # away from the tails, where small errors of the fitted spreads are magnified
    np.testing.assert_allclose(score[central], expected[central], rtol=0.2, atol=0.3)  # fitted from 800 runs
    assert np.corrcoef(score, expected)[0, 1] > 0.99


def test_fixed_variance_pools_within_sample_spread_and_lira_reaches_the_optimal_auc():
    mu, is_in, signals, member, target = gaussian_world(6000, 64, gap=1.0, sd_in=1.0, sd_out=1.0)
    fit_in, fit_out = fit_groups(signals, is_in)
    assert fit_in.fixed_std == pytest.approx(1.0, rel=0.03) and fit_out.fixed_std == pytest.approx(1.0, rel=0.03)
    optimal = norm.cdf(1.0 / np.sqrt(2))  # equal-variance Gaussians 1 sd apart: AUC of the likelihood ratio test
    for attack in (lira_online, lira_offline):
        assert roc_auc_score(member, attack(target, signals, is_in, fixed_variance=True)) == pytest.approx(optimal,
                                                                                                         abs=0.03)
    assert roc_auc_score(member, target) < optimal - 0.1  # one global threshold on the raw signal: far weaker


def test_lira_offline_is_the_standardised_distance_from_the_out_mean():
    signals = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    is_in = np.array([[False, True], [False, False], [True, False]])
    score = lira_offline(np.array([3.0, 3.0]), signals, is_in, fixed_variance=False)
    assert score[0] == pytest.approx((3.0 - 1.0) / np.std([0.0, 2.0], ddof=1))
    assert score[1] == pytest.approx((3.0 - 4.0) / np.std([3.0, 5.0], ddof=1))


def test_samples_in_for_no_reference_run_fall_back_to_the_global_gap():
    signals = np.array([[1.0, 10.0, 5.0], [2.0, 12.0, 5.0]])
    is_in = np.array([[True, False, False], [False, False, True]])
    fit_in, fit_out = fit_groups(signals, is_in)
    gap = np.mean([1.0, 5.0]) - np.mean([2.0, 10.0, 12.0, 5.0])
    assert fit_in.mean[1] == pytest.approx(11.0 + gap)  # sample 1 is IN for no run: its OUT mean + the gap
    assert fit_in.mean[0] == 1.0 and fit_out.mean[2] == 5.0
    assert np.isfinite(lira_online(np.zeros(3), signals, is_in, fixed_variance=False)).all()


def test_rmia_counts_population_samples_the_likelihood_ratio_beats():
    rng = np.random.default_rng(1)
    k, n, m, gamma = 4, 50, 70, 1.5
    probs, population_probs = rng.uniform(0.05, 1, (k, n)), rng.uniform(0.05, 1, (k, m))
    target, population_target = rng.uniform(0.05, 1, n), rng.uniform(0.05, 1, m)
    is_in = rng.random((k, n)) < 0.5
    for online, a in ((True, 0.0), (False, 0.3)):
        px = reference_probability(probs, is_in, online, a)
        pz = reference_probability(population_probs, np.zeros((k, m), bool), online, a)
        brute = [np.mean([(target[i] / px[i]) / (population_target[j] / pz[j]) > gamma for j in range(m)])
                 for i in range(n)]
        np.testing.assert_allclose(rmia_scores(target, probs, is_in, population_target, population_probs, gamma,
                                               online, a), brute)


def test_rmia_offline_uses_the_papers_linear_approximation_of_the_out_models():
    probs = np.array([[0.2, 0.9], [0.6, 0.1], [1.0, 0.5]])
    is_in = np.array([[True, False], [False, False], [False, True]])
    p_out = np.array([0.8, 0.5])  # sample 0: models 1, 2; sample 1: models 0, 1
    np.testing.assert_allclose(reference_probability(probs, is_in, False, 1.0), p_out)
    np.testing.assert_allclose(reference_probability(probs, is_in, False, 0.0), (p_out + 1) / 2)
    np.testing.assert_allclose(reference_probability(probs, is_in, True, 0.3), probs.mean(axis=0))


def test_logit_confidence_is_exact_where_the_probability_rounds_to_one():
    logits = torch.tensor([[2.0, 0.5, -1.0], [200.0, 0.0, 0.0], [0.0, 300.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    phi = logit_confidence(logits, labels)
    p = torch.softmax(logits[0].double(), 0)[0]
    assert phi[0].item() == pytest.approx(torch.log(p / (1 - p)).item(), rel=1e-12)
    assert phi[1].item() == pytest.approx(200.0 - np.log(2.0)) and phi[2].item() == pytest.approx(-300.0, abs=1e-9)


def blind_protocol(shift: float, seed: int = 0) -> tuple[ProtocolSamples, dict]:
    """Pixels of 400 samples (a fifth calibrates); members brighter by ``shift``."""
    rng = np.random.default_rng(seed)
    n = 400
    label = (np.arange(n) % 2).astype(np.int8)
    pixels = rng.uniform(0, 1, (n, 48)) + shift * label[:, None]
    keys = np.array([f"k{i}" for i in range(n)])
    signals = {"members": {"key": keys, "pixels": pixels}}
    rows = {"key": keys, "split": np.full(n, "members"), "label": label}
    calibrates = np.arange(n) % 5 == 0
    return ProtocolSamples("seen", {c: v[~calibrates] for c, v in rows.items()},
                           {c: v[calibrates] for c, v in rows.items()}), signals


def test_blind_baseline_reads_chance_on_an_honest_split_and_flags_a_shifted_one():
    results = {}
    for name, shift in (("honest", 0.0), ("shifted", 0.15)):
        samples, signals = blind_protocol(shift)
        add_blind_scores(samples, signals, seed=0)
        results[name] = evaluate_protocol(samples, [BLIND], n_boot=200, seed=0)
    honest, shifted = (results[n]["methods"][BLIND]["auc"] for n in ("honest", "shifted"))
    assert honest["ci95"][0] <= 0.5 <= honest["ci95"][1]
    assert shifted["ci95"][0] > 0.5
    warnings = shift_warnings(results)
    assert len(warnings) == 1 and warnings[0].startswith("DISTRIBUTION SHIFT in protocol shifted")


def test_attacks_calibrate_every_split_alike_and_only_on_the_drawn_splits():
    """A sample's score must not depend on the split it sits in, nor on a split every reference run trained on
    (probe outside the pool): the global quantities come from the drawn splits, over all of them at once."""
    from amint_dist.audit.references import attack_columns
    from amint_dist.records.ledger import ExposureLedger

    rng = np.random.default_rng(3)
    k, sizes = 3, {"members": 40, "heldout": 30, "probe": 20, "external": 25}

    def scored(n: int) -> dict:
        return {"index": np.arange(n), "phi": rng.normal(0, 2, n), "prob": rng.uniform(0.05, 1, n),
                "mint": rng.normal(0, 3, n)}

    target = {s: scored(n) for s, n in sizes.items()}
    references = [{s: scored(n) for s, n in sizes.items()} for _ in range(k)]
    ledgers = []
    for _ in range(k):
        ledger = ExposureLedger(sizes)
        ledger.counts.update({s: (rng.random(n) < 0.5).astype(np.int32) for s, n in sizes.items()})
        ledger.counts["probe"][:] = 1  # trained by every reference run
        ledgers.append(ledger)
    args = (2.0, 0.3, True)
    both = attack_columns(target, references, ledgers, ["members", "heldout"], *args)
    with_probe = attack_columns(target, references, ledgers, ["members", "probe", "heldout"], *args)
    merged = {s: {c: np.concatenate([target["members"][c], target["heldout"][c]]) for c in target["members"]}
              for s in ("members",)}
    merged["members"]["index"] = np.arange(70)
    merged["external"] = target["external"]
    merged_refs = [{"members": {c: np.concatenate([r["members"][c], r["heldout"][c]]) for c in r["members"]},
                    "external": r["external"]} for r in references]
    for r in merged_refs:
        r["members"]["index"] = np.arange(70)
    merged_ledgers = []
    for ledger in ledgers:
        one = ExposureLedger({"members": 70, "external": sizes["external"]})
        one.counts["members"][:] = np.concatenate([ledger.counts["members"], ledger.counts["heldout"]])
        merged_ledgers.append(one)
    alone = attack_columns(merged, merged_refs, merged_ledgers, ["members"], *args)
    for method, scores in alone["members"].items():
        np.testing.assert_allclose(np.concatenate([both["members"][method], both["heldout"][method]]), scores,
                                   err_msg=method)
        for split in ("members", "heldout"):
            np.testing.assert_allclose(with_probe[split][method], both[split][method], err_msg=method)
