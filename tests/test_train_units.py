"""Loss, schedule and ledger building blocks of the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.losses import LossCombiner, LossParts, mint_loss, task_loss
from amint_dist.train.schedule import lr_at


def test_task_loss_ignores_masked_rows():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [9.0, -9.0]])
    labels = torch.tensor([0, 1, -1])
    mask = torch.tensor([True, True, False])
    expected = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    assert torch.isclose(task_loss(logits, labels, mask), expected)


def test_mint_loss_is_bce_over_masked_rows():
    logit = torch.tensor([2.0, -1.0, 5.0])
    member = torch.tensor([True, False, True])
    mask = torch.tensor([True, True, False])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit[:2], member[:2].float())
    assert torch.isclose(mint_loss(logit, member, mask), expected)


def test_combiner_normalises_by_first_step_values():
    combine = LossCombiner(task_weight=1.0, mint_weight=10.0, normalize=True)
    with pytest.raises(RuntimeError):
        combine(LossParts(torch.tensor(1.0), torch.tensor(1.0)))
    combine.set_norms(2.0, 0.5)
    total = combine(LossParts(torch.tensor(2.0), torch.tensor(0.25)))
    assert math.isclose(float(total), 1.0 + 10.0 * 0.5)
    plain = LossCombiner(1.0, 3.0, normalize=False)
    assert math.isclose(float(plain(LossParts(torch.tensor(2.0), None))), 2.0)


def test_lr_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 1e-3, 10, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-5)


def test_ledger_counts_valid_rows_and_round_trips(tmp_path):
    ledger = ExposureLedger({"members": 5, "external": 3})
    ledger.record("members", torch.tensor([0, 3, 3, -1]), torch.tensor([True, True, True, False]))
    np.testing.assert_array_equal(ledger.counts["members"], [1, 0, 0, 2, 0])
    ledger.save(tmp_path / "l.npz")
    back = ExposureLedger.load(tmp_path / "l.npz", {"members": 5, "external": 3})
    np.testing.assert_array_equal(back.counts["members"], ledger.counts["members"])
    with pytest.raises(ValueError, match="members"):
        ExposureLedger.load(tmp_path / "l.npz", {"members": 6, "external": 3})
