"""audit.plain_run: the population attacks against a plain (mint.mode=off) model beside the audited model."""

from __future__ import annotations

import json
import subprocess
import sys

from train_helpers import ENV, REPO, run_train

from amint_dist.audit.baselines import BASELINES


def audit(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}",
                           "audit.passive.enabled=false", "audit.n_boot=20", "audit.workers=0", *overrides],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)


def test_privacy_cost_sets_the_plain_models_attacks_beside_the_audited_models(tmp_path, train_root):
    run_train(tmp_path / "amint", train_root, "train.max_steps=8")
    run_train(tmp_path / "plain", train_root, "train.max_steps=8", "mint.mode=off")
    proc = audit(tmp_path / "amint", f"audit.plain_run={tmp_path / 'plain'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "amint" / "audit" / "report.json").read_text())
    cost = report["privacy_cost"]
    assert cost["plain_run"] == str((tmp_path / "plain").resolve()) and set(cost["protocols"]) == set(report["protocols"])
    plain_weights = json.loads((tmp_path / "plain" / "model_config.json").read_text())["weights_sha256"]
    assert cost["weights_sha256"] == plain_weights
    for name, methods in cost["protocols"].items():
        assert set(methods) == set(BASELINES)
        for method, aucs in methods.items():  # the audited side is the report's own figure
            assert aucs["audited"] == report["protocols"][name]["methods"][method]["auc"]
            assert 0.0 <= aucs["plain"]["value"] <= 1.0
    plain_loss = cost["protocols"]["seen"]["loss"]["plain"]["value"]
    audited_loss = cost["protocols"]["seen"]["loss"]["audited"]["value"]
    assert plain_loss != audited_loss  # two models, two scorings
    assert "## Privacy cost for the owner" in (tmp_path / "amint" / "audit" / "report.md").read_text()


def test_a_plain_run_that_is_not_plain_is_one_line(tmp_path, train_root):
    run_train(tmp_path / "amint", train_root, "train.max_steps=2")
    proc = audit(tmp_path / "amint", f"audit.plain_run={tmp_path / 'amint'}")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: audit.plain_run=") and "trained with mint.mode=active" in line
