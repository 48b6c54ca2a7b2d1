"""The validation share: carved by key hash, disjoint from every split, never read by training or the audit;
what tuning scores runs on (launch/validate.py, run.validate) and how launch/tune.py chooses among them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import prep_cfg
from train_helpers import ENV, REPO, load_npz, run_train

from amint_dist.audit.pareto import Candidate, pareto_front, points, select, select_relaxed, tuning_table
from amint_dist.data.config import FRACTIONS
from amint_dist.data.prepare import prepare_dataset
from amint_dist.data.splits import SPLITS, TRAINING_SPLITS

OLD_FRACTIONS = {"members": 0.4, "probe": 0.1, "external": 0.25, "heldout": 0.25}  # before the validation share


def keys(root: Path, split: str) -> list[str]:
    return (root / split / "keys.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    """Digits with the default fractions (validation share included), 32 samples per shard."""
    root = tmp_path_factory.mktemp("val") / "root"
    prepare_dataset(prep_cfg("digits", root, fractions=FRACTIONS, shard_maxcount=32, prepare_workers=2))
    return root


def test_validation_share_is_disjoint_stable_and_leaves_training_splits_as_they_were(val_root, tmp_path):
    manifest = json.loads((val_root / "splits.json").read_text())
    assert manifest["fractions"]["validation"] == pytest.approx(0.10) and manifest["counts"]["validation"] > 120
    by_split = {s: set(keys(val_root, s)) for s in SPLITS}
    assert sum(len(k) for k in by_split.values()) == len(set().union(*by_split.values())) == 1797
    again = tmp_path / "again"
    prepare_dataset(prep_cfg("digits", again, fractions=FRACTIONS, shard_maxcount=32))
    assert keys(again, "validation") == keys(val_root, "validation")  # stable under re-prepare
    old = tmp_path / "old"
    prepare_dataset(prep_cfg("digits", old, fractions=OLD_FRACTIONS, shard_maxcount=32))
    for split in TRAINING_SPLITS:  # carved from heldout's hash range: training reads the very same samples
        assert keys(old, split) == keys(val_root, split), split
    assert set(keys(old, "heldout")) == by_split["heldout"] | by_split["validation"]


def validate(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "validate.py"), f"run.dir={run_dir}",
                           "audit.workers=0", "audit.n_boot=50", *overrides],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)


def test_training_and_the_audit_never_read_validation_and_tuning_scores_only_it(val_root, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(sweep / "active", val_root, "train.max_steps=12", "run.validate=true")
    audit = subprocess.run([sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={sweep / 'active'}",
                            "audit.n_boot=50", "audit.passive.epochs=1", "audit.workers=0"],
                           cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert audit.returncode == 0, audit.stderr[-3000:]
    ledger = load_npz(sweep / "active" / "ledger.npz")
    assert ledger["validation"].size and not ledger["validation"].any()  # training never consumed one
    assert ledger["members"].any()
    report = json.loads((sweep / "active" / "audit" / "report.json").read_text())
    assert "validation" not in report["scored"]
    with np.load(sweep / "active" / "audit" / "scores.npz", allow_pickle=False) as scores:
        splits = {str(v) for name in scores.files if name.endswith("/split") for v in scores[name]}
    assert splits and "validation" not in splits
    figures = json.loads((sweep / "active" / "validation.json").read_text())
    manifest = json.loads((val_root / "splits.json").read_text())
    assert figures["n_validation"] == manifest["counts"]["validation"]
    assert figures["n_members"] == int((ledger["members"] > 0).sum())
    assert 0.0 <= figures["mint"]["amint"]["auc"]["value"] <= 1.0 and figures["task_accuracy"]["value"] is not None

    run_train(sweep / "off", val_root, "train.max_steps=12", "mint.mode=off")
    assert validate(sweep / "off").returncode == 0
    out = subprocess.run([sys.executable, str(REPO / "launch" / "tune.py"), str(sweep)], cwd=REPO,
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    table = json.loads((sweep / "tuning.json").read_text())
    assert {c["run"] for c in table["candidates"]} == {"active", "off"}
    active = next(c for c in table["candidates"] if c["run"] == "active")
    assert active["auc"] == figures["mint"]["amint"]["auc"]["value"]  # the table's figures are validation's
    assert "train.max_steps=12" in active["overrides"] and not any(o.startswith("run.dir=") for o in active["overrides"])
    off = next(c for c in table["candidates"] if c["mint_mode"] == "off")
    assert table["task_accuracy_floor"] == pytest.approx(off["task_accuracy"] - table["task_drop_used"])
    assert table["task_drop_used"] >= table["task_drop_allowed"] == 0.01 and table["chosen"] is not None


def test_validate_refuses_a_root_without_a_validation_share(train_root, tmp_path):
    run_train(tmp_path / "run", train_root, "train.max_steps=2")
    proc = validate(tmp_path / "run")
    assert proc.returncode != 0
    assert "has no validation share" in proc.stderr.strip().splitlines()[-1]


def test_tuning_refuses_figures_of_other_weights(val_root, tmp_path):
    run_train(tmp_path / "run", val_root, "train.max_steps=2", "run.validate=true")
    figures = json.loads((tmp_path / "run" / "validation.json").read_text())
    (tmp_path / "run" / "validation.json").write_text(json.dumps({**figures, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="scored other weights"):
        tuning_table(tmp_path)


def cand(run: str, mode: str, task: float, tpr: float | None, auc: float | None, seconds: float = 100.0,
         overrides: tuple[str, ...] = ()) -> Candidate:
    return Candidate(run, list(overrides), mode, task, auc, tpr, None, seconds)


def test_selection_rule_holds_the_task_floor_and_breaks_ties_by_auc():
    runs = [cand("off", "off", 0.97, None, None), cand("strong_but_costly", "active", 0.94, 0.40, 0.97),
            cand("a", "active", 0.961, 0.20, 0.90), cand("b", "active", 0.962, 0.20, 0.92),
            cand("weak", "active", 0.97, 0.05, 0.80)]
    chosen, floor = select(runs, max_task_drop=0.01)
    assert floor == pytest.approx(0.96) and chosen.run == "b"
    assert select(runs, max_task_drop=0.05)[0].run == "strong_but_costly"
    assert select([cand("x", "active", 0.5, 0.1, 0.6), cand("off", "off", 0.97, None, None)], 0.01)[0] is None
    assert set(pareto_front(runs)) == {"strong_but_costly", "b", "weak"}  # "a" is beaten by "b" on every axis


def test_runs_differing_only_in_the_training_seed_are_one_point_scored_by_their_means():
    runs = [cand("off_s0", "off", 0.98, None, None, overrides=("mint.mode=off", "train.seed=0")),
            cand("off_s1", "off", 0.96, None, None, overrides=("mint.mode=off", "train.seed=1")),
            cand("lean_s0", "active", 0.95, 0.10, 0.88, 90, ("mint.head.channels=16", "train.seed=0")),
            cand("lean_s1", "active", 0.97, 0.30, 0.90, 110, ("mint.head.channels=16", "train.seed=1")),
            cand("base", "active", 0.96, 0.05, 0.86)]
    by_name = {p.run: p for p in points(runs)}
    assert set(by_name) == {"mint.mode=off", "mint.head.channels=16", "(default)"}
    lean = by_name["mint.head.channels=16"]
    assert lean.runs == ("lean_s0", "lean_s1") and lean.task_accuracy == pytest.approx(0.96)
    assert (lean.tpr_at_1pct_fpr, lean.auc, lean.train_seconds) == pytest.approx((0.20, 0.89, 100))
    assert by_name["mint.mode=off"].task_accuracy == pytest.approx(0.97)  # the off point's mean sets the floor
    chosen, floor, used = select_relaxed(points(runs), 0.01)
    assert chosen.run == "mint.head.channels=16" and floor == pytest.approx(0.96) and used == 0.01


def test_the_task_constraint_gives_way_in_one_point_steps_when_no_amint_point_meets_it():
    runs = [cand("off", "off", 0.975, None, None), cand("costly", "active", 0.93, 0.30, 0.90),
            cand("cheaper", "active", 0.95, 0.02, 0.85), cand("worst", "active", 0.90, 0.50, 0.95)]
    chosen, floor, used = select_relaxed(runs, 0.01)
    assert chosen.run == "cheaper" and used == pytest.approx(0.03) and floor == pytest.approx(0.945)
    assert select_relaxed([cand("off", "off", 0.97, None, None)], 0.01)[0] is None  # no aMINT point at all
