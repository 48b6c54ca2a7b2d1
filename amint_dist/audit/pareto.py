"""The tuning table of a sweep: runs compared by their validation figures only (``RUN/validation.json``), the
Pareto front, and a selection rule fixed before any evaluation figure is looked at.

The audit's evaluation data (heldout, probe) never enters: a run without ``validation.json`` is not a
candidate, and the table has no audit figure in it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from amint_dist.audit.validation import read_validation
from amint_dist.io import atomic_write_bytes, atomic_write_json, read_json

TUNING_FORMAT = "amint-dist-tuning/1"
PER_RUN_KEYS = ("run.dir", "data.root")  # overrides that name places, not the recipe
RULE = ("among aMINT runs (mint.mode=active) whose validation task accuracy is at most {drop:.1f} points below "
        "the best mint.mode=off run of the sweep (when it has none: below the best run), the highest validation "
        "aMINT TPR at 1% FPR; ties broken by validation AUC, then by the shorter training")


@dataclass(frozen=True)
class Candidate:
    """One run of the sweep, by its validation figures."""

    run: str
    overrides: list[str]
    mint_mode: str
    task_accuracy: float
    auc: float | None
    tpr_at_1pct_fpr: float | None
    auc_ci95: list[float] | None
    train_seconds: float | None


def _trail_seconds(run_dir: Path) -> float | None:
    """Seconds from the audit trail's first entry to its last (training, including any time it was stopped)."""
    path = run_dir / "audit_trail.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    first, last = (datetime.strptime(json.loads(line)["created"], "%Y-%m-%dT%H:%M:%S%z") for line in (lines[0], lines[-1]))
    return (last - first).total_seconds()


def candidate(run_dir: Path, name: str) -> Candidate:
    """The candidate a run dir with ``validation.json`` describes."""
    figures = read_validation(run_dir)
    provenance = run_dir / "provenance.json"
    command = read_json(provenance, what="provenance").get("command") if provenance.is_file() else None
    overrides = [o for o in (command or {}).get("overrides", []) if o.split("=")[0] not in PER_RUN_KEYS]
    amint = figures["mint"].get("amint") or {}
    metric = lambda key: amint[key]["value"] if key in amint else None  # noqa: E731
    return Candidate(name, list(overrides), figures["mint_mode"], figures["task_accuracy"]["value"],
                     metric("auc"), metric("tpr_at_1pct_fpr"), amint.get("auc", {}).get("ci95"),
                     _trail_seconds(run_dir))


def collect(sweep: Path) -> list[Candidate]:
    """Every run below ``sweep`` (itself included) that has ``validation.json``, in name order."""
    runs = sorted({p.parent for p in Path(sweep).rglob("validation.json")})
    if not runs:
        raise FileNotFoundError(f"no run with validation.json below {sweep} (train with run.validate=true, or "
                                f"python launch/validate.py run.dir=RUN)")
    return [candidate(r, str(r.relative_to(sweep)) or ".") for r in runs]


def _objectives(c: Candidate) -> tuple[float, ...]:
    """Larger is better in every entry."""
    return (c.tpr_at_1pct_fpr or 0.0, c.auc or 0.0, c.task_accuracy, -(c.train_seconds or 0.0))


def pareto_front(candidates: Sequence[Candidate]) -> list[str]:
    """Runs that no other run matches or beats on every objective while beating it on one (aMINT runs only)."""
    active = [c for c in candidates if c.mint_mode == "active"]
    def dominated(c: Candidate) -> bool:
        return any(all(a >= b for a, b in zip(_objectives(o), _objectives(c))) and _objectives(o) != _objectives(c)
                   for o in active)
    return [c.run for c in active if not dominated(c)]


def select(candidates: Sequence[Candidate], max_task_drop: float) -> tuple[Candidate | None, float]:
    """The rule's choice (None when no aMINT run qualifies) and the task accuracy it was held to."""
    off = [c.task_accuracy for c in candidates if c.mint_mode == "off"]
    floor = max(off or [c.task_accuracy for c in candidates]) - max_task_drop
    eligible = [c for c in candidates if c.mint_mode == "active" and c.tpr_at_1pct_fpr is not None
                and c.task_accuracy >= floor - 1e-12]
    best = max(eligible, key=lambda c: (c.tpr_at_1pct_fpr, c.auc, -(c.train_seconds or 0.0)), default=None)
    return best, floor


def tuning_table(sweep: str | Path, max_task_drop: float = 0.01) -> dict:
    """Collect, rank and choose; write ``SWEEP/tuning.json`` and ``SWEEP/tuning.md``; return the json."""
    sweep = Path(sweep)
    candidates = collect(sweep)
    chosen, floor = select(candidates, max_task_drop)
    result = {"format": TUNING_FORMAT, "rule": RULE.format(drop=100 * max_task_drop), "task_accuracy_floor": floor,
              "chosen": chosen.run if chosen else None, "pareto_front": pareto_front(candidates),
              "candidates": [asdict(c) for c in candidates]}
    atomic_write_json(sweep / "tuning.json", result)
    atomic_write_bytes(sweep / "tuning.md", render(result).encode())
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render(result: dict) -> str:
    """tuning.json as a Markdown table (validation figures only)."""
    lines = ["# Tuning table (validation share only)", "", f"Rule: {result['rule']}.", "",
             f"Chosen: **{result['chosen'] or 'none qualifies'}** (task accuracy floor "
             f"{result['task_accuracy_floor']:.3f}); `*` = on the Pareto front.", "",
             "| run | overrides | mode | val task acc | val aMINT AUC [95% CI] | val TPR@1%FPR | train s |",
             "|---|---|---|---|---|---|---|"]
    for c in result["candidates"]:
        ci = f" [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]" if c["auc_ci95"] else ""
        mark = "*" if c["run"] in result["pareto_front"] else ""
        lines.append(f"| {c['run']}{mark} | {' '.join(c['overrides'])} | {c['mint_mode']} | "
                     f"{_fmt(c['task_accuracy'])} | {_fmt(c['auc'])}{ci} | {_fmt(c['tpr_at_1pct_fpr'])} | "
                     f"{_fmt(c['train_seconds'], 0)} |")
    return "\n".join(lines) + "\n"
