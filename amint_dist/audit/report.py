"""Audit outputs: metrics per protocol and method, report.json / report.md / scores.npz, figures, TensorBoard.

report.json (format ``amint-dist-audit/1``; every metric is ``{"value": x, "ci95": [lo, hi]}``,
null where undefined)::

    format, tool_version, created, audited {run_dir, model {...}, dataset {...},
                                            weights {scored: model | ema, file, sha256, ema {decay, warmup}}},
    members_rule, ledger (bool), settings {...}, methods {name: description}, notes [...],
    task {accuracy, split: heldout, n, per_split {split: {value, ci95, n}}},  # Wilson 95% intervals
    scored {split: {n, skipped {reason: n}}}, passive_training [{epoch, loss, ...}],
    integrity {status: verified | unsigned | not checked | broken | absent, signature, keys {ed25519, hmac},
               declared, entries, problems [...], checked [...], unrecorded_checkpoints [...]},
                                                               # the run's audit_trail.jsonl (amint_dist.records)
    suspect {path, n, skipped {reason: n}, alpha, verdict (used | no evidence), verdict_method, reference,
             n_reference_nonmembers, n_reference_members, notes [...], scores_file,
             methods {method: {u, auc, p_value, fraction {value, ci95}}}},   # only with audit.suspect
    protocols {seen|unseen|null: {description, member_split, nonmember_split,
        n_members, n_nonmembers, n_calibration_members, n_calibration_nonmembers,
        members_excluded_not_consumed, nonmembers_excluded_consumed, balancing_dropped {members, nonmembers},
        thresholds {method: t or null},                        # chosen on the calibration share only
        fixed_fpr {method: [{fpr, tpr, ci95, false_positives_allowed}]},  # FPR 0 .. 0.1, Clopper-Pearson
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

from amint_dist.audit.fixed_fpr import fixed_fpr_markdown, fixed_fpr_rows
from amint_dist.audit.metrics import choose_threshold, evaluate_method
from amint_dist.audit.plots import plot_rocs, plot_score_histograms, save_figure
from amint_dist.audit.protocols import ProtocolSamples
from amint_dist.audit.suspect import suspect_markdown
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
TABLE_METRICS = {"auc": "AUC", "balanced_accuracy": "bal. acc", "tpr_at_1pct_fpr": "TPR@1%FPR"}


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
    fixed = {m: fixed_fpr_rows(evaluation["label"], evaluation[m]) for m in methods} if measurable else {}
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


def _cell(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} [{lo:.2f}, {hi:.2f}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: a headline, one table (method x protocol metric, 95% CIs) and the sample counts."""
    protocols = report["protocols"]
    columns = [(p, m) for p in protocols for m in TABLE_METRICS if m != "tpr_at_1pct_fpr" or p == "seen"]
    methods = list(dict.fromkeys(m for p in protocols.values() for m in p["methods"]))
    task = report["task"]["accuracy"]
    lines = [
        f"# aMINT audit of `{report['audited']['run_dir']}`",
        "",
        integrity_line(report.get("integrity") or {}),
        "",
        weights_line(report["audited"].get("weights") or {"scored": "model", "file": "model.safetensors"}),
        "",
        *(suspect_markdown(report["suspect"]) if report.get("suspect") else []),
        f"Task accuracy on heldout: **{_cell(task)}** (n={report['task']['n']}). "
        f"Members: {report['members_rule']}. Thresholds chosen on a "
        f"{report['settings']['calibration_fraction']:.0%} calibration share (by key hash), never on evaluation "
        f"samples; 95% intervals from {report['settings']['n_boot']} stratified bootstrap resamples.",
        "",
        "| method | " + " | ".join(f"{p} {TABLE_METRICS[m]}" for p, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in methods:
        name = f"**{method}**" if method == "amint" else method
        cells = [_cell(protocols[p]["methods"].get(method, {}).get(m)) for p, m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{p} {v['n_members']}/{v['n_nonmembers']}" for p, v in protocols.items())
    lines += ["", f"Evaluation members/non-members: {counts}.", ""]
    if protocols:
        name = "seen" if "seen" in protocols else next(iter(protocols))
        lines += fixed_fpr_markdown(name, protocols[name].get("fixed_fpr") or {})
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def weights_line(weights: Mapping[str, Any]) -> str:
    """report.md's statement of which weights were scored (``audit.weights``)."""
    ema = weights.get("ema")
    kind = f"EMA weights (decay {ema['decay']})" if weights["scored"] == "ema" and ema else "final weights"
    return f"Weights scored: **{weights['scored']}** (`{weights['file']}`, the run's {kind})."


def integrity_line(integrity: Mapping[str, Any]) -> str:
    """report.md's verdict on the audit trail: verified (with the key's fingerprint), NOT established (and why),
    or exactly what broke."""
    status = integrity.get("status", "absent")
    if status == "verified":
        return (f"Integrity: **verified** (audit trail of {integrity['entries']} entries, every one signed and checked "
                f"with {_keys_used(integrity.get('keys') or {})}; checked: {', '.join(integrity['checked'])}).")
    if status == "broken":
        return (f"Integrity: **BROKEN** (signature {integrity['signature']}): "
                + "; ".join(integrity["problems"] or ["signature does not verify"]))
    return f"Integrity: **NOT established** ({_not_established(integrity)})."


def _keys_used(keys: Mapping[str, Any]) -> str:
    used = [f"Ed25519 public key {keys['ed25519']}"] if keys.get("ed25519") else []
    return " and ".join(used + (["the HMAC key ($AMINT_AUDIT_KEY)"] if keys.get("hmac") else []))


def _not_established(integrity: Mapping[str, Any]) -> str:
    status = integrity.get("status", "absent")
    if status == "absent":
        return integrity.get("note", "no audit trail")
    if status == "unsigned":
        return ("unsigned trail: its hash chain and the files match, which catches accidents and naive edits only; "
                "anyone able to write the run dir could have rewritten both")
    declared = ", ".join(f"{k} {v}" if isinstance(v, str) else k for k, v in (integrity.get("declared") or {}).items())
    return f"the trail is signed ({declared}) but no key was given: pass audit.public_key=<the owner's public key>"


def integrity_notes(integrity: Mapping[str, Any]) -> list[str]:
    """Notes for report.json: a broken trail, integrity not established, checkpoints the trail never recorded."""
    notes = []
    if integrity.get("status") == "broken":
        notes.append("INTEGRITY BROKEN: " + "; ".join(integrity["problems"] or ["signature does not verify"]))
    elif integrity.get("status") != "verified":
        notes.append(f"integrity NOT established: {_not_established(integrity)}")
    if integrity.get("unrecorded_checkpoints"):
        notes.append("checkpoints not in the audit trail (written by an interrupted attempt, never resumed from): "
                     + ", ".join(integrity["unrecorded_checkpoints"]))
    return notes


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
    figures = {"roc": plot_rocs(curves, None), "scores": plot_score_histograms(curves, None)} if curves else {}
    for name, fig in figures.items():
        save_figure(fig, out_dir / f"{name}.png")
        monitor.figure(f"audit/{name}", fig, 0)
    monitor.scalars(tensorboard_scalars(report), 0)
    monitor.close()
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return out_dir / "report.md"
