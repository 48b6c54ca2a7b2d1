"""Audit outputs: metrics per protocol and method, report.json / report.md / scores.npz, figures, TensorBoard.

report.json (format ``amint-dist-audit/1``; every metric is ``{"value": x, "ci95": [lo, hi]}``,
null where undefined)::

    format, tool_version, created, audited {run_dir (null for a model file), weights_file, model {...,
        weights_sha256}, dataset {...}, weights {scored: model | ema, file, sha256, ema {decay, warmup}}},
    members_rule, ledger (bool), settings {...}, methods {name: description}, notes [...],
    task {accuracy, split: heldout, n, per_split {split: {value, ci95, n}}},  # Wilson 95% intervals
    scored {split: {n, skipped {reason: n}}}, passive_training [{epoch, loss, ...}],
    integrity {status: verified | unsigned | not checked | broken | absent, signature, keys {ed25519, hmac},
               declared, entries, problems [...], checked [...], unrecorded_checkpoints [...]},
                                                               # the run's audit_trail.jsonl (amint_dist.records)
    distribution_shift [...],          # protocols whose blind (pixels-only) baseline reads above chance, first in notes
    reference_runs {runs [{run_dir, weights_sha256, ledger_sha256, splits_sha256, subset, integrity}], population_split,
                    in_rule, coverage {split: {n, in_per_run, in_for_none, out_for_none}}} or null  # docs/audit_power.md
    suspect {path, n, skipped {reason: n}, alpha, verdict (used | no evidence), verdict_method, reference,
             n_reference_nonmembers, n_reference_members, notes [...], scores_file,
             methods {method: {u, auc, p_value, fraction {value, ci95}}}},   # only with audit.suspect
    protocols {seen|unseen|null: {description, member_split, nonmember_split,
        n_members, n_nonmembers, n_calibration_members, n_calibration_nonmembers,
        members_excluded_not_consumed, nonmembers_excluded_consumed, balancing_dropped {members, nonmembers},
        thresholds {method: t or null},                        # chosen on the calibration share only
        fixed_fpr {method: [{fpr, threshold, threshold_from (calibration | evaluation), n_threshold_nonmembers,
                   false_positives_allowed, tpr, ci95, true_positives, n_members, evaluation_fpr,
                   evaluation_fpr_ci95, false_positives, n_nonmembers, nonmembers_at_fpr}]},
                                   # FPR 0 .. 0.1; thresholds from the calibration non-members; Clopper-Pearson
        methods {method: {accuracy (heads only), balanced_accuracy, auc,
                          tpr_at_1pct_fpr, tpr_at_0.1pct_fpr}}}},
    files {...}

scores.npz (``allow_pickle=False``): per protocol p the evaluation samples ``p/key``, ``p/split``,
``p/label`` (1 = member) and ``p/<method>`` (higher = more likely member); the calibration
samples the same under ``calibration/p/...``.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from amint_dist.audit.fixed_fpr import fixed_fpr_rows
from amint_dist.audit.metrics import choose_threshold, evaluate_method
from amint_dist.audit.plots import plot_rocs, plot_score_histograms, save_figure
from amint_dist.audit.protocols import ProtocolSamples
from amint_dist.audit.report_md import render_markdown
from amint_dist.io import atomic_write_bytes, atomic_write_text
from amint_dist.tb import Monitor

REPORT_FORMAT = "amint-dist-audit/1"
HEADS = ("amint", "passive")
METHOD_DESCRIPTIONS = {
    "amint": "the audited model's own MINT head (trained jointly with it)",
    "passive": "passive MINT: a fresh head of the same kind trained on the frozen model's taps (paper's baseline)",
    "loss": "negative cross-entropy of the true class (Yeom et al. 2018)",
    "confidence": "softmax probability of the true class",
    "entropy": "negative prediction entropy",
    "modified_entropy": "negative modified entropy (Song & Mittal 2021)",
}


def proportion(hits: np.ndarray) -> dict:
    """Fraction of true entries with a Wilson 95% interval (null when empty)."""
    n, k = int(hits.size), int(np.sum(hits))
    if n == 0:
        return {"value": None, "ci95": None}
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"value": k / n, "ci95": [float(ci.low), float(ci.high)]}


def task_section(correct: Mapping[str, np.ndarray], split: str = "heldout") -> dict:
    """Task accuracy on ``split`` (the contract's ``task.accuracy``) and on every scored split."""
    return {"accuracy": proportion(correct[split]), "split": split, "n": int(correct[split].size),
            "per_split": {s: {**proportion(c), "n": int(c.size)} for s, c in correct.items()}}


def evaluate_protocol(samples: ProtocolSamples, methods: Sequence[str], n_boot: int, seed: int) -> dict:
    """Thresholds from the calibration share, then every metric on the evaluation share."""
    calib, evaluation = samples.calibration, samples.evaluation
    calibrated = 0 < int(calib["label"].sum()) < calib["label"].size
    thresholds = {m: choose_threshold(calib["label"], calib[m]) if calibrated else None for m in methods}
    measurable = 0 < int(evaluation["label"].sum()) < evaluation["label"].size
    metrics = {
        m: evaluate_method(evaluation["label"], evaluation[m], thresholds[m], m in HEADS, n_boot=n_boot, seed=seed)
        for m in methods
    } if measurable else {}
    fixed = {m: fixed_fpr_rows(evaluation["label"], evaluation[m], calibration_nonmembers=calib[m][calib["label"] == 0])
             for m in methods} if measurable else {}
    return {"thresholds": thresholds, "methods": metrics, "fixed_fpr": fixed}


def json_safe(obj: Any) -> Any:
    """Plain JSON types; NaN and infinities become null."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def scores_arrays(protocols: Sequence[ProtocolSamples]) -> dict[str, np.ndarray]:
    """scores.npz content: ``p/<column>`` for evaluation samples, ``calibration/p/<column>`` for the rest."""
    out = {}
    for p in protocols:
        out.update({f"{p.name}/{c}": v for c, v in p.evaluation.items()})
        out.update({f"calibration/{p.name}/{c}": v for c, v in p.calibration.items()})
    return out


SAMPLE_COLUMNS = ("key", "split", "label")  # a protocol's row columns in scores.npz; every other column is a method


def read_protocol_scores(audit_dir: str | Path, protocol: str, calibration: bool = False) -> dict[str, np.ndarray]:
    """The inverse of :func:`scores_arrays` for one protocol: ``audit_dir/scores.npz``'s evaluation (or
    calibration) columns by name (key, split, label, one per method); one line naming the file when it or the
    protocol is absent."""
    path = Path(audit_dir) / "scores.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    prefix = f"calibration/{protocol}/" if calibration else f"{protocol}/"
    with np.load(path, allow_pickle=False) as z:
        columns = {name[len(prefix):]: z[name] for name in z.files if name.startswith(prefix)}
    if not columns:
        raise ValueError(f"{path} holds no protocol {protocol!r}")
    return columns


def summary_notes(protocols: Mapping[str, dict]) -> list[str]:
    """Plain-language checks: the null protocol reads chance; which method leads on ``seen``."""
    notes = []
    null = protocols.get("null", {}).get("methods", {})
    if null:
        off = [m for m, v in null.items() if not v["auc"]["ci95"][0] <= 0.5 <= v["auc"]["ci95"][1]]
        notes.append("null protocol: every method's AUC interval contains 0.5 (no leakage seen)" if not off
                     else f"null protocol: AUC interval excludes 0.5 for {', '.join(off)}: investigate leakage")
    seen = protocols.get("seen", {}).get("methods", {})
    if seen:
        ranking = sorted(seen, key=lambda m: -seen[m]["auc"]["value"])
        notes.append("seen protocol by AUC: " + " > ".join(f"{m} {seen[m]['auc']['value']:.3f}" for m in ranking))
    return notes


def tensorboard_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """``audit/<protocol>/<method>/<metric>`` values and ``audit/task_accuracy``."""
    scalars = {"audit/task_accuracy": report["task"]["accuracy"]["value"]}
    for p, entry in report["protocols"].items():
        for method, metrics in entry["methods"].items():
            scalars.update({f"audit/{p}/{method}/{k}": v["value"] for k, v in metrics.items()})
    return {k: v for k, v in scalars.items() if v is not None}


def write_outputs(out_dir: Path, report: dict, protocols: Sequence[ProtocolSamples], monitor: Monitor) -> Path:
    """Write report.json, report.md, scores.npz, roc.png, scores.png and TensorBoard entries; return report.md."""
    report = json_safe({**report, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": {"report": "report.json", "table": "report.md", "scores": "scores.npz",
                                  "roc": "roc.png", "histograms": "scores.png"}})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **scores_arrays(protocols))
    atomic_write_bytes(out_dir / "scores.npz", buffer.getvalue())
    curves = {p.name: {m: (p.evaluation["label"], p.evaluation[m]) for m in report["protocols"][p.name]["methods"]}
              for p in protocols if report["protocols"][p.name]["methods"]}
    thresholds = {p: report["protocols"][p]["thresholds"] for p in curves}
    figures = {"roc": plot_rocs(curves, None, thresholds),
               "scores": plot_score_histograms(curves, None)} if curves else {}
    for name, fig in figures.items():
        save_figure(fig, out_dir / f"{name}.png")
        monitor.figure(f"audit/{name}", fig, 0)
    monitor.scalars(tensorboard_scalars(report), 0)
    monitor.close()
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return out_dir / "report.md"
