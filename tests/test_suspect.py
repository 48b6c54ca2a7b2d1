"""Suspect-set audit: the set-level statistics on synthetic scores (no model); their calibration measured on a
real tiny run's scores; the CLI end to end on a folder of PNG files written from the dataset (and a corrupt one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from amint_dist.audit.set_test import fraction_interval, rank_test, set_test, used_fraction, verdict
from amint_dist.data.sources import ext_of, read_member, tar_groups
from train_helpers import ENV, REPO, load_npz, run_train

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def null_rejections(reference: np.ndarray, pool: np.ndarray, n_sets: int, size: int, alpha: float,
                    rng: np.random.Generator) -> int:
    """How many random ``size``-sets drawn from the non-member ``pool`` the rank test rejects at ``alpha``."""
    return sum(rank_test(rng.choice(pool, size, replace=False), reference)["p_value"] < alpha for _ in range(n_sets))


def mixture_misses(members: np.ndarray, member_pool: np.ndarray, reference: np.ndarray, nonmember_pool: np.ndarray,
                   size: int, repeats: int, rng: np.random.Generator) -> dict[float, int]:
    """Per true fraction, how many of ``repeats`` mixed suspect sets get a 95% interval missing the truth."""
    misses = {}
    for fraction in FRACTIONS:
        k = round(fraction * size)
        missed = 0
        for r in range(repeats):
            suspect = np.concatenate([rng.choice(member_pool, k, replace=False),
                                      rng.choice(nonmember_pool, size - k, replace=False)])
            lo, hi = fraction_interval(suspect, members, reference, 200, r)["ci95"]
            missed += not lo <= k / size <= hi
        misses[fraction] = missed
    return misses


def within_level(rejections: int, n_sets: int, alpha: float) -> bool:
    """The rejection rate is compatible with <= alpha: an exact one-sided binomial test does not reject at 1%."""
    return binomtest(rejections, n_sets, alpha, alternative="greater").pvalue >= 0.01


# ---- the statistics on synthetic scores ----

def test_rank_test_is_calibrated_under_the_null_and_powerful_on_members():
    rng = np.random.default_rng(0)
    rejections = sum(rank_test(rng.normal(size=50), rng.normal(size=80))["p_value"] < 0.05 for _ in range(400))
    assert within_level(rejections, 400, 0.05), rejections
    shifted = rank_test(rng.normal(1.0, 1.0, 50), rng.normal(size=80))
    assert shifted["p_value"] < 1e-6 and shifted["auc"] > 0.7
    assert verdict(shifted["p_value"], 0.01) == "used" and verdict(0.02, 0.01) == "no evidence"


def test_used_fraction_estimates_mixtures_with_covering_intervals():
    rng = np.random.default_rng(1)
    members, reference = rng.normal(1.0, 1.0, 200), rng.normal(size=200)
    misses = mixture_misses(members, rng.normal(1.0, 1.0, 2000), reference, rng.normal(size=2000), 100, 10, rng)
    assert within_level(sum(misses.values()), 10 * len(FRACTIONS), 0.05), misses  # a 95% interval misses 5%
    assert used_fraction(rng.normal(size=100), rng.normal(size=100), reference) is None  # members look like the rest
    assert fraction_interval(members, members, reference, 50, 0)["value"] == 1.0


def test_set_test_reports_every_method():
    rng = np.random.default_rng(2)
    scores = {m: rng.normal(size=30) for m in ("amint", "loss")}
    out = set_test(scores, {m: rng.normal(1, 1, 40) for m in scores}, {m: rng.normal(size=40) for m in scores}, 20, 0)
    assert set(out) == {"amint", "loss"}
    assert {"u", "auc", "p_value", "fraction"} <= set(out["amint"])


# ---- a real tiny run: the CLI on a folder of PNG files, then calibration on its scores ----

def split_images(root: Path, split: str) -> list[tuple[str, bytes, str]]:
    """(key, PNG bytes, class) of every sample of a prepared split."""
    out = []
    for url in sorted((root / split).glob("*.tar")):
        with open(url, "rb") as f:
            for key, members in tar_groups(str(url)):
                fields = {ext_of(m.name): m for m in members}
                out.append((key, read_member(f, fields["png"]), read_member(f, fields["cls"]).decode()))
    return out


@pytest.fixture(scope="module")
def suspect_audit(tmp_path_factory, train_root) -> Path:
    """30 epochs of the tiny model (a 2-epoch head is near chance), audited with a suspect folder of 60 member and
    20 heldout PNGs in class folders, plus a corrupt .png."""
    tmp = tmp_path_factory.mktemp("suspect")
    run_dir = tmp / "run"
    run_train(run_dir, train_root, "train.epochs=30")
    folder = tmp / "suspect"
    for split, n in (("members", 60), ("heldout", 20)):
        for key, png, cls in split_images(train_root, split)[:n]:
            (folder / cls).mkdir(parents=True, exist_ok=True)
            (folder / cls / f"{key}.png").write_bytes(png)
    (folder / "3" / "corrupt.png").write_bytes(b"not an image")
    cmd = [sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}", f"audit.suspect={folder}",
           "audit.protocols=[seen]", "audit.passive.enabled=false", "audit.n_boot=200", "audit.workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "corrupt.png skipped: undecodable image" in proc.stdout + proc.stderr
    return run_dir / "audit"


def test_cli_scores_a_suspect_folder_like_the_evaluation_samples(suspect_audit):
    report = json.loads((suspect_audit / "report.json").read_text())
    section = report["suspect"]
    assert section["n"] == 80 and section["skipped"] == {"undecodable image (UnidentifiedImageError)": 1}
    assert set(section["methods"]) == {"amint", "loss", "confidence", "entropy", "modified_entropy"}
    assert section["verdict"] in ("used", "no evidence") and section["verdict_method"] == "amint"
    assert (section["verdict"] == "used") == (section["methods"]["amint"]["p_value"] < 0.01)
    assert section["n_reference_nonmembers"] > 50 and section["methods"]["amint"]["fraction"]["ci95"]
    lines = (suspect_audit / "report.md").read_text().splitlines()  # the verdict first, then integrity
    assert lines[2].startswith("Suspect set ") and f"**{section['verdict']}**" in lines[2]
    assert lines[4].startswith("Integrity: ")
    how_to_read = "\n".join(lines).split("## How to read this report")[1].split("## Per-sample")[0]
    p_value = section["methods"]["amint"]["p_value"]
    assert f"Here the 80 suspect images give p = {p_value:.2g} (amint): both facts are true at once." in how_to_read
    suspect, scored = load_npz(suspect_audit / "suspect_scores.npz"), load_npz(suspect_audit / "scores.npz")
    audited = {}
    for part in ("seen", "calibration/seen"):
        audited.update(zip(scored[f"{part}/key"], scored[f"{part}/amint"]))
    keys = [Path(name).stem for name in suspect["name"]]
    common = [i for i, k in enumerate(keys) if k in audited]
    assert len(common) > 40  # the same image scores the same read from a PNG file as from the prepared shard
    np.testing.assert_allclose(suspect["amint"][common], [audited[keys[i]] for i in common], rtol=1e-6)


def test_calibration_measured_on_the_run_scores(suspect_audit):
    """Null sets: heldout evaluation samples (never the reference); reference: the heldout calibration share."""
    s = load_npz(suspect_audit / "scores.npz")
    evaluation, calibration = s["seen/label"], s["calibration/seen/label"]
    reference, members = (s["calibration/seen/amint"][calibration == label] for label in (0, 1))
    nonmember_pool, member_pool = (s["seen/amint"][evaluation == label] for label in (0, 1))
    rng = np.random.default_rng(0)
    rejections = null_rejections(reference, nonmember_pool, 200, 50, 0.05, rng)
    assert within_level(rejections, 200, 0.05), rejections
    member_p = [rank_test(rng.choice(member_pool, 50, replace=False), reference)["p_value"] for _ in range(50)]
    assert np.median(member_p) < 0.05, np.median(member_p)  # this weak head (seen AUC ~0.6) cannot reach 1e-6
    assert rank_test(member_pool, nonmember_pool)["p_value"] < 1e-4
    misses = mixture_misses(members, member_pool, reference, nonmember_pool, 100, 10, rng)
    assert within_level(sum(misses.values()), 10 * len(FRACTIONS), 0.05), misses


def test_suspect_files_from_a_list_and_shards_with_labels(tmp_path):
    from conftest import image_bytes, write_wds_source
    from amint_dist.audit.suspect import class_index, suspect_files
    (tmp_path / "a.jpg").write_bytes(image_bytes(0))
    listing = tmp_path / "files.txt"
    listing.write_text(f"a.jpg\n{tmp_path / 'missing.jpg'}\n\n")
    listed = list(suspect_files(listing))
    assert [f.problem for f in listed] == [None, "unreadable file (FileNotFoundError)"] and listed[0].payload
    pattern = write_wds_source(tmp_path / "shards", [{"__key__": f"s{i}", "jpg": image_bytes(i),
                                                      "cls": str(i % 3).encode()} for i in range(5)], 2)
    (tmp_path / "shards" / "src-003.tar").write_bytes(b"garbage")
    shards = list(suspect_files(pattern.replace("002}", "003}")))
    assert [f.label for f in shards[:5]] == ["0", "1", "2", "0", "1"] and shards[5].problem.startswith("corrupt")
    assert class_index(["1", "b"], ["a", "b"]).tolist() == [1, 1] and class_index(["c", None], ["a", "b"]) is None


def test_baselines_only_where_every_class_is_known():
    from amint_dist.audit.suspect import _joined, label_note
    parts = [{"amint": np.ones(2), "loss": np.zeros(2)}, {"amint": np.ones(1)}]  # the second batch had no class
    assert set(_joined(parts)) == {"amint"} and _joined([]) == {}
    assert "only amint label-free" in label_note(["amint"])[0]
