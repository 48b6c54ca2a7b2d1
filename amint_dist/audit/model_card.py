"""``RUN/MODEL_CARD.md``: a Hugging Face style model card (YAML front matter, then sections) of a run.

It records what an auditor starts from: the dataset split's digest (splits.json sha256), the exposure ledger's
(ledger.npz sha256), the weights' and the starting weights' sha256, who signed the audit trail (the Ed25519
fingerprint its start entry declares, else ``unsigned``), the recipe, and, once audited, the verdict and headline
figures of ``audit/report.json`` with their 95% intervals, and the commands that re-run the audit. Training writes
it without audit figures; the audit rewrites it after its report. The card states what the run's files say:
it proves nothing by itself (the audit verifies them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from amint_dist.io import atomic_write_text, read_json, sha256_file
from amint_dist.records.signing import ED25519, Verifier
from amint_dist.records.trail import TRAIL_NAME, read_chain

CARD_NAME = "MODEL_CARD.md"
RECIPE_KEYS = {  # the config keys a card shows, by section
    "mint": ("mode", "taps", "head", "weight", "task_weight", "normalize", "external_ratio", "member_shift"),
    "optim": ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad"),
    "train": ("epochs", "max_steps", "batch_size", "grad_accum", "precision", "label_smoothing", "seed"),
}


def write_model_card(run_dir: Path, report: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/MODEL_CARD.md`` atomically (with the audit's ``report`` figures when given); return it."""
    run_dir = Path(run_dir)
    model_config = read_json(run_dir / "model_config.json", what="model config")
    config_path = run_dir / "config.yaml"
    run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True) if config_path.is_file() else {}
    facts = _facts(run_dir, model_config, run_config, report)
    front = yaml.safe_dump(facts, sort_keys=False, default_flow_style=False)
    body = _body(run_dir, model_config, run_config, facts, report)
    atomic_write_text(run_dir / CARD_NAME, f"---\n{front}---\n\n{body}")
    return run_dir / CARD_NAME


def signature(run_dir: Path) -> str:
    """The trail's declared signer: ``ed25519 sha256:<fingerprint>``, ``hmac-sha256`` (a shared secret only), or
    ``unsigned`` (also without a trail)."""
    path = run_dir / TRAIL_NAME
    declared = read_chain(path, Verifier()).declared if path.is_file() else {}
    if ED25519 in declared:
        return f"{ED25519} {declared[ED25519]['fingerprint']}"
    return ", ".join(sorted(declared)) or "unsigned"


def _facts(run_dir: Path, model_config: Mapping, run_config: Mapping, report: Mapping | None) -> dict[str, Any]:
    """The front matter: Hugging Face's keys, then this run's digests and audit figures under ``amint``."""
    model, init = model_config["model"], model_config.get("init") or {"from": "not recorded"}
    ledger = run_dir / "ledger.npz"
    amint = {
        "splits_sha256": (model_config.get("dataset") or {}).get("splits_sha256"),
        "ledger_sha256": sha256_file(ledger) if ledger.is_file() else None,
        "weights_sha256": model_config.get("weights_sha256"),
        "signature": signature(run_dir),
        "init": dict(init),
        "audit": _headline(report) if report else None,
    }
    return {"library_name": "timm", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "timm", "amint-dist", "membership-inference", "auditable"],
            "model_name": model["name"], "amint": amint, "dataset": (run_config.get("data") or {}).get("kind")}


def _metric(protocol: Mapping | None, method: str, name: str) -> dict | None:
    metric = ((protocol or {}).get("methods") or {}).get(method, {}).get(name)
    return {"value": metric["value"], "ci95": metric["ci95"]} if metric else None


def _headline(report: Mapping) -> dict[str, Any]:
    """Integrity status, task accuracy, and the aMINT head's figures per protocol (seen AUC and TPR at 1% FPR, unseen
    AUC, null AUC: ~0.5 when nothing leaks), the suspect verdict when one was tested."""
    protocols = report.get("protocols") or {}
    figures = {"integrity": (report.get("integrity") or {}).get("status"),
               "task_accuracy_heldout": {k: report["task"]["accuracy"][k] for k in ("value", "ci95")}
               if (report.get("task") or {}).get("accuracy") else None,
               "seen_auc": _metric(protocols.get("seen"), "amint", "auc"),
               "seen_tpr_at_1pct_fpr": _metric(protocols.get("seen"), "amint", "tpr_at_1pct_fpr"),
               "unseen_auc": _metric(protocols.get("unseen"), "amint", "auc"),
               "null_auc": _metric(protocols.get("null"), "amint", "auc")}
    if report.get("suspect"):
        figures["suspect"] = {"path": report["suspect"].get("path"), "verdict": report["suspect"].get("verdict")}
    return figures


def _figure(metric: Mapping | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} (95% CI {lo:.3f} to {hi:.3f})" if lo is not None else f"{metric['value']:.3f}"


def _rows(items: Mapping[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "".join(f"| `{k}` | `{v}` |\n" for k, v in items.items())


def _body(run_dir: Path, model_config: Mapping, run_config: Mapping, facts: Mapping, report: Mapping | None) -> str:
    amint, model = facts["amint"], model_config["model"]
    init = amint["init"]
    start = {"random": "random initialisation", "not recorded": "weights model_config.json does not record"}.get(
        init["from"]) or f"{init['from']} `{init['file']}` (sha256 `{init['sha256']}`)"
    recipe = {f"model.{k}": v for k, v in model.items() if k not in ("pretrained_file", "checkpoint")}
    for section, keys in RECIPE_KEYS.items():
        recipe.update({f"{section}.{k}": run_config[section][k] for k in keys if k in run_config.get(section, {})})
    signer = amint["signature"]
    if signer.startswith(ED25519):
        command = f"python launch/audit.py run.dir={run_dir.resolve()} audit.public_key=OWNER_PUBLIC_KEY.pem"
        how = (f"OWNER_PUBLIC_KEY.pem is the owner's public key, obtained from the owner (not from this run dir); "
               f"the audit's report prints its fingerprint, which must read `{signer.split()[-1]}`. With it, a trail "
               "that is missing, unsigned, re-signed or altered is refused.")
    else:
        command = f"python launch/audit.py run.dir={run_dir.resolve()}"
        how = (f"The trail is {signer}: anyone able to write the run dir could have rewritten it, so the audit cannot "
               "establish the run's integrity (with an HMAC, only a holder of the shared secret can).")
    parts = [
        f"# {model['name']} with an aMINT audit head\n",
        "A timm classifier trained with amint-dist jointly with a MINT head that reads its intermediate activations "
        "and predicts training-set membership (Active Membership Inference Test): its training data can be audited.\n",
        "## Model\n",
        f"- timm model `{model['name']}`, {model.get('num_classes')} classes, {model.get('in_chans')} x "
        f"{model.get('img_size')} x {model.get('img_size')} input; started from {start}",
        f"- weights `model.safetensors` sha256 `{amint['weights_sha256']}` (backbone and MINT head; "
        "`python launch/export.py run.dir=RUN` writes the backbone as a plain timm file)\n",
        "## Records\n",
        _rows({"splits.json sha256 (the member / non-member split)": amint["splits_sha256"],
               "ledger.npz sha256 (what training consumed)": amint["ledger_sha256"],
               "audit trail signature": signer}),
        "## Training recipe\n",
        _rows(recipe),
        "## Audit\n",
        _audit_section(amint["audit"]),
        "## Re-run the audit\n",
        f"```\n{command}\n```",
        f"{how} Add `data.root=ROOT` when the dataset root moved: its splits.json must hash to the digest above.\n",
    ]
    return "\n".join(parts)


def _audit_section(headline: Mapping | None) -> str:
    if not headline:
        return "Not audited yet: `python launch/audit.py run.dir=RUN` writes `RUN/audit/` and rewrites this card.\n"
    established = "" if headline["integrity"] == "verified" else " (integrity not established)"
    lines = [f"- the run's files against its audit trail: **{headline['integrity']}**{established}",
             f"- task accuracy on heldout: {_figure(headline['task_accuracy_heldout'])}",
             f"- aMINT AUC, `seen` (members vs heldout): {_figure(headline['seen_auc'])}",
             f"- aMINT TPR at 1% FPR, `seen`: {_figure(headline['seen_tpr_at_1pct_fpr'])}",
             f"- aMINT AUC, `unseen` (probe members): {_figure(headline['unseen_auc'])}",
             f"- aMINT AUC, `null` (heldout vs heldout, must read ~0.5): {_figure(headline['null_auc'])}"]
    if headline.get("suspect"):
        lines.append(f"- suspect set `{headline['suspect']['path']}`: **{headline['suspect']['verdict']}**")
    return "\n".join(lines) + "\n\nFull report: `audit/report.md` (`audit/report.json`).\n"
