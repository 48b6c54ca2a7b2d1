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
NOT_RECIPE = ("run.", "data.root=")  # overrides (prefixes) that name places or what runs after training
SEED_KEY = "train.seed"  # runs that differ only in it are one point of the sweep (their figures are averaged)
RULE = ("runs differing only in train.seed form one point, scored by the means of its runs' validation figures; "
        "among aMINT points (mint.mode=active) whose validation task accuracy is at most {drop:.1f} points below "
        "the best mint.mode=off point of the sweep (when it has none: below the best point), the highest validation "
        "aMINT TPR at 1% FPR; ties broken by validation AUC, then by the shorter training. When no aMINT point is "
        "that close, the task constraint gives way in steps of 1 point until one is, and the table says by how much")
RELAX_STEP = 0.01  # task-accuracy allowance added per step when no aMINT point meets the constraint


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
    runs: tuple[str, ...] = ()  # a point's runs (one per train.seed); empty for a single run


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
    overrides = [o for o in (command or {}).get("overrides", []) if not o.startswith(NOT_RECIPE)]
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


def _recipe(c: Candidate) -> tuple[str, ...]:
    return tuple(o for o in c.overrides if o.split("=")[0] != SEED_KEY)


def _mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def points(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per recipe: runs differing only in ``train.seed`` averaged (AUC interval: the runs' range of
    their own intervals' ends, i.e. [min low, max high]); named by the recipe's overrides, or "(default)"."""
    groups: dict[tuple[str, ...], list[Candidate]] = {}
    for c in candidates:
        groups.setdefault((c.mint_mode, *_recipe(c)), []).append(c)
    out = []
    for (mode, *recipe), runs in groups.items():
        cis = [r.auc_ci95 for r in runs]
        ci = None if any(x is None for x in cis) else [min(x[0] for x in cis), max(x[1] for x in cis)]
        out.append(Candidate(" ".join(recipe) or "(default)", list(recipe), mode,
                             _mean([r.task_accuracy for r in runs]), _mean([r.auc for r in runs]),
                             _mean([r.tpr_at_1pct_fpr for r in runs]), ci, _mean([r.train_seconds for r in runs]),
                             tuple(r.run for r in runs)))
    return out


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


def select_relaxed(candidates: Sequence[Candidate], max_task_drop: float) -> tuple[Candidate | None, float, float]:
    """``select``, with the task allowance widened by ``RELAX_STEP`` until an aMINT point qualifies:
    (choice, floor, allowance used); None only when the sweep has no scored aMINT point."""
    if not any(c.mint_mode == "active" and c.tpr_at_1pct_fpr is not None for c in candidates):
        return None, select(candidates, max_task_drop)[1], max_task_drop
    allowance = max_task_drop
    while True:
        chosen, floor = select(candidates, allowance)
        if chosen is not None:
            return chosen, floor, allowance
        allowance = round(allowance + RELAX_STEP, 10)


def tuning_table(sweep: str | Path, max_task_drop: float = 0.01) -> dict:
    """Collect, rank and choose; write ``SWEEP/tuning.json`` and ``SWEEP/tuning.md``; return the json."""
    sweep = Path(sweep)
    candidates = collect(sweep)
    recipes = points(candidates)
    chosen, floor, allowance = select_relaxed(recipes, max_task_drop)
    result = {"format": TUNING_FORMAT, "rule": RULE.format(drop=100 * max_task_drop), "task_accuracy_floor": floor,
              "task_drop_allowed": max_task_drop, "task_drop_used": allowance,
              "chosen": chosen.run if chosen else None, "pareto_front": pareto_front(recipes),
              "points": [asdict(c) for c in recipes], "candidates": [asdict(c) for c in candidates]}
    atomic_write_json(sweep / "tuning.json", result)
    atomic_write_bytes(sweep / "tuning.md", render(result).encode())
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render(result: dict) -> str:
    """tuning.json as a Markdown table (validation figures only)."""
    relaxed = result["task_drop_used"] > result["task_drop_allowed"] + 1e-12
    lines = ["# Tuning table (validation share only)", "", f"Rule: {result['rule']}.", "",
             f"Chosen: **{result['chosen'] or 'none qualifies'}** (task accuracy floor "
             f"{result['task_accuracy_floor']:.3f}" + (f"; no aMINT point within {100 * result['task_drop_allowed']:.1f}"
                                                       f" points: the constraint gave way to "
                                                       f"{100 * result['task_drop_used']:.1f}" if relaxed else "")
             + "); `*` = on the Pareto front.", "", "## Points (means over their runs)", ""]
    lines += _table(result["points"], result["pareto_front"], "point")
    lines += ["", "## Runs", ""] + _table(result["candidates"], [], "run")
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[dict], front: Sequence[str], what: str) -> list[str]:
    lines = [f"| {what} | overrides | mode | runs | val task acc | val aMINT AUC [95% CI] | val TPR@1%FPR | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        ci = f" [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]" if c["auc_ci95"] else ""
        mark = "*" if c["run"] in front else ""
        lines.append(f"| {c['run']}{mark} | {' '.join(c['overrides'])} | {c['mint_mode']} | {len(c['runs']) or 1} | "
                     f"{_fmt(c['task_accuracy'])} | {_fmt(c['auc'])}{ci} | {_fmt(c['tpr_at_1pct_fpr'])} | "
                     f"{_fmt(c['train_seconds'], 0)} |")
    return lines
