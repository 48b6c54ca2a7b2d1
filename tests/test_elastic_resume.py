"""Elastic resume: ZeRO-2/3 (and DDP) checkpoints resumed at another world size (2 -> 1, 1 -> 2 gloo ranks on CPU).

Each run is stopped mid second epoch (``train.max_steps``) and resumed with another ``--num_processes``. The
resume must go back to the epoch-boundary checkpoint, load its weights exactly (read independently with
DeepSpeed's ``zero_to_fp32``), carry Adam's state on, follow the schedule of the new world size and end with
every member counted exactly once per epoch in the ledger.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from amint_dist.dist import tensors_sha256
from amint_dist.models import model_from_record
from amint_dist.train.checkpoint import _prune, latest_checkpoint
from amint_dist.train.elastic import resume_point, state_at
from amint_dist.train.state import TrainState
from test_distributed import ENGINES, checkpoints, launcher, train_state
from train_helpers import load_npz, run_train

EPOCHS = 2
MIN_LR = 1e-5
COMMON = (f"train.epochs={EPOCHS}", "train.ckpt_every_epochs=1", "train.keep_checkpoints=0", "optim.warmup_epochs=0.5",
          f"optim.min_lr={MIN_LR}")
STOP_AT = {2: 16, 1: 28}  # a step mid second epoch: 13 steps an epoch at 2 ranks, 25 at 1 (784 members, batch 32)


def world_launcher(engine: str, world: int) -> list[str]:
    return launcher(ENGINES[engine], "--num_processes", str(world))


def stopped_mid_epoch(engine: str, world: int, root: Path, data_root: Path) -> Path:
    """A run of ``world`` ranks stopped mid second epoch; asserts that it is."""
    run_dir = root / "run"
    run_train(run_dir, data_root, *COMMON, f"train.max_steps={STOP_AT[world]}", launcher=world_launcher(engine, world))
    latest = train_state(latest_checkpoint(run_dir))
    assert (latest["world_size"], latest["epoch"]) == (world, 1) and latest["batch_in_epoch"] > 0, latest
    return run_dir


def resume_entry(run_dir: Path) -> dict:
    lines = (run_dir / "audit_trail.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == "resume"][-1]


def saved_params_sha256(run_dir: Path, checkpoint: Path, engine: str) -> str:
    """sha256 of the checkpoint's parameters, read without our code: DDP's ``model.safetensors`` as Accelerate
    saved it, ZeRO's fp32 shards as DeepSpeed's own zero_to_fp32 consolidates them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if engine == "ddp":
        saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
        weights = {name.removeprefix("module."): tensor for name, tensor in saved.items()}
    else:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    model = model_from_record(json.loads((run_dir / "model_config.json").read_text()))
    return tensors_sha256((name, weights[name]) for name, _ in model.named_parameters())[0]


def adam_steps(checkpoint: Path, engine: str) -> float:
    """Adam's step count in a checkpoint's optimizer state (rank 0's), read with torch (the test's own files)."""
    if engine == "ddp":
        return float(torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"][0]["step"])
    shard = sorted((checkpoint / "pytorch_model").glob("*optim_states.pt"))[0]
    saved = torch.load(shard, weights_only=False, map_location="cpu")["optimizer_state_dict"]
    return float((saved.get("base_optimizer_state") or saved["optimizer_state_dict"])["state"][0]["step"])


@pytest.mark.slow
@pytest.mark.parametrize("engine, worlds", [("zero2", (2, 1)), ("zero2", (1, 2)), ("zero3", (2, 1)),
                                                    ("ddp", (2, 1))])
def test_checkpoint_resumes_at_another_world_size_from_the_epoch_boundary(engine, worlds, tmp_path, train_root):
    before, after = worlds
    run_dir = stopped_mid_epoch(engine, before, tmp_path, train_root)
    boundary = next(p for p in checkpoints(run_dir) if train_state(p)["batch_in_epoch"] == 0)  # epoch 1's start
    proc = run_train(run_dir, train_root, *COMMON, "resume=latest", launcher=world_launcher(engine, after))
    assert f"resumed {boundary.name} (world size {before}) at world size {after} from epoch 1's start" in proc.stdout
    entry = resume_entry(run_dir)
    assert (entry["checkpoint"], entry["from_world_size"], entry["world_size"]) == (boundary.name, before, after)
    assert entry["optimizer_state"].startswith("carried over (full state)" if engine == "ddp" else
                                               "carried over (DeepSpeed universal checkpoint")
    assert entry["params_sha256"] == saved_params_sha256(run_dir, boundary, engine)  # the weights, exactly
    ledger = load_npz(run_dir / "ledger.npz")
    assert (ledger["members"] == EPOCHS).all(), sorted(set(ledger["members"].tolist()))  # each member once an epoch
    last = checkpoints(run_dir)[-1]
    final = json.loads((last / "distributed.json").read_text())
    assert final["world_size"] == after and final["ranks"][0]["param_sha256"] != entry["params_sha256"]  # trained on
    epochs = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "epoch" in e]
    assert epochs[-1]["epoch"] == EPOCHS - 1 and train_state(last)["epoch"] == EPOCHS
    assert epochs[-1]["lr"] == pytest.approx(MIN_LR)  # the schedule ends with the last epoch at the new world size
    # Adam's state carried over: its step count went on from the checkpoint's (reset, it counts the steps since)
    assert adam_steps(last, engine) == train_state(last)["step"]


@pytest.mark.slow
def test_a_planted_pickle_is_refused_before_the_universal_conversion_opens_it(tmp_path, train_root):
    """ds_to_universal unpickles with weights_only=False: the checkpoint is verified before it runs."""
    from test_integrity import plant, rehash_file

    run_dir = stopped_mid_epoch("zero2", 2, tmp_path, train_root)
    boundary = next(p for p in checkpoints(run_dir) if train_state(p)["batch_in_epoch"] == 0)
    name, marker = "pytorch_model/mp_rank_00_model_states.pt", tmp_path / "unpickled"
    plant(boundary, name, marker, as_torch_file=True)
    rehash_file(run_dir, boundary, name)
    proc = run_train(run_dir, train_root, *COMMON, "resume=latest", check=False, launcher=world_launcher("zero2", 1))
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-3000:]
    assert f"{name} is not a weights-only pickle" in proc.stderr, proc.stderr[-3000:]


def fake_checkpoint(root: Path, step: int, epoch: int, batch_in_epoch: int, world: int) -> Path:
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    state = TrainState(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, world_size=world)
    (path / "train_state.json").write_text(json.dumps(state.to_dict()))
    return path


def test_resume_point_goes_back_to_the_newest_epoch_boundary_only_when_the_world_changes(tmp_path):
    fake_checkpoint(tmp_path, 13, 1, 0, 2)
    boundary = fake_checkpoint(tmp_path, 26, 2, 0, 2)
    latest = fake_checkpoint(tmp_path, 30, 2, 4, 2)
    assert resume_point(latest, 2) == latest and resume_point(latest, 1) == boundary == resume_point(boundary, 4)
    shutil.rmtree(tmp_path / "step-00000013")
    shutil.rmtree(boundary)
    with pytest.raises(ValueError, match="resume with world size 2 -> 1: step-00000030 is mid-epoch and no "
                                         "epoch-boundary checkpoint is kept; resume with --num_processes 2"):
        resume_point(latest, 1)


def test_state_at_another_world_starts_the_cycling_splits_next_epoch_and_refuses_mid_epoch():
    state = TrainState(step=13, epoch=1, cursors={"external": [3, 5], "probe": [1, 0]}, world_size=2)
    assert state_at(state, 1, None).cursors == {"external": [4, 0], "probe": [1, 0]} and state.world_size == 1
    assert state.schedule_shift is None  # set by the trainer, which knows the new world's steps per epoch
    layout = {"readers": 2, "batch_sizes": {"members": 32}}
    state = TrainState(step=13, epoch=1, cursors={"external": [3, 5]}, world_size=2, schedule_shift=4)
    moved = state_at(state, 2, layout)  # another reader layout, the same world: the schedule stays
    assert (moved.cursors, moved.schedule_shift, moved.layout) == ({"external": [4, 0]}, 4, layout)
    with pytest.raises(ValueError, match="step 9 is mid-epoch"):
        state_at(TrainState(step=9, batch_in_epoch=3), 1, None)


def test_pruning_keeps_the_newest_epoch_boundary_checkpoint(tmp_path):
    for step, epoch, batch in [(13, 1, 0), (20, 1, 7), (26, 2, 0), (30, 2, 4), (33, 2, 7), (36, 2, 10)]:
        fake_checkpoint(tmp_path, step, epoch, batch, 2)
    _prune(tmp_path, keep_last=2, keep="step-00000036")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000026", "step-00000033", "step-00000036"]



def test_a_smaller_world_drops_the_replayed_steps_from_the_trace_of_ranks_gone(tmp_path):
    """Resumed at step 3 on 1 rank: rank 1's trace (of the 2-rank run) keeps only steps before 3, like rank 0's."""
    from amint_dist.train.exposure_trace import ExposureTrace

    (tmp_path / "exposure_log").mkdir()
    for rank in (0, 1):
        lines = "".join(f"{step}\tmembers\t{rank * 10 + step}\tk{step}\n" for step in range(6))
        (tmp_path / "exposure_log" / f"rank-{rank:05d}.tsv").write_text(lines + "7\tmem")  # a torn last line
    ExposureTrace(tmp_path, 0, resume_step=3, world=1).close()
    for rank in (0, 1):
        trace = (tmp_path / "exposure_log" / f"rank-{rank:05d}.tsv").read_text()
        steps = [line.split("\t")[0] for line in trace.splitlines()]
        assert steps == ["0", "1", "2"], (rank, steps)
