"""End to end: two tiny reference runs (subset seeds 0 and 1) and the audited tiny run; the audit with
audit.reference_runs adds LiRA, RMIA and aMINT-LR; IN/OUT follows the reference ledgers; scores.npz recomputes
the report; reference runs that cannot be trusted are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from amint_dist.audit.references import REFERENCE_METHODS
from amint_dist.audit.run import audit_config, run_audit
from train_helpers import REPO, load_npz, run_train

pytestmark = pytest.mark.slow
PROTOCOLS = ["seen", "unseen", "null"]
QUICK = {"batch_size": 128, "workers": 0, "n_boot": 50, "passive": {"enabled": False}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("power")
    out = {"audited": base / "audited", "r0": base / "r0", "r1": base / "r1"}
    run_train(out["audited"], train_root, "train.epochs=2")
    for seed in (0, 1):
        run_train(out[f"r{seed}"], train_root, "train.epochs=2", f"data.subset.seed={seed}")
    return out


def audit(run_dir: Path, references: list[Path], out: Path, **extra) -> dict:
    cfg = audit_config(REPO / "configs", run_dir)
    cfg["audit"].update({**QUICK, "out_dir": str(out), "reference_runs": [str(r) for r in references], **extra})
    return json.loads(run_audit(cfg).with_name("report.json").read_text())


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("power_audit")
    return audit(runs["audited"], [runs["r0"], runs["r1"]], out), out


def test_reference_methods_join_every_protocol(report):
    rep, out = report
    for name in PROTOCOLS:
        methods = rep["protocols"][name]["methods"]
        assert set(REFERENCE_METHODS) | {"amint", "loss", "blind"} <= set(methods), name
        for method in REFERENCE_METHODS:
            assert set(methods[method]) == {"balanced_accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"}
            assert 0 <= methods[method]["auc"]["value"] <= 1
        assert rep["protocols"][name]["fixed_fpr"]["lira_online_fixed"][0]["fpr"] == 0.0
    assert rep["distribution_shift"] == []  # an honest key-hash split: the blind baseline reads chance
    report_md = (out / "report.md").read_text()
    assert "DISTRIBUTION SHIFT" not in report_md
    for name in PROTOCOLS:  # every protocol's fixed-FPR table in report.md has a row per reference method
        section = report_md.split(f"### `{name}`")[1].split("###")[0].split("## All metrics")[0]
        assert all(f"| {method} |" in section for method in [*REFERENCE_METHODS, "blind"]), name
    null = rep["protocols"]["null"]["methods"]
    assert null["blind"]["auc"]["ci95"][0] <= 0.5 <= null["blind"]["auc"]["ci95"][1]


def test_in_out_follows_the_reference_ledgers_and_digests_are_recorded(report, runs, train_root):
    rep, _ = report
    refs = rep["reference_runs"]
    assert [r["run_dir"] for r in refs["runs"]] == [str(runs["r0"].resolve()), str(runs["r1"].resolve())]
    splits_sha = json.loads((runs["audited"] / "model_config.json").read_text())["dataset"]["splits_sha256"]
    for ref, name in zip(refs["runs"], ("r0", "r1")):
        assert ref["weights_sha256"] == json.loads((runs[name] / "model_config.json").read_text())["weights_sha256"]
        assert ref["splits_sha256"] == splits_sha and ref["subset"]["seed"] == int(name[1])
        trail = [json.loads(line) for line in (runs[name] / "audit_trail.jsonl").read_text().splitlines()]
        assert ref["ledger_sha256"] == trail[-1]["ledger_sha256"]
    ledgers = [load_npz(runs[name] / "ledger.npz") for name in ("r0", "r1")]
    for split, coverage in refs["coverage"].items():
        consumed = np.stack([ledger[split] > 0 for ledger in ledgers])
        assert coverage["n"] == consumed.shape[1]
        assert coverage["in_per_run"] == consumed.sum(axis=1).tolist()
        assert coverage["in_for_none"] == int((consumed.sum(0) == 0).sum())
        assert coverage["out_for_none"] == int((consumed.sum(0) == 2).sum())
    assert 0 < refs["coverage"]["heldout"]["in_per_run"][0] < refs["coverage"]["heldout"]["n"]  # the pool's half
    assert refs["coverage"]["probe"]["out_for_none"] == refs["coverage"]["probe"]["n"]  # probe: outside the pool


def test_scores_npz_recomputes_the_reference_methods(report):
    rep, out = report
    with np.load(out / "scores.npz", allow_pickle=False) as data:
        scores = {k: data[k] for k in data.files}
    for name in PROTOCOLS:
        labels = scores[f"{name}/label"]
        for method in [*REFERENCE_METHODS, "blind"]:
            auc = roc_auc_score(labels, scores[f"{name}/{method}"])
            assert auc == pytest.approx(rep["protocols"][name]["methods"][method]["auc"]["value"], abs=1e-9)
    assert "LiRA online" in rep["methods"]["lira_online"] and "blind" in rep["methods"]


def copy_run(run_dir: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("audit", "checkpoints", "tb", *drop))
    return dest


@pytest.mark.parametrize("problem", ["no ledger", "the audited model", "another root"])
def test_untrustworthy_reference_runs_are_refused_in_one_line(runs, tmp_path, problem, train_root):
    if problem == "no ledger":
        ref, match = copy_run(runs["r0"], tmp_path / "r0", drop=("ledger.npz",)), "no ledger.npz"
    elif problem == "the audited model":
        ref, match = copy_run(runs["audited"], tmp_path / "same"), "holds the audited model's own weights"
    else:
        root = tmp_path / "root"
        shutil.copytree(train_root, root)
        manifest = json.loads((root / "splits.json").read_text())
        (root / "splits.json").write_text(json.dumps({**manifest, "note": "another root"}))
        ref = tmp_path / "other"
        run_train(ref, root, "train.max_steps=2", "data.subset.seed=0")
        match = "not the dataset the model was trained on"
    with pytest.raises(ValueError if problem != "no ledger" else FileNotFoundError) as error:
        audit(runs["audited"], [ref], tmp_path / "out", protocols=["seen"], blind=False)
    message = str(error.value)
    assert message.startswith(f"reference run {ref}: ") and match in message and "\n" not in message


def brightened_member_tree(directory: Path, fractions: dict) -> set[str]:
    """The digits as a class-per-folder PNG tree whose future members (by the split hash) are brighter."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from amint_dist.data.sources import sanitize_key
    from amint_dist.data.splits import assign_split

    digits, members = load_digits(), set()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        key = sanitize_key(f"c{label}/d{i:04d}")
        pixels = image * 12.0
        if assign_split(0, key, fractions) == "members":
            pixels, _ = pixels + 60.0, members.add(key)
        path = directory / f"c{label}" / f"d{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(path)
    return members


def test_blind_baseline_flags_a_root_where_members_are_brighter(tmp_path):
    from amint_dist.data.prepare import prepare_dataset

    from conftest import prep_cfg

    cfg = prep_cfg("imagefolder", tmp_path / "root", source=str(tmp_path / "tree"), shard_maxcount=32)
    members = brightened_member_tree(tmp_path / "tree", cfg["fractions"])
    prepare_dataset(cfg)
    assert set((tmp_path / "root" / "members" / "keys.txt").read_text().split()) == members
    run_train(tmp_path / "run", tmp_path / "root", "train.max_steps=2")
    rep = audit(tmp_path / "run", [], tmp_path / "audit")
    assert [w.split(":")[0] for w in rep["distribution_shift"]] == ["DISTRIBUTION SHIFT in protocol seen"]
    assert rep["notes"][0] == rep["distribution_shift"][0]
    assert rep["protocols"]["seen"]["methods"]["blind"]["auc"]["ci95"][0] > 0.9
    report_md = (tmp_path / "audit" / "report.md").read_text()
    assert report_md.index("Integrity:") < report_md.index("**DISTRIBUTION SHIFT in protocol seen") < \
        report_md.index("## Per-sample evidence")  # after the verdict and integrity, before every table


def test_two_audit_ranks_give_the_one_rank_reference_scores(runs, report, tmp_path):
    import os
    import subprocess

    out = tmp_path / "two_ranks"
    refs = f"audit.reference_runs=[{runs['r0']},{runs['r1']}]"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(REPO / "launch" / "audit.py"),
           f"run.dir={runs['audited']}", f"audit.out_dir={out}", "audit.passive.enabled=false", "audit.n_boot=50",
           "audit.workers=1", "audit.batch_size=128", refs]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "scores.npz", allow_pickle=False) as two, \
            np.load(report[1] / "scores.npz", allow_pickle=False) as one:
        for p in PROTOCOLS:
            np.testing.assert_array_equal(two[f"{p}/key"], one[f"{p}/key"])
            for method in REFERENCE_METHODS:
                np.testing.assert_allclose(two[f"{p}/{method}"], one[f"{p}/{method}"], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "report.json").read_text())["reference_runs"]["coverage"] == report[0][
        "reference_runs"]["coverage"]


def test_a_model_file_audit_gets_reference_attacks_but_no_amint_lr(runs, tmp_path, train_root):
    """The audited run's backbone as a plain timm file: LiRA/RMIA need only its logits; aMINT-LR would read the
    file's fresh, untrained MINT head, so it is left out."""
    import safetensors.torch
    import torch

    weights = safetensors.torch.load_file(runs["audited"] / "model.safetensors")
    torch.save({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")},
               tmp_path / "vit.pth")
    record = json.loads((runs["audited"] / "model_config.json").read_text())["model"]
    cfg = audit_config(REPO / "configs", "")
    cfg["data"]["root"] = str(train_root)
    cfg["audit"].update({**QUICK, "passive": {"enabled": True, "epochs": 1}, "protocols": ["seen"],
                         "out_dir": str(tmp_path / "audit"), "reference_runs": [str(runs["r0"]), str(runs["r1"])],
                         "model": {"name": record["name"], "file": str(tmp_path / "vit.pth"),
                                   "img_size": record["img_size"], "in_chans": record["in_chans"],
                                   "kwargs": record["kwargs"], "taps": [0, 1],
                                   "transform": {"crop_pct": 1.0, "interpolation": "bilinear"}}})
    rep = json.loads(run_audit(cfg).with_name("report.json").read_text())
    methods = rep["protocols"]["seen"]["methods"]
    assert {"lira_online", "lira_offline", "rmia_online", "rmia_offline", "passive"} <= set(methods)
    assert not {"amint_lr", "amint_lr_offline"} & set(methods)
    assert len(rep["reference_runs"]["runs"]) == 2
