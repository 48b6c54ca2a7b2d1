"""Reference runs for LiRA, RMIA and aMINT-LR: verified like the audited run, scored on the audited samples,
each sample IN or OUT of each reference run by that run's own exposure ledger (ledger > 0: IN).

Population samples for RMIA (``POPULATION_SPLIT``): the external split, which no run trains its classifier on
(it holds MINT negatives only) and which no protocol evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from amint_dist.audit.inputs import AuditInputs, Gather, load_inputs
from amint_dist.audit.lira import lira_offline, lira_online
from amint_dist.audit.rmia import rmia_scores
from amint_dist.audit.scoring import Scored
from amint_dist.records.ledger import ExposureLedger
from amint_dist.records.signing import Verifier

POPULATION_SPLIT = "external"
REFERENCE_METHODS = {
    "lira_online": "LiRA online (Carlini et al. 2022): IN vs OUT Gaussians of the reference runs' logit-scaled "
                   "confidence, per-sample variance",
    "lira_online_fixed": "LiRA online, one pooled (fixed) variance per group",
    "lira_offline": "LiRA offline: one-sided test against the OUT Gaussian, per-sample variance",
    "lira_offline_fixed": "LiRA offline, fixed variance",
    "rmia_online": "RMIA online (Zarifzadeh et al. 2024): share of population samples the sample's likelihood "
                   "ratio beats by audit.rmia_gamma, p(x) from all reference runs",
    "rmia_offline": "RMIA offline: p(x) from the OUT reference runs with the linear approximation (audit.rmia_offline_a)",
    "amint_lr": "aMINT-LR: the MINT logit calibrated like LiRA online, fixed variance, against the reference heads",
    "amint_lr_offline": "aMINT-LR offline: the MINT logit against the OUT reference heads, fixed variance",
}
MINT_METHODS = ("amint_lr", "amint_lr_offline")


def load_references(paths: Sequence[str], audited: AuditInputs, rank: int, world: int, gather: Gather,
                    verifier: Verifier) -> list[AuditInputs]:
    """Every reference run verified as the audited run is, on the audited dataset root; refused in one line when
    it was trained on another root, has no ledger, or is the audited model itself."""
    runs = []
    for path in paths:
        try:
            inputs = load_inputs(path, audited.data_root, rank, world, gather, verifier)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"reference run {path}: {e}") from None
        recorded = inputs.model_config.get("dataset", {}).get("splits_sha256")
        if recorded != audited.splits_sha256:
            raise ValueError(f"reference run {path}: trained on another dataset root (splits.json sha256 "
                             f"{str(recorded)[:16]}..., audited {audited.splits_sha256[:16]}...)")
        if inputs.ledger is None:
            raise FileNotFoundError(f"reference run {path}: no ledger.npz, so which samples it trained on is unknown")
        if inputs.model_config["weights_sha256"] == audited.model_config["weights_sha256"]:
            raise ValueError(f"reference run {path}: holds the audited model's own weights")
        runs.append(inputs)
    return runs


def in_out(ledgers: Sequence[ExposureLedger], split: str, index: np.ndarray) -> np.ndarray:
    """[K, N]: sample ``index[n]`` of ``split`` was consumed by reference run k's training."""
    return np.stack([ledger.counts[split][index] > 0 for ledger in ledgers])


def _stacked(references: Sequence[Mapping[str, Scored]], split: str, column: str, index: np.ndarray) -> np.ndarray:
    for r in references:
        if not np.array_equal(r[split]["index"], index):
            raise RuntimeError(f"split {split!r}: a reference model scored other samples than the audited model")
    return np.stack([r[split][column] for r in references])


def attack_columns(target: Mapping[str, Scored], references: Sequence[Mapping[str, Scored]],
                   ledgers: Sequence[ExposureLedger], splits: Sequence[str], gamma: float, offline_a: float,
                   with_mint: bool) -> dict[str, dict[str, np.ndarray]]:
    """Split -> method -> per-sample score (rows in the order of ``target[split]``). The attacks run once over
    the samples of all ``splits`` together, and what LiRA estimates globally (fixed variances, the IN - OUT
    gap) comes from the splits the reference runs drew from (IN for some samples, OUT for others): the same
    calibration for members and non-members of every protocol."""
    population = target[POPULATION_SPLIT]
    population_probs = _stacked(references, POPULATION_SPLIT, "prob", population["index"])
    joined = lambda column: np.concatenate([target[s][column] for s in splits])  # noqa: E731
    stacked = lambda column: np.concatenate([_stacked(references, s, column, target[s]["index"])  # noqa: E731
                                             for s in splits], axis=1)
    in_by_split = [in_out(ledgers, s, target[s]["index"]) for s in splits]
    is_in = np.concatenate(in_by_split, axis=1)
    drawn = np.concatenate([np.full(m.shape[1], m.any() and not m.all()) for m in in_by_split])  # subset-drawn splits
    phi, prob = stacked("phi"), stacked("prob")
    columns = {
        "lira_online": lira_online(joined("phi"), phi, is_in, False, drawn),
        "lira_online_fixed": lira_online(joined("phi"), phi, is_in, True, drawn),
        "lira_offline": lira_offline(joined("phi"), phi, is_in, False, drawn),
        "lira_offline_fixed": lira_offline(joined("phi"), phi, is_in, True, drawn),
        **{f"rmia_{mode}": rmia_scores(joined("prob"), prob, is_in, population["prob"], population_probs, gamma,
                                       mode == "online", offline_a) for mode in ("online", "offline")},
    }
    if with_mint:
        mint = stacked("mint")
        columns["amint_lr"] = lira_online(joined("mint"), mint, is_in, True, drawn)
        columns["amint_lr_offline"] = lira_offline(joined("mint"), mint, is_in, True, drawn)
    bounds = np.cumsum([0, *(target[s]["index"].size for s in splits)])
    return {s: {m: v[bounds[i]:bounds[i + 1]] for m, v in columns.items()} for i, s in enumerate(splits)}


def reference_record(runs: Sequence[AuditInputs], splits: Sequence[str], target: Mapping[str, Scored]) -> dict:
    """The report's ``reference_runs``: each run's digests and subset, and per split how many audited samples each
    run holds IN, and how many are IN for none or OUT for none (those use the documented fallback)."""
    ledgers = [r.ledger for r in runs]
    coverage = {}
    for split in splits:
        is_in = in_out(ledgers, split, target[split]["index"])
        k_in = is_in.sum(axis=0)
        coverage[split] = {"n": int(is_in.shape[1]), "in_per_run": [int(n) for n in is_in.sum(axis=1)],
                           "in_for_none": int((k_in == 0).sum()), "out_for_none": int((k_in == len(runs)).sum())}
    return {
        "runs": [{"run_dir": str(Path(r.run_dir).resolve()), "weights_sha256": r.model_config["weights_sha256"],
                  "ledger_sha256": r.ledger.digest(), "splits_sha256": r.splits_sha256,
                  "subset": ((r.run_config or {}).get("data") or {}).get("subset"),
                  "integrity": r.integrity.get("status")} for r in runs],
        "population_split": POPULATION_SPLIT,
        "in_rule": "a sample is IN for a reference run when that run's exposure ledger counts it (> 0), else OUT",
        "coverage": coverage,
    }
