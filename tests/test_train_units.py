"""Loss, schedule and ledger building blocks of the training loop."""

from __future__ import annotations

import math
from pathlib import Path

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


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """No launcher precision unless a test sets one; Accelerate's process-wide state reset around the test."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(True)
    yield monkeypatch
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("launcher, setting, expected", [
    (None, "auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"),
    ("no", "auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"),
    ("bf16", "auto", "bf16"),  # accelerate launch --mixed_precision bf16 (or the accelerate config file)
    ("fp16", "auto", "fp16"),
    ("bf16", "bf16", "bf16"),  # the same value: no conflict
    (None, "fp16", "fp16"),  # explicit, nothing from Accelerate
    ("no", "bf16", "bf16"),  # 'no' is the launcher's default: no setting of its own
])
def test_precision_auto_takes_accelerates_setting(fresh_accelerate, launcher, setting, expected):
    from amint_dist.train.accelerator import resolve_precision

    if launcher:
        fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_precision(setting) == expected


def test_precision_contradicting_accelerate_is_refused_in_one_line(fresh_accelerate):
    from amint_dist.config import ConfigError
    from amint_dist.train.accelerator import resolve_precision

    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"^train.precision='fp16': accelerate launch set mixed_precision bf16") as e:
        resolve_precision("fp16")
    assert "\n" not in str(e.value)


def test_accelerate_launch_bf16_gives_a_bf16_accelerator_and_deepspeed_autocast(fresh_accelerate):
    from amint_dist.train.accelerator import deepspeed_config, make_accelerator, resolve_precision
    from amint_dist.train.config import OptimConfig, TrainConfig

    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator(TrainConfig(precision="auto"), OptimConfig()).mixed_precision == "bf16"
    ds = deepspeed_config(TrainConfig(), OptimConfig(), resolve_precision("auto"),
                          Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]


def test_typed_config_names_the_dotted_key_in_one_line():
    from amint_dist.config import ConfigError, help_lines
    from amint_dist.train.config import JobConfig

    good = {"model": {"name": "resnet18", "img_size": 32}, "mint": {"mode": "off"}, "data": {}, "optim": {},
            "train": {}}
    config = JobConfig.from_dict(good)
    assert config.train.precision == "auto" and config.optim.betas == (0.9, 0.999) and not config.mint.on
    for bad, message in [
        ({"train": {"epochs": "3"}}, "train.epochs='3': expected a positive integer"),
        ({"optim": {"betas": [0.9]}}, "optim.betas=[0.9]: expected 2 values, each a number >= 0 and < 1"),
        ({"mint": {"mode": "active", "head": {"kind": "conv", "width": 3}, "taps": "middle"}},
         "mint.head: unknown key(s) width; valid keys: channels, dropout, grid, hidden, kind"),
        ({"data": {"fractions": {"members": 2}}}, "data.fractions={'members': 2}: split fraction members=2.0"),
        ({"model": {"name": "resnet18", "img_size": 32, "in_chans": 2}}, "model.in_chans=2: expected one of [1, 3]"),
    ]:
        with pytest.raises(ConfigError) as e:
            JobConfig.from_dict({**good, **bad})
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    lines = help_lines(JobConfig)
    assert "train.precision: auto: Accelerate's mixed_precision if set, else bf16 on GPUs that have it, else no" in lines
    assert any(line.startswith("mint.head.kind: ") for line in lines) and not any(line.startswith("mint.head: ") for line in lines)
