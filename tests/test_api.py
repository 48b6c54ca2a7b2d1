"""The Python API: docs/api.md's example run as written (a real tiny timm ViT, a prepared digits root, a plain
torch loop, the ledger, the audit), and the joint loss's first-step normalisation."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import prep_cfg
from train_helpers import ENV, REPO, load_npz

from amint_dist.api import AMintLoss
from amint_dist.data.prepare import prepare_dataset


def docs_example() -> str:
    """The one ```python block of docs/api.md."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_loop_trains_records_and_audits(tmp_path):
    prepare_dataset(prep_cfg("digits", tmp_path / "data" / "digits", shard_maxcount=64))
    proc = subprocess.run([sys.executable, "-c", docs_example()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**ENV, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "my_loop"
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    auc = report["protocols"]["seen"]["methods"]["amint"]["auc"]
    assert f"aMINT seen AUC {auc['value']:.3f}" in proc.stdout
    assert report["ledger"] is True and report["integrity"]["status"] == "absent"
    assert list(report["protocols"]["seen"]["methods"])[:2] == ["amint", "passive"]
    assert len(report["passive_training"]) == 2 and report["settings"]["n_boot"] == 200
    ledger = load_npz(run_dir / "ledger.npz")
    assert not ledger["heldout"].any() and not ledger["probe"].any()  # the loop never touched them
    steps_per_epoch = min(-(-ledger[s].size // 32) for s in ("members", "external"))  # zip stops at the shorter
    assert ledger["external"].sum() == 4 * ledger["external"].size  # external, the shorter split: all, every epoch
    assert 4 * (steps_per_epoch - 1) * 32 < ledger["members"].sum() <= 4 * steps_per_epoch * 32
    assert report["protocols"]["seen"]["members_excluded_not_consumed"] == int((ledger["members"] == 0).sum()) > 0
    config = json.loads((run_dir / "model_config.json").read_text())
    assert config["data_config"]["crop_pct"] == 1.0 and config["mint"]["taps"] == [0, 1]


def test_joint_loss_normalises_by_its_first_step_and_masks_rows():
    torch.manual_seed(0)
    logits, mint = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    is_member = torch.tensor([True, True, True, False, False, False])
    loss_fn = AMintLoss(task_weight=1.0, mint_weight=3.0)
    first = loss_fn(logits, mint, labels, is_member)
    assert first.item() == pytest.approx(4.0)  # each part divided by itself: 1 + 3
    first.backward()
    assert logits.grad[3:].abs().sum() == 0 and logits.grad[:3].abs().sum() > 0  # no task loss on external rows
    task0 = F.cross_entropy(logits[:3], labels[:3]).item()
    mint0 = F.binary_cross_entropy_with_logits(mint, is_member.float()).item()
    shifted = logits.detach() * 2, mint.detach() - 1
    expected = (F.cross_entropy(shifted[0][:3], labels[:3]) / task0
                + 3.0 * F.binary_cross_entropy_with_logits(shifted[1], is_member.float()) / mint0)
    assert loss_fn(*shifted, labels, is_member).item() == pytest.approx(expected.item(), rel=1e-6)
    raw = AMintLoss(normalize=False)(logits.detach(), None, labels, is_member)  # no MINT head: the task loss
    assert raw.item() == pytest.approx(task0, rel=1e-6) and np.isfinite(raw.item())
