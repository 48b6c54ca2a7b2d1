"""FAMO loss balancing (mint.balancer=famo): the paper's gradient and weight update, its config rules, exact
resume of FAMO and EMA state (one stopped-and-resumed run against an uninterrupted one), determinism and
TensorBoard, and a real 2-rank DDP run whose ranks hold the same FAMO weights and EMA weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reliability_helpers import scalars
from test_distributed import ENGINES, launcher
from train_helpers import run_train

from amint_dist.config import ConfigError
from amint_dist.dist import tensors_sha256
from amint_dist.models import model_from_record
from amint_dist.models.config import MintConfig
from amint_dist.train.balancer import Famo
from amint_dist.train.losses import LossParts, mint_loss, task_loss

HEAD = {"kind": "conv", "channels": 8}


def famo(task_weight: float = 1.0, mint_weight: float = 3.0) -> Famo:
    return Famo(task_weight, mint_weight, lr=0.025, weight_decay=1e-3, mean=lambda t: t, device=torch.device("cpu"))


def parts_of(model: torch.nn.Linear, x: torch.Tensor) -> LossParts:
    out = model(x)
    labels, member = torch.arange(x.shape[0]) % 3, torch.arange(x.shape[0]) % 2 == 0
    every = torch.ones(x.shape[0], dtype=torch.bool)
    return LossParts(task_loss(out[:, :3], labels, every), mint_loss(out[:, 3], member, every))


def test_famo_gradient_is_the_papers_weighted_log_loss():
    """Backpropagating FAMO's loss gives c * sum_i z_i * grad log L_i with c = 1 / sum_i (z_i / L_i)."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(5, 4), torch.randn(8, 5)
    balancer = famo()
    z = balancer.weights()
    torch.testing.assert_close(z, torch.tensor([0.25, 0.75]))  # from mint.task_weight=1, mint.weight=3
    ours = torch.autograd.grad(balancer(parts_of(model, x)), list(model.parameters()))
    parts = parts_of(model, x)
    losses = torch.stack([parts.task, parts.mint])
    c = 1.0 / (z / losses.detach()).sum()
    papers = torch.autograd.grad(c * (z * losses.log()).sum(), list(model.parameters()))
    for a, b in zip(ours, papers):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("faster", ["task", "mint"])
def test_famo_update_moves_weight_away_from_the_task_whose_loss_fell_faster(faster):
    balancer = famo(1.0, 1.0)
    before = LossParts(torch.tensor(2.0), torch.tensor(0.7))
    balancer(before)
    fell = {"task": LossParts(torch.tensor(1.5), torch.tensor(0.69)), "mint": LossParts(torch.tensor(1.99), torch.tensor(0.5))}
    balancer.update(fell[faster])
    task, mint = balancer.weights().tolist()
    assert math.isclose(task + mint, 1.0, rel_tol=1e-6)
    assert (task < 0.5 < mint) if faster == "task" else (mint < 0.5 < task)


def test_famo_state_round_trips_exactly_through_json():
    first = famo()
    for task, mint in [(2.0, 0.7), (1.8, 0.69), (1.7, 0.6)]:
        first(LossParts(torch.tensor(task), torch.tensor(mint)))
        first.update(LossParts(torch.tensor(task * 0.9), torch.tensor(mint * 0.99)))
    second = famo()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.state_dict() == first.state_dict()
    for balancer in (first, second):  # one more step each: the Adam moments came back too
        balancer(LossParts(torch.tensor(1.6), torch.tensor(0.55)))
        balancer.update(LossParts(torch.tensor(1.5), torch.tensor(0.54)))
    assert torch.equal(first.logits, second.logits)


@pytest.mark.parametrize("values, message", [
    ({"mode": "active", "taps": [0], "head": HEAD, "balancer": "famo", "weight": 0},
     "mint.balancer='famo': FAMO starts from z = (task_weight, weight) normalised: both must be > 0"),
    ({"mode": "active", "taps": [0], "head": HEAD, "balancer": "pcgrad"}, "mint.balancer='pcgrad': expected one of"),
])
def test_famo_config_refusals_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MintConfig.from_dict(values)


def test_famo_has_nothing_to_balance_without_the_mint_loss():
    """The digits default is FAMO: its plain twin (mint.mode=off) must need no other override."""
    assert not MintConfig.from_dict({"mode": "off", "balancer": "famo"}).famo
    assert MintConfig.from_dict({"mode": "active", "taps": [0], "head": HEAD, "balancer": "famo"}).famo


# ---- real runs: exact resume, determinism, TensorBoard, DDP ----

STEPS, STOP = 12, 5
CONSTANT_LR = ("optim.warmup_epochs=0", "optim.min_lr=1e-3")  # optim.lr's default: max_steps leaves the lr alone
FAMO_EMA = ("mint.balancer=famo", "train.ema.decay=0.9", "train.keep_checkpoints=0", *CONSTANT_LR)


def final_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / latest / "train_state.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_root) -> Path:
    run_dir = tmp_path_factory.mktemp("famo") / "uninterrupted"
    run_train(run_dir, train_root, *FAMO_EMA, f"train.max_steps={STEPS}")
    return run_dir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, train_root) -> Path:
    """Stopped after step 5 (its end checkpoint), resumed with resume=latest to step 12."""
    run_dir = tmp_path_factory.mktemp("famo") / "resumed"
    run_train(run_dir, train_root, *FAMO_EMA, f"train.max_steps={STOP}")
    assert final_state(run_dir)["step"] == STOP
    run_train(run_dir, train_root, *FAMO_EMA, f"train.max_steps={STEPS}", "resume=latest")
    return run_dir


def test_stopped_and_resumed_run_has_the_uninterrupted_famo_ema_and_weights_bit_for_bit(uninterrupted, resumed):
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert (resumed / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    ours, theirs = final_state(resumed), final_state(uninterrupted)
    assert ours["step"] == theirs["step"] == STEPS and ours["balancer"] == theirs["balancer"]
    assert ours["balancer"]["adam"]["step"] == STEPS  # one FAMO update per optimizer step
    assert torch.softmax(torch.tensor(ours["balancer"]["logits"]), 0).tolist() != pytest.approx([0.25, 0.75], abs=1e-3)


def test_famo_weights_reach_tensorboard_and_follow_the_same_trajectory(uninterrupted, resumed):
    """Same seed, same weights at every logged step (the resumed run's from step 6 on come from its checkpoint)."""
    task, mint = (scalars(uninterrupted, f"train/famo_{t}_weight") for t in ("task", "mint"))
    assert [s for s, _ in task] == [5, 10] and [s for s, _ in mint] == [5, 10]
    assert all(math.isclose(a + b, 1.0, rel_tol=1e-6) for (_, a), (_, b) in zip(task, mint))
    assert task[0][1] != task[1][1]  # the weights move
    assert scalars(resumed, "train/famo_task_weight") == task


def test_famo_and_ema_update_once_per_optimizer_step_under_gradient_accumulation(tmp_path, train_root):
    """train.grad_accum=2: two micro-batches per optimizer step, one FAMO update and one EMA update per step."""
    run_dir = tmp_path / "accum"
    run_train(run_dir, train_root, "mint.balancer=famo", "train.ema.decay=0.5", "train.grad_accum=2",
              "train.max_steps=2", "train.ckpt_every_steps=1", "train.keep_checkpoints=0")
    steps = [run_dir / "checkpoints" / f"step-{s:08d}" for s in (1, 2)]
    assert [json.loads((d / "train_state.json").read_text())["balancer"]["adam"]["step"] for d in steps] == [1, 2]
    first, second = (safetensors.torch.load_file(str(d / "model.safetensors")) for d in steps)
    ema = safetensors.torch.load_file(str(steps[1] / "ema.safetensors"))
    for name, value in second.items():
        if value.is_floating_point():
            torch.testing.assert_close(ema[name], first[name].lerp(value, 0.5), rtol=1e-6, atol=1e-7, msg=name)


def test_resuming_with_famo_or_ema_from_a_checkpoint_without_them_is_one_line(tmp_path, train_root):
    """Both change the recipe config.yaml recorded (train.resume_config): refused before the checkpoint loads."""
    run_dir = tmp_path / "plain"
    run_train(run_dir, train_root, "train.max_steps=1")
    for override, message in [("mint.balancer=famo", "mint.balancer='fixed' -> 'famo' differ from"),
                              ("train.ema.decay=0.9", "train.ema.decay=None -> 0.9 differ from")]:
        proc = run_train(run_dir, train_root, "train.max_steps=2", "resume=latest", override, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: resume=latest: ") and message in last, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_ranks_hold_the_same_famo_and_ema_weights(tmp_path, train_root, engine):
    """Two gloo ranks over different data: every checkpoint's distributed.json holds each rank's FAMO logits and
    EMA parameters' digest (a checkpoint of diverging ranks is refused), equal, and the EMA file is what they hold.
    ZeRO-3 refuses the EMA (test_ema.py): FAMO alone there."""
    run_dir = tmp_path / engine
    overrides = [o for o in FAMO_EMA if engine != "zero3" or not o.startswith("train.ema")]
    run_train(run_dir, train_root, *overrides, "train.max_steps=9", "train.ckpt_every_steps=3",
              launcher=launcher(ENGINES[engine]))
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == [f"step-{s:08d}" for s in (3, 6, 9)]
    config = json.loads((run_dir / "model_config.json").read_text())
    parameter_names = [n for n, _ in model_from_record(config).named_parameters()]
    logits = []
    for ckpt in checkpoints:
        agreement = json.loads((ckpt / "distributed.json").read_text())
        ranks = agreement["ranks"]
        assert agreement["engine"] == engine and [r["rank"] for r in ranks] == [0, 1]
        for key in ("param_sha256", "famo_logits", *(["ema_param_sha256"] if engine != "zero3" else [])):
            assert ranks[0][key] == ranks[1][key], (ckpt.name, key)
        assert json.loads((ckpt / "train_state.json").read_text())["balancer"]["logits"] == ranks[0]["famo_logits"]
        logits.append(ranks[0]["famo_logits"])
        if engine != "zero3":
            ema = safetensors.torch.load_file(str(ckpt / "ema.safetensors"))  # parameters, then rank 0's buffers
            assert tensors_sha256((k, ema[k]) for k in parameter_names)[0] == ranks[0]["ema_param_sha256"]
    assert logits[0] != logits[-1]
