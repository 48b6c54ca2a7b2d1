"""Auditing a model trained elsewhere by timm name + weights file (no run dir): a real tiny timm ViT trained on
digits, saved as a plain state_dict, a timm training checkpoint and safetensors, audited through the CLI; bad
names, files and shapes are one-line errors; a verifier holding a key refuses a model without a trail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import prep_cfg
from train_helpers import ENV, REPO, cli_error, run_train

from amint_dist.audit.baselines import BASELINES
from amint_dist.audit.blind import BLIND
from amint_dist.audit.run import run_audit
from amint_dist.data.prepare import prepare_dataset
from amint_dist.io import sha256_file
from amint_dist.records.signing import generate_keypair

NAME = "vit_tiny_patch16_224"
ARCH = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}  # the tiny run's ViT
MODEL_ARGS = [f"audit.model.name={NAME}", "audit.model.img_size=16", "audit.model.taps=[0,1]",
              *(f"+audit.model.kwargs.{k}={v}" for k, v in ARCH.items()),
              "+audit.model.transform.crop_pct=1.0", "+audit.model.transform.interpolation=bilinear"]
QUICK = ["audit.workers=0", "audit.n_boot=100", "audit.protocols=[seen,null]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A plain timm ViT (mint.mode=off) trained 40 epochs on a digits root with few members (it memorises them),
    its run-dir audit, and its backbone weights as a state_dict .pth, a timm checkpoint and .safetensors."""
    tmp = tmp_path_factory.mktemp("model_file")
    root = tmp / "root"
    prepare_dataset(prep_cfg("digits", root, shard_maxcount=32,
                             fractions={"members": 0.1, "probe": 0.05, "external": 0.35, "heldout": 0.5}))
    run_dir = tmp / "run"
    run_train(run_dir, root, "mint.mode=off", "train.epochs=40", "optim.weight_decay=0")
    weights = safetensors.torch.load_file(run_dir / "model.safetensors")
    state = {k.removeprefix("backbone."): v for k, v in weights.items()}
    files = {"root": root, "run": run_dir, "pth": tmp / "vit.pth", "checkpoint": tmp / "checkpoint.pth.tar",
             "safetensors": tmp / "vit.safetensors"}
    torch.save(state, files["pth"])
    torch.save({"epoch": 40, "arch": NAME, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               files["checkpoint"])  # timm's train.py checkpoint, saved from a DDP-wrapped model
    safetensors.torch.save_file(state, str(files["safetensors"]))
    return files


@pytest.fixture(scope="module")
def file_audit(trained) -> Path:
    """``python launch/audit.py audit.model.name=... audit.model.file=...pth data.root=... audit.out_dir=...``."""
    out = trained["run"].parent / "file_audit"
    cmd = [sys.executable, str(REPO / "launch" / "audit.py"), *MODEL_ARGS, f"audit.model.file={trained['pth']}",
           f"data.root={trained['root']}", f"audit.out_dir={out}", "audit.passive.epochs=2", *QUICK]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"audit report: {out / 'report.md'}" in proc.stdout
    return out


def scores_of(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "scores.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def audit_cli(argv: list[str], capsys) -> str:
    """launch/audit.py's CLI in-process: its one ``error:`` line."""
    return cli_error("audit", run_audit, argv, capsys)


def test_a_model_file_is_audited_by_name_with_passive_mint_and_baselines(trained, file_audit):
    report = json.loads((file_audit / "report.json").read_text())
    assert report["audited"]["run_dir"] is None and report["audited"]["weights_file"] == str(trained["pth"])
    assert report["audited"]["model"]["weights_sha256"] == sha256_file(trained["pth"])
    assert report["ledger"] is False and report["integrity"]["status"] == "absent"
    assert list(report["protocols"]["seen"]["methods"]) == ["passive", *BASELINES, BLIND]  # no aMINT head in the file
    assert len(report["passive_training"]) == 2
    text = (file_audit / "report.md").read_text()
    assert "Integrity: **NOT established** (a model file audited by name" in text
    assert "members are the members/probe splits as prepared" in text
    assert (file_audit / "tb").is_dir()  # TensorBoard beside the report: there is no run dir
    loss_auc = report["protocols"]["seen"]["methods"]["loss"]["auc"]
    assert loss_auc["ci95"][0] > 0.5, loss_auc  # the memorised members read above chance
    # the same samples score exactly as in the audit of the run that trained it (same weights, transform, data)
    run_report = run_audit({"run": {"dir": str(trained["run"])}, "data": {"root": None},
                            "audit": {"workers": 0, "n_boot": 20, "protocols": ["seen"],
                                      "passive": {"enabled": False}, "out_dir": str(trained["run"] / "audit")}})
    ours, theirs = scores_of(file_audit), scores_of(run_report.parent)
    np.testing.assert_array_equal(ours["seen/key"], theirs["seen/key"])
    for method in BASELINES:
        np.testing.assert_allclose(ours[f"seen/{method}"], theirs[f"seen/{method}"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["checkpoint", "safetensors"])
def test_timm_checkpoints_and_safetensors_load_the_same_weights(trained, file_audit, tmp_path, kind):
    out = tmp_path / kind
    cfg = {"run": {"dir": None}, "data": {"root": str(trained["root"])},
           "audit": {"workers": 0, "n_boot": 20, "protocols": ["seen"], "passive": {"enabled": False},
                     "out_dir": str(out), "model": {"name": NAME, "file": str(trained[kind]), "img_size": 16,
                                                    "kwargs": ARCH, "taps": [0, 1],
                                                    "transform": {"crop_pct": 1.0, "interpolation": "bilinear"}}}}
    run_audit(cfg)
    report = json.loads((out / "report.json").read_text())
    assert list(report["protocols"]["seen"]["methods"]) == [*BASELINES, BLIND]  # passive off: baselines + blind
    assert report["audited"]["model"]["weights_sha256"] == sha256_file(trained[kind])
    np.testing.assert_allclose(scores_of(out)["seen/loss"], scores_of(file_audit)["seen/loss"], rtol=1e-6)


def bad_files(trained: dict[str, Path], tmp: Path) -> dict[str, tuple[Path, str]]:
    """Files an auditor may be handed, and what the one-line error must say."""
    state = torch.load(trained["pth"], weights_only=True)
    wrong_classes = {**state, "head.weight": state["head.weight"][:7], "head.bias": state["head.bias"][:7]}
    files = {"classes": (tmp / "seven.pth", wrong_classes), "pickle": (tmp / "pickled.pth", {"opt": Path("x")}),
             "shape": (tmp / "deeper.pth", {**state, "blocks.2.norm1.weight": torch.ones(32)}),
             "text": (tmp / "notes.safetensors", None)}
    for path, content in files.values():
        path.write_text("not weights") if content is None else torch.save(content, path)
    return {"classes": (files["classes"][0], "has a 7-class classifier, the dataset root has 10 classes"),
            "pickle": (files["pickle"][0], "not a safetensors file or a weights-only torch state_dict"),
            "shape": (files["shape"][0], "does not fit timm model 'vit_tiny_patch16_224'"),
            "text": (files["text"][0], "not a safetensors file or a weights-only torch state_dict")}


def test_bad_names_files_and_shapes_are_one_line_errors(trained, tmp_path, capsys):
    base = [f"data.root={trained['root']}", f"audit.out_dir={tmp_path / 'out'}", *QUICK]
    file_arg = f"audit.model.file={trained['pth']}"
    error = audit_cli([*MODEL_ARGS, "audit.model.name=no_such_net", file_arg, *base], capsys)
    assert error == "error: audit.model.name: unknown timm model 'no_such_net'"
    missing = tmp_path / "missing.pth"
    assert audit_cli([*MODEL_ARGS, f"audit.model.file={missing}", *base], capsys) == \
        f"error: audit.model.file not found: {missing}"
    for what, (path, message) in bad_files(trained, tmp_path).items():
        error = audit_cli([*MODEL_ARGS, f"audit.model.file={path}", *base], capsys)
        assert error.startswith(f"error: {path}") and message in error, (what, error)
    assert "depth" in audit_cli([*MODEL_ARGS, "+audit.model.kwargs.depth=3", file_arg, *base], capsys)  # missing keys
    error = audit_cli([*MODEL_ARGS, "audit.model.taps=[0,7]", file_arg, *base], capsys)  # the ViT has 2 blocks
    assert error.startswith("error: audit.model.taps=[0, 7]") and "out of range" in error, error
    error = audit_cli([*MODEL_ARGS, "+audit.model.kwargs.pretrained=true", file_arg, *base], capsys)
    assert error.startswith("error: audit.model.kwargs: pretrained not allowed"), error
    assert "go together" in audit_cli([f"audit.model.name={NAME}", *base], capsys)
    assert "audit.out_dir=None: required" in audit_cli([*MODEL_ARGS, file_arg, f"data.root={trained['root']}"], capsys)
    assert "one or the other" in audit_cli([*MODEL_ARGS, file_arg, f"run.dir={trained['run']}", *base], capsys)
    assert "one of the two is required" in audit_cli(base, capsys)
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_verifier_holding_a_key_refuses_a_model_without_trail(trained, tmp_path, capsys):
    _, key = generate_keypair(tmp_path / "keys")
    argv = [*MODEL_ARGS, f"audit.model.file={trained['pth']}", f"data.root={trained['root']}",
            f"audit.out_dir={tmp_path / 'out'}", f"audit.public_key={key}", *QUICK]
    error = audit_cli(argv, capsys)
    assert error.startswith(f"error: refusing to audit {trained['pth']}: no audit_trail.jsonl"), error


@pytest.mark.slow
def test_two_ranks_audit_a_model_file_like_one(trained, file_audit, tmp_path):
    out = tmp_path / "two_ranks"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(REPO / "launch" / "audit.py"), *MODEL_ARGS,
           f"audit.model.file={trained['pth']}", f"data.root={trained['root']}", f"audit.out_dir={out}",
           "audit.passive.enabled=false", "audit.workers=1", "audit.n_boot=20", "audit.protocols=[seen,null]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("audit report:") == 1
    assert json.loads((out / "report.json").read_text())["settings"]["world_size"] == 2
    two, one = scores_of(out), scores_of(file_audit)
    for p in ("seen", "null"):
        np.testing.assert_array_equal(two[f"{p}/key"], one[f"{p}/key"])
        for method in BASELINES:
            np.testing.assert_allclose(two[f"{p}/{method}"], one[f"{p}/{method}"], rtol=1e-6, atol=1e-9)
