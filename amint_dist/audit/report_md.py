"""report.md: the verdict (suspect set) and the integrity line first, how to read the report, per protocol the
fixed-FPR table, then every metric, the suspect set's details and the notes. Every number is report.json's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amint_dist.audit.fixed_fpr import fixed_fpr_markdown
from amint_dist.audit.baselines import BASELINES
from amint_dist.audit.suspect import suspect_markdown, suspect_verdict

TABLE_METRICS = {"auc": "AUC", "balanced_accuracy": "bal. acc", "tpr_at_1pct_fpr": "TPR@1%FPR"}
PER_SAMPLE_FPR = 0.01  # the FPR "How to read this report" quotes
LEAD_METHODS = ("amint", "passive")  # the score it quotes: the first one present


def _cell(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} [{lo:.2f}, {hi:.2f}]"



def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md (see the module docstring)."""
    protocols, suspect = report["protocols"], report.get("suspect")
    lines = [f"# aMINT audit of {_audited(report['audited'])}", ""]
    lines += [suspect_verdict(suspect), ""] if suspect else []
    lines += [integrity_line(report.get("integrity") or {}), ""]
    lines += [weights_line(report["audited"]["weights"]), ""] if report["audited"].get("run_dir") else []
    shift = report.get("distribution_shift") or []  # the blind baseline reads above chance: say so before any table
    lines += [*(f"**{warning}**" for warning in shift), ""] if shift else []
    lines += [_task_line(report), ""]
    lines += how_to_read(report)
    lines += ["## Per-sample evidence: TPR at fixed FPR", ""]
    for name, protocol in protocols.items():
        lines += [f"### `{name}`: {protocol['description']}", ""]
        lines += fixed_fpr_markdown(name, protocol.get("fixed_fpr") or {}) or ["Not measurable (one class only).", ""]
    lines += _metrics_table(protocols)
    lines += suspect_markdown(suspect) if suspect else []
    lines += privacy_cost_markdown(report["privacy_cost"]) if report.get("privacy_cost") else []
    lines += ["## Notes", "", *(f"- {note}" for note in report["notes"])]
    return "\n".join(lines) + "\n"


def weights_line(weights: Mapping[str, Any]) -> str:
    """Which of a run's weights were scored (``audit.weights``)."""
    ema = weights.get("ema")
    kind = f"EMA weights (decay {ema['decay']})" if weights["scored"] == "ema" and ema else "final weights"
    return f"Weights scored: **{weights['scored']}** (`{weights['file']}`, the run's {kind})."


def _audited(audited: Mapping[str, Any]) -> str:
    if audited.get("run_dir"):
        return f"`{audited['run_dir']}`"
    return f"model file `{audited['weights_file']}` (sha256 {audited['model']['weights_sha256']})"


def _task_line(report: Mapping[str, Any]) -> str:
    settings = report["settings"]
    return (f"Task accuracy on heldout: **{_cell(report['task']['accuracy'])}** (n={report['task']['n']}). "
            f"Members: {report['members_rule']}. Thresholds chosen on a {settings['calibration_fraction']:.0%} "
            "calibration share (by key hash), never on evaluation samples; metric intervals from "
            f"{settings['n_boot']} stratified bootstrap resamples, TPR/FPR intervals exact (Clopper-Pearson).")


def _metrics_table(protocols: Mapping[str, dict]) -> list[str]:
    """Every method x (protocol, metric) with its 95% interval, and the evaluation counts."""
    columns = [(p, m) for p in protocols for m in TABLE_METRICS if m != "tpr_at_1pct_fpr" or p == "seen"]
    methods = list(dict.fromkeys(m for p in protocols.values() for m in p["methods"]))
    lines = ["## All metrics (95% bootstrap intervals)", "",
             "| method | " + " | ".join(f"{p} {TABLE_METRICS[m]}" for p, m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = [_cell(protocols[p]["methods"].get(method, {}).get(m)) for p, m in columns]
        lines.append(f"| {f'**{method}**' if method == 'amint' else method} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{p} {v['n_members']}/{v['n_nonmembers']}" for p, v in protocols.items())
    return lines + ["", f"Evaluation members/non-members: {counts}.", ""]


def _lead_at(protocol: Mapping[str, Any], fpr: float) -> tuple[str, dict] | None:
    """The lead MINT head (``amint``, else ``passive``, else the first method) and its fixed-FPR row at ``fpr``
    (the head the verdict uses, not the best on these samples: no selection on evaluation data)."""
    table = protocol.get("fixed_fpr") or {}
    lead = next((m for m in LEAD_METHODS if m in table), next(iter(table), None))
    row = next((r for r in table.get(lead, []) if r["fpr"] == fpr), None)
    return (lead, row) if row and row["tpr"] is not None else None


def how_to_read(report: Mapping[str, Any]) -> list[str]:
    """Plain words for non-experts, with this report's own numbers: per-sample vs set-level evidence, the null
    check, what a fixed FPR can resolve, what integrity means."""
    protocols, suspect = report["protocols"], report.get("suspect")
    name = "seen" if "seen" in protocols else next(iter(protocols), None)
    lead = _lead_at(protocols[name], PER_SAMPLE_FPR) if name else None
    here = (f" Here on `{name}` the {lead[0]} score catches {lead[1]['tpr']:.1%} of members while wrongly "
            f"flagging {lead[1]['evaluation_fpr']:.1%} of non-members (target {PER_SAMPLE_FPR:.0%}: "
            f"{lead[1]['nonmembers_at_fpr']:.3g} of {lead[1]['n_nonmembers']})." if lead else "")
    tested = suspect["methods"].get(suspect["verdict_method"]) if suspect and suspect.get("verdict_method") else None
    set_level = (f" Here the {suspect['n']} suspect images give p = {tested['p_value']:.2g} "
                 f"({suspect['verdict_method']}): both facts are true at once." if tested else
                 " Pass audit.suspect=PATH to ask it of a set of images.")
    per_sample = ("- **Per-sample evidence** (the fixed-FPR tables): can *one* image be called a member? TPR at a "
                  "fixed FPR is the share of members caught while that share of non-members is wrongly flagged; "
                  f"small values are normal, since one image leaves a weak trace in a model.{here}")
    set_level = ("- **Set-level evidence** (the suspect test): was this *set* used? It pools every image, so a weak "
                 "per-sample signal still gives a tiny p-value over a few hundred images. A small p-value says the "
                 "set as a whole scores above known non-members, not which images were used; 'no evidence' is not "
                 f"proof of non-use (a weak method has little power).{set_level}")
    null = ("- **Check `null` first**: two halves of the same non-member split; every AUC interval must contain "
            "0.5, otherwise the split leaks and no other number can be trusted.")
    resolution = ("- **Resolution**: with n non-members an FPR below 1/n cannot be measured (FPR 1e-4 needs 10,000 "
                  "non-members): such columns mean 'no false positive at all'. The intervals are wide on small sets.")
    integrity = ("- **Integrity**: 'verified' means the owner's signed trail matches every file audited; 'NOT "
                 "established' means the numbers describe these files, but nothing shows they are the ones the "
                 "model was trained with, nor which data training consumed.")
    return ["## How to read this report", "", per_sample, set_level, null, resolution, integrity, ""]


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


def privacy_cost_markdown(section: Mapping) -> list[str]:
    """report.md's table: each population attack's AUC on the audited vs the plain model."""
    protocols = section["protocols"]
    lines = ["## Privacy cost for the owner: population attacks, aMINT model vs plain model", "",
             f"Plain model: `{section['plain_run']}` (mint.mode=off, same root; integrity {section['integrity']}).",
             "", "| attack | " + " | ".join(f"{p} aMINT model | {p} plain model" for p in protocols) + " |",
             "|---|" + "---|---|" * len(protocols)]
    for method in BASELINES:
        cells = [_cell(protocols[p][method][side]) for p in protocols for side in ("audited", "plain")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]
