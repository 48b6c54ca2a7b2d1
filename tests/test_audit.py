"""Audit: protocols on synthetic scores; on one real tiny run: report contract, recomputable scores,
null protocol at chance, tampering refused with the file named, a model trained elsewhere, ranks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amint_dist.audit.metrics import balanced_accuracy_at, choose_threshold
from amint_dist.audit.protocols import build_protocol
from amint_dist.audit.run import audit_config, run_audit
from amint_dist.records.artifacts import TamperedError
from amint_dist.records.ledger import ExposureLedger
from train_helpers import REPO, run_train

METHODS = ["amint", "passive", "loss", "confidence", "entropy", "modified_entropy", "blind"]
METRICS = ["balanced_accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"]
PROTOCOLS = ["seen", "unseen", "null"]
RUN_FILES = ("model.safetensors", "model_config.json", "config.yaml", "ledger.npz")
QUICK = {"protocols": ["seen"], "batch_size": 128, "workers": 0, "n_boot": 20,  # over configs/audit.yaml
         "passive": {"enabled": False, "epochs": 1, "lr": 1e-3, "batch_size": 64}}


# ---- protocols on synthetic scored splits (no model) ----

def scored_split(prefix: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"key": np.array([f"{prefix}{i:04d}" for i in range(n)]), "index": np.arange(n),
            "label": rng.integers(0, 10, n), "correct": rng.random(n) < 0.5, "score": rng.random(n)}


def synthetic(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: scored_split(s[0], n, rng) for s, n in (("members", 300), ("probe", 80), ("heldout", 200))}


def permuted(scored: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {s: {c: v[order] for c, v in cols.items()} for s, cols in scored.items()
            for order in [rng.permutation(cols["key"].size)]}


def test_protocols_follow_ledger_balance_and_calibrate_by_key():
    scored = synthetic()
    ledger = ExposureLedger({"members": 300, "probe": 80, "external": 1, "heldout": 200})
    ledger.counts["members"][:] = 1
    ledger.counts["members"][:7] = 0  # never consumed: excluded from members
    ledger.counts["probe"][:] = 2
    ledger.counts["heldout"][5] = 1  # consumed heldout: not a clean non-member
    out = {p: build_protocol(p, scored, ledger, ["score"], 0, 0.25) for p in PROTOCOLS}
    seen = out["seen"]
    assert seen.counts["members_excluded_not_consumed"] == 7
    assert seen.counts["nonmembers_excluded_consumed"] == 1
    all_keys = {p: set(s.evaluation["key"]) | set(s.calibration["key"]) for p, s in out.items()}
    assert not {f"m{i:04d}" for i in range(7)} & all_keys["seen"]
    assert "h0005" not in all_keys["seen"] | all_keys["unseen"] | all_keys["null"]
    for p, s in out.items():
        labels = s.evaluation["label"]
        assert (labels == 1).sum() == (labels == 0).sum() == s.counts["n_members"] > 10, p
        assert not set(s.evaluation["key"]) & set(s.calibration["key"]), p
        assert 0.15 < s.calibration["key"].size / (s.calibration["key"].size + s.counts["n_members"] * 2 +
                                                   sum(s.counts["balancing_dropped"].values())) < 0.35, p
    # heldout keys calibrate in every protocol or in none: no evaluation sample of one is calibration in another
    calibrating = set().union(*(s.calibration["key"] for s in out.values()))
    evaluating = set().union(*(s.evaluation["key"] for s in out.values()))
    assert not calibrating & evaluating
    null = out["null"]
    members = set(null.evaluation["key"][null.evaluation["label"] == 1])
    assert members and not members & set(null.evaluation["key"][null.evaluation["label"] == 0])
    assert set(null.evaluation["split"]) == {"heldout"}


def test_protocols_are_independent_of_row_order_and_need_no_ledger():
    scored = synthetic(1)
    a = build_protocol("unseen", scored, None, ["score"], 3, 0.2)
    b = build_protocol("unseen", permuted(scored, 2), None, ["score"], 3, 0.2)
    for part in ("evaluation", "calibration"):
        order_a, order_b = np.argsort(getattr(a, part)["key"]), np.argsort(getattr(b, part)["key"])
        for column in ("key", "label", "score"):
            np.testing.assert_array_equal(getattr(a, part)[column][order_a], getattr(b, part)[column][order_b])
    assert "members_excluded_not_consumed" in a.counts and a.counts["members_excluded_not_consumed"] == 0
    other_seed = build_protocol("unseen", scored, None, ["score"], 4, 0.2)
    assert set(other_seed.calibration["key"]) != set(a.calibration["key"])


# ---- one real tiny run, trained and audited by the main job ----

@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, train_root) -> tuple[Path, str]:
    """Two epochs of the tiny model; launch/train.py audits it (run.audit=true, configs/audit.yaml defaults)."""
    run_dir = tmp_path_factory.mktemp("audit_runs") / "run"
    proc = run_train(run_dir, train_root, "train.epochs=2", "run.audit=true")
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def report(audited_run) -> dict:
    return json.loads((audited_run[0] / "audit" / "report.json").read_text())


@pytest.fixture(scope="module")
def scores(audited_run):
    with np.load(audited_run[0] / "audit" / "scores.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def copy_run(run_dir: Path, dest: Path, files=RUN_FILES) -> Path:
    dest.mkdir(parents=True)
    for name in files:
        shutil.copy2(run_dir / name, dest / name)
    return dest


def audit_cfg(run_dir: Path, data_root: Path | None = None, **audit) -> dict:
    cfg = audit_config(REPO / "configs", run_dir)
    cfg["data"]["root"] = str(data_root) if data_root else None
    cfg["audit"].update({**QUICK, **audit})
    return cfg


def test_main_job_prints_the_report_path(audited_run):
    run_dir, stdout = audited_run
    assert f"audit report: {run_dir / 'audit' / 'report.md'}" in stdout


def test_report_md_opens_with_integrity_then_how_to_read_then_per_protocol_tables(audited_run, report):
    text = (audited_run[0] / "audit" / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# aMINT audit of ") and lines[2].startswith("Integrity: **NOT established**")
    sections = [line for line in lines if line.startswith("## ") or line.startswith("### ")]
    assert sections == ["## How to read this report", "## Per-sample evidence: TPR at fixed FPR",
                        *(f"### `{p}`: {report['protocols'][p]['description']}" for p in PROTOCOLS),
                        "## All metrics (95% bootstrap intervals)", "## Notes"]
    how_to_read = text.split("## How to read this report")[1].split("## Per-sample")[0]
    row = report["protocols"]["seen"]["fixed_fpr"]["amint"][3]  # FPR 0.01: the per-sample figure quoted
    assert f"on `seen` the amint score catches {row['tpr']:.1%} of members" in how_to_read
    assert "Set-level evidence" in how_to_read and "audit.suspect=PATH" in how_to_read
    for p in PROTOCOLS:
        section = text.split(f"### `{p}`")[1].split("###")[0].split("## All metrics")[0]
        n = report["protocols"][p]["n_nonmembers"]
        assert f"FPR 0.01 (= {0.01 * n:.3g} of {n} non-members)" in section, p
        assert section.count("\n| ") == 1 + len(METHODS), p
        for method, rows in report["protocols"][p]["fixed_fpr"].items():  # every cell is report.json's
            cells = [f"{r['tpr']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], FPR {r['evaluation_fpr']:.3f}"
                     for r in rows]
            assert f"| {method} | " + " | ".join(cells) + " |" in section, (p, method)
    table = text.split("## All metrics")[1].split("## Notes")[0]
    assert table.count("\n| ") == 1 + len(METHODS) and "| **amint** |" in table


def test_report_and_run_dir_carry_provenance(audited_run, report):
    run_dir, stdout = audited_run
    assert stdout.count("run finished:") == 1
    trained = json.loads((run_dir / "provenance.json").read_text())
    audited = report["provenance"]  # the audit's own: here the same command, a later time
    for prov in (trained, audited):
        assert prov["command"]["entry_point"] == "train" and "run.audit=true" in prov["command"]["overrides"]
        assert prov["versions"]["timm"] and prov["versions"]["accelerate"] and prov["host"]
    assert audited["git"] == trained["git"] and audited["time"] >= trained["time"]


def test_report_follows_the_contract(report, train_root):
    assert report["format"] == "amint-dist-audit/1" and report["ledger"] is True
    assert 0 <= report["task"]["accuracy"]["value"] <= 1 and report["task"]["n"] == report["scored"]["heldout"]["n"]
    counts = json.loads((train_root / "splits.json").read_text())["counts"]
    assert {s: v["n"] for s, v in report["scored"].items()} == {s: counts[s] for s in ("members", "probe", "heldout")}
    assert list(report["protocols"]) == PROTOCOLS
    for name, protocol in report["protocols"].items():
        assert protocol["n_members"] == protocol["n_nonmembers"] > 20, name
        assert list(protocol["methods"]) == METHODS, name
        for method, metrics in protocol["methods"].items():
            assert list(metrics) == (["accuracy"] if method in ("amint", "passive") else []) + METRICS
            for metric in metrics.values():
                assert set(metric) == {"value", "ci95"}
                lo, hi = metric["ci95"]
                assert 0 <= lo <= hi <= 1 and 0 <= metric["value"] <= 1
    for name, protocol in report["protocols"].items():  # TPR at FPR 0 .. 0.1, exact intervals
        rows = protocol["fixed_fpr"]["amint"]
        assert [r["fpr"] for r in rows] == [0.0, 1e-4, 1e-3, 1e-2, 0.1], name
        assert all(r["ci95"][0] <= r["tpr"] <= r["ci95"][1] for r in rows) and rows[0]["tpr"] <= rows[-1]["tpr"]
        assert rows[1]["false_positives_allowed"] == 0 < rows[-1]["false_positives_allowed"]
        assert {r["threshold_from"] for r in rows} == {"calibration"}
        assert {r["n_threshold_nonmembers"] for r in rows} == {protocol["n_calibration_nonmembers"]}
    assert report["protocols"]["seen"]["members_excluded_not_consumed"] == 0  # two epochs consume every member
    assert len(report["passive_training"]) == 10 and report["settings"]["n_boot"] == 1000


def test_scores_npz_recomputes_the_report(report, scores, train_root):
    for name, protocol in report["protocols"].items():
        labels, keys, splits = scores[f"{name}/label"], scores[f"{name}/key"], scores[f"{name}/split"]
        assert labels.sum() == protocol["n_members"] and (labels == 0).sum() == protocol["n_nonmembers"]
        assert len(set(keys)) == keys.size
        for split in set(splits):
            assert set(keys[splits == split]) <= set((train_root / split / "keys.txt").read_text().split())
        calibration = {c: scores[f"calibration/{name}/{c}"] for c in ("key", "label")}
        assert not set(calibration["key"]) & set(keys)
        for method in METHODS:
            auc = roc_auc_score(labels, scores[f"{name}/{method}"])
            assert auc == pytest.approx(protocol["methods"][method]["auc"]["value"], abs=1e-9)
            threshold = choose_threshold(calibration["label"], scores[f"calibration/{name}/{method}"])
            assert threshold == protocol["thresholds"][method]
            balanced = balanced_accuracy_at(labels, scores[f"{name}/{method}"], threshold)
            assert balanced == pytest.approx(protocol["methods"][method]["balanced_accuracy"]["value"], abs=1e-12)
    assert set(scores["seen/split"]) == {"members", "heldout"} and set(scores["unseen/split"]) == {"probe", "heldout"}


def test_fixed_fpr_tables_recompute_from_scores_npz(report, scores):
    """Thresholds from the calibration non-members only; TPR and FPR counted on the evaluation samples."""
    for name, protocol in report["protocols"].items():
        labels = scores[f"{name}/label"]
        calibration_nonmember = scores[f"calibration/{name}/label"] == 0
        for method, rows in protocol["fixed_fpr"].items():
            evaluated = scores[f"{name}/{method}"]
            ranked = np.sort(scores[f"calibration/{name}/{method}"][calibration_nonmember])[::-1]
            for row in rows:
                allowed = math.floor(row["fpr"] * ranked.size + 1e-9)
                # flagged: above the (allowed + 1)-th highest calibration non-member (all when that many are allowed)
                flagged = evaluated > ranked[allowed] if allowed < ranked.size else np.ones(evaluated.size, bool)
                assert int(np.sum(ranked >= row["threshold"])) <= allowed == row["false_positives_allowed"]
                hits, false_positives = int(np.sum(flagged & (labels == 1))), int(np.sum(flagged & (labels == 0)))
                n_members, n_nonmembers = int(labels.sum()), int((labels == 0).sum())
                assert (row["true_positives"], row["false_positives"]) == (hits, false_positives), (name, method)
                assert row["tpr"] == hits / n_members and row["evaluation_fpr"] == false_positives / n_nonmembers
                for (k, n), ci in (((hits, n_members), row["ci95"]), ((false_positives, n_nonmembers),
                                                                     row["evaluation_fpr_ci95"])):
                    exact = binomtest(k, n).proportion_ci(0.95, method="exact")
                    assert ci == pytest.approx([exact.low, exact.high], abs=1e-12)
                assert row["nonmembers_at_fpr"] == pytest.approx(row["fpr"] * n_nonmembers)


def test_null_protocol_reads_chance(report):
    null = report["protocols"]["null"]["methods"]
    for metric in ("auc", "balanced_accuracy"):
        lo, hi = null["amint"][metric]["ci95"]
        assert lo <= 0.5 <= hi, metric
    for method, metrics in null.items():
        assert 0.35 < metrics["auc"]["value"] < 0.65, method


def test_null_halvings_script_re_halves_the_reports_heldout_scores(audited_run, report):
    """scripts/null_halvings.py: halving seed 0 over all heldout rows (calibration included) and its spread."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "null_halvings.py"), str(audited_run[0] / "audit"),
                          "--seeds", "5"], capture_output=True, text=True, cwd=REPO, timeout=120, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == set(report["protocols"]["seen"]["methods"])
    mean = float(lines["amint"].split("mean ")[1].split()[0])
    assert 0.35 < mean < 0.65 and out.startswith(f"{report['scored']['heldout']['n']} heldout samples, 5 halvings")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roc_compare_script_plots_the_reports_evaluation_rows(audited_run, report, tmp_path):
    """scripts/roc_compare.py: each curve is the protocol's evaluation rows (its AUC = the report's), one PNG; a
    missing column is one error line naming the curve."""
    audit_dir = audited_run[0] / "audit"
    module = load_script("roc_compare")
    for method in ("amint", "loss"):
        labels, scores = module.evaluation_scores(method, str(audit_dir), f"seen/{method}")
        seen = report["protocols"]["seen"]
        assert (labels.sum(), (~labels).sum()) == (seen["n_members"], seen["n_nonmembers"])
        assert roc_auc_score(labels, scores) == pytest.approx(report["protocols"]["seen"]["methods"][method]["auc"]["value"])
    script = [sys.executable, str(REPO / "scripts" / "roc_compare.py"), "--out", str(tmp_path / "c.png")]
    curves = ["--curve", "a, K=8", str(audit_dir), "seen/amint", "--curve", "b", str(audit_dir), "null/amint"]
    subprocess.run(script + curves, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    bad = subprocess.run(script + ["--curve", "x", str(audit_dir), "seen/lira_online"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip() == f"error: curve 'x': {audit_dir / 'scores.npz'} has no column seen/lira_online"


def test_lookalikes_script_measures_nearest_member_distances_and_their_rank_correlation(audited_run, report,
                                                                                        train_root, tmp_path):
    """scripts/lookalikes.py: nearest-member distances equal a brute-force loop (a member's own copy excluded);
    on the real audit it counts the report's evaluation rows; scores planted as closeness give Spearman 1."""
    lookalikes = load_script("lookalikes")
    member_keys, members = lookalikes.split_pixels(train_root, "members")
    heldout_keys, heldout = lookalikes.split_pixels(train_root, "heldout")
    for keys, rows in ((heldout_keys[:15], heldout[:15]), (member_keys[:15], members[:15])):
        got = lookalikes.nearest_member_distance(rows, keys, members, member_keys)
        naive = [min(np.linalg.norm(r - m) for m, mk in zip(members, member_keys) if mk != k) for r, k in zip(rows, keys)]
        np.testing.assert_allclose(got, naive, rtol=1e-4)
    script = [sys.executable, str(REPO / "scripts" / "lookalikes.py"), str(train_root)]
    out = subprocess.run(script + [str(audited_run[0] / "audit")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    seen = report["protocols"]["seen"]
    assert out.startswith(f"{seen['n_members']} members, {seen['n_nonmembers']} non-members (seen, amint)")
    with np.load(audited_run[0] / "audit" / "scores.npz", allow_pickle=False) as z:
        planted = {f"seen/{c}": z[f"seen/{c}"] for c in ("key", "split", "label")}
    pixels = dict(zip(heldout_keys, heldout)) | dict(zip(member_keys, members))
    rows = np.stack([pixels[k] for k in planted["seen/key"]])
    planted["seen/amint"] = -lookalikes.nearest_member_distance(rows, planted["seen/key"], members, member_keys)
    (tmp_path / "planted").mkdir()
    np.savez(tmp_path / "planted" / "scores.npz", **planted)
    out = subprocess.run(script + [str(tmp_path / "planted")], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "Spearman(score, closeness to the member set) = 1.000" in out


def test_figures_and_tensorboard(audited_run):
    run_dir = audited_run[0]
    for name in ("roc.png", "scores.png"):
        data = (run_dir / "audit" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, name
    tags = {"scalars": set(), "images": set()}
    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"audit/roc", "audit/scores"} <= tags["images"]
    assert {f"audit/{p}/{m}/auc" for p in PROTOCOLS for m in METHODS} | {"audit/task_accuracy"} <= tags["scalars"]


# ---- refusals ----

@pytest.fixture
def root_copy(tmp_path, train_root) -> Path:
    return Path(shutil.copytree(train_root, tmp_path / "root"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_changed_shard_byte_is_refused_naming_the_shard(audited_run, root_copy):
    shard = root_copy / "heldout" / "shard-000002.tar"
    flip_byte(shard, 1000)  # inside an image payload: the tar still reads
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={audited_run[0]}",
                           f"data.root={root_copy}"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(shard) in lines[0], proc.stderr


def test_edited_key_list_is_refused_naming_it(audited_run, root_copy):
    keys = root_copy / "probe" / "keys.txt"
    lines = keys.read_text().splitlines(keepends=True)
    keys.write_text("".join([lines[1], lines[0], *lines[2:]]))  # same keys, two swapped
    with pytest.raises(TamperedError, match=str(keys)):
        run_audit(audit_cfg(audited_run[0], root_copy))


def test_missing_shard_and_other_dataset_are_refused(audited_run, root_copy):
    original = (root_copy / "splits.json").read_text()
    (root_copy / "splits.json").write_text(json.dumps({**json.loads(original), "note": "another dataset"}))
    with pytest.raises(TamperedError, match="not the dataset the model was trained on"):
        run_audit(audit_cfg(audited_run[0], root_copy))
    (root_copy / "splits.json").write_text(original)
    shard = root_copy / "members" / "shard-000000.tar"
    shard.unlink()
    with pytest.raises(TamperedError, match=f"missing: {shard}"):
        run_audit(audit_cfg(audited_run[0], root_copy))


def test_other_weights_are_refused(audited_run, tmp_path):
    run_dir = copy_run(audited_run[0], tmp_path / "run")
    weights = run_dir / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # another model of the same architecture
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(TamperedError, match=f"{weights} does not match model_config.json"):
        run_audit(audit_cfg(run_dir))


def test_model_config_must_match_the_run_config(audited_run, tmp_path):
    run_dir = copy_run(audited_run[0], tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("depth: 2", "depth: 3"))
    with pytest.raises(TamperedError, match=r"config.yaml \(model.kwargs.depth: 3 != 2\)"):
        run_audit(audit_cfg(run_dir))


def test_missing_run_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={tmp_path / 'nope'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run dir not found: {tmp_path / 'nope'}"


# ---- other audits of the same model ----

def test_ledger_decides_who_is_a_member(audited_run, tmp_path):
    run_dir = copy_run(audited_run[0], tmp_path / "run")
    with np.load(run_dir / "ledger.npz") as data:
        counts = {k: data[k].copy() for k in data.files}
    counts["members"][:25] = 0
    np.savez(run_dir / "ledger.npz", **counts)
    report_md = run_audit(audit_cfg(run_dir))
    report = json.loads(report_md.with_name("report.json").read_text())
    assert report["protocols"]["seen"]["members_excluded_not_consumed"] == 25
    with np.load(report_md.with_name("scores.npz"), allow_pickle=False) as data:
        used = set(data["seen/key"]) | set(data["calibration/seen/key"])
    keys = (Path(report["audited"]["dataset"]["root"]) / "members" / "keys.txt").read_text().split()
    assert not used & set(keys[:25]) and used & set(keys[25:])


def test_model_trained_elsewhere(audited_run, train_root, tmp_path):
    run_dir = copy_run(audited_run[0], tmp_path / "elsewhere", files=("model.safetensors", "model_config.json"))
    report_md = run_audit(audit_cfg(run_dir, train_root, protocols=PROTOCOLS,
                                    passive={"enabled": True, "epochs": 1, "lr": 1e-3, "batch_size": 64}))
    report = json.loads(report_md.with_name("report.json").read_text())
    assert report["ledger"] is False and "no ledger" in report["members_rule"]
    assert any("no exposure ledger" in note for note in report["notes"])
    assert "no exposure ledger" in report_md.read_text()
    assert list(report["protocols"]) == PROTOCOLS and list(report["protocols"]["seen"]["methods"]) == METHODS
    assert all((report_md.parent / f).stat().st_size > 20_000 for f in ("roc.png", "scores.png"))
    with np.load(report_md.with_name("scores.npz"), allow_pickle=False) as ours, \
            np.load(audited_run[0] / "audit" / "scores.npz", allow_pickle=False) as main:
        for column in ("key", "label"):  # every member was consumed: the same samples
            np.testing.assert_array_equal(ours[f"seen/{column}"], main[f"seen/{column}"])
        for method in ("amint", "loss"):  # and the same scores, whatever the batch size
            np.testing.assert_allclose(ours[f"seen/{method}"], main[f"seen/{method}"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_score_like_one(audited_run, tmp_path):
    out = tmp_path / "two_ranks"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(REPO / "launch" / "audit.py"),
           f"run.dir={audited_run[0]}", f"audit.out_dir={out}", "audit.passive.enabled=false", "audit.n_boot=20",
           "audit.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("audit report:") == 1
    assert json.loads((out / "report.json").read_text())["settings"]["world_size"] == 2
    with np.load(out / "scores.npz", allow_pickle=False) as two, \
            np.load(audited_run[0] / "audit" / "scores.npz", allow_pickle=False) as one:
        for p in PROTOCOLS:
            for column in ("key", "split", "label"):
                np.testing.assert_array_equal(two[f"{p}/{column}"], one[f"{p}/{column}"])
            for method in ("amint", "loss", "modified_entropy", "blind"):  # blind: pixels gathered from both ranks
                np.testing.assert_allclose(two[f"{p}/{method}"], one[f"{p}/{method}"], rtol=1e-5, atol=1e-6)
