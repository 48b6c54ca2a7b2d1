"""EMA weights (train.ema): the hand-computed average, recorded and verified like model.safetensors, audited with
audit.weights=ema, a tampered file refused, refused under ZeRO-3 before any work.

Exact resume and the 2-rank DDP agreement of the EMA are in test_balancer.py (one run pair covers EMA and FAMO).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from test_audit import audit_cfg
from test_distributed import ENGINES, launcher
from train_helpers import ENV, REPO, run_train

from amint_dist.audit.run import run_audit
from amint_dist.config import ConfigError
from amint_dist.io import sha256_file
from amint_dist.records.artifacts import TamperedError
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TRAIL_NAME
from amint_dist.records.verification import verify_run
from amint_dist.train.config import EmaConfig

DECAY = 0.5  # far from 0 and 1: the average differs visibly from both the first and the last weights
STEPS = 3
EMA = [f"train.ema.decay={DECAY}", f"train.max_steps={STEPS}", "train.ckpt_every_steps=1", "train.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, train_root) -> Path:
    """Three optimizer steps with an EMA of decay 0.5, a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    run_train(run_dir, train_root, *EMA)
    return run_dir


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def test_ema_is_the_hand_computed_average_of_the_step_weights(ema_run):
    """timm's step-based decay: step 1 copies the weights, then ema = decay * ema + (1 - decay) * weights; the
    integer buffers (BatchNorm's num_batches_tracked) are copied."""
    expected: dict[str, torch.Tensor] = {}
    for step in range(1, STEPS + 1):
        weights = load(step_dir(ema_run, step) / "model.safetensors")  # Accelerate's copy of the step's weights
        expected = {k: w.clone() if step == 1 or not w.is_floating_point() else expected[k].lerp(w, 1 - DECAY)
                    for k, w in weights.items()}
        saved = load(step_dir(ema_run, step) / "ema.safetensors")
        assert list(saved) == list(weights)
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")
    final, ema = load(ema_run / "model.safetensors"), load(ema_run / "model_ema.safetensors")
    assert list(ema) == list(final)  # exactly model.safetensors's key layout
    for name in final:
        torch.testing.assert_close(ema[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    moved = [n for n in final if final[n].is_floating_point() and not torch.equal(ema[n], final[n])]
    assert len(moved) > len(final) // 2  # an average, not the last weights


def test_ema_file_is_recorded_and_verified_like_the_weights(ema_run, train_root):
    model_config = json.loads((ema_run / "model_config.json").read_text())
    digest = sha256_file(ema_run / "model_ema.safetensors")
    assert model_config["ema_weights_sha256"] == digest and model_config["ema"] == {"decay": DECAY, "warmup": False}
    entries = [json.loads(x) for x in (ema_run / TRAIL_NAME).read_text().splitlines()]
    assert entries[-1]["kind"] == "final" and entries[-1]["ema_weights_sha256"] == digest
    for entry in (e for e in entries if e["kind"] == "checkpoint"):
        assert entry["files"]["ema.safetensors"] == sha256_file(ema_run / "checkpoints" / entry["checkpoint"] /
                                                               "ema.safetensors")
    integrity = verify_run(ema_run, sha256_file(train_root / "splits.json"), Verifier())
    assert (integrity["status"], integrity["problems"]) == ("unsigned", [])
    assert "model_ema.safetensors sha256" in integrity["checked"]


def test_audit_scores_the_ema_weights_and_says_so(ema_run, tmp_path):
    run_dir = Path(shutil.copytree(ema_run, tmp_path / "run"))
    scores = {}
    for weights in ("model", "ema"):
        report_md = run_audit(audit_cfg(run_dir, weights=weights, out_dir=str(tmp_path / weights)))
        report = json.loads(report_md.with_name("report.json").read_text())
        scored = report["audited"]["weights"]
        assert scored["scored"] == weights and scored["sha256"] == sha256_file(run_dir / scored["file"])
        assert f"Weights scored: **{weights}**" in report_md.read_text()
        assert report["integrity"]["status"] == "unsigned" and not report["integrity"]["problems"]
        with np.load(report_md.with_name("scores.npz"), allow_pickle=False) as data:
            scores[weights] = data["seen/amint"]
    assert scores["model"].shape == scores["ema"].shape and not np.allclose(scores["model"], scores["ema"])


def test_tampered_ema_weights_are_refused(ema_run, tmp_path):
    """The attacker edits model_ema.safetensors; then also writes its sha256 into model_config.json."""
    run_dir = Path(shutil.copytree(ema_run, tmp_path / "run"))
    weights = run_dir / "model_ema.safetensors"
    state = load(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(TamperedError, match=f"{weights} does not match model_config.json ema_weights_sha256"):
        run_audit(audit_cfg(run_dir, weights="ema"))
    config = json.loads((run_dir / "model_config.json").read_text())
    config["ema_weights_sha256"] = sha256_file(weights)
    (run_dir / "model_config.json").write_text(json.dumps(config))
    report_md = run_audit(audit_cfg(run_dir, weights="ema"))  # no key: reported, never called intact
    integrity = json.loads(report_md.with_name("report.json").read_text())["integrity"]
    assert integrity["status"] == "broken"
    assert "model_ema.safetensors does not match the EMA weights sha256 in the trail's final entry" in integrity["problems"]
    assert "model_config.json does not match the trail's final entry" in " ".join(integrity["problems"])


def test_audit_of_ema_weights_of_a_run_without_them_is_one_line(tmp_path, train_root):
    run_dir = tmp_path / "plain"
    run_train(run_dir, train_root, "train.max_steps=1")
    assert not (run_dir / "model_ema.safetensors").exists()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}", "audit.weights=ema"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: audit.weights=ema: {run_dir} has no EMA weights (model_config.json records none: trained with "
        "train.ema.decay off); use audit.weights=model")


@pytest.mark.parametrize("values, message", [
    ({"decay": 1.0}, "train.ema.decay=1.0: expected a number >= 0 and < 1 or null"),
    ({"decay": 0.99, "device": "gpu"}, "train.ema.device='gpu': expected one of ['model', 'cpu']"),
])
def test_bad_ema_settings_are_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        EmaConfig.from_dict(values)
    assert str(error.value) == message
    assert not EmaConfig.from_dict({"decay": 0}).on and not EmaConfig().on and EmaConfig.from_dict({"decay": 0.9}).on


@pytest.mark.slow
def test_ema_under_zero3_is_refused_before_any_work(tmp_path, train_root):
    """ZeRO-3 partitions the parameters: an EMA of each rank's shard would be no EMA of the model."""
    proc = run_train(tmp_path / "ema", train_root, "train.ema.decay=0.99", check=False,
                     launcher=launcher(ENGINES["zero3"]))
    assert proc.returncode != 0
    assert "error: train.ema.decay=0.99 is not supported under DeepSpeed ZeRO-3" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ema").exists()
