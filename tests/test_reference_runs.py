"""Reference runs (``data.subset``): the key-hash subset, exact epochs over it, its ledger, exact resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amint_dist.config import ConfigError
from amint_dist.data.config import DataConfig
from amint_dist.data.assignment import rank_batches
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.splits import hash_unit
from amint_dist.data.subset import SubsetRule
from train_helpers import assert_same_ledger, load_npz, run_train

REFERENCE = ("train.epochs=2", "data.subset.seed=3", "train.exposure_log=true", "mint.member_shift=1")


def keys_of(root: Path, split: str) -> list[str]:
    return (root / split / "keys.txt").read_text().split()


def test_subset_rule_is_the_documented_hash_stable_nested_and_seed_dependent(train_root):
    keys = keys_of(train_root, "members")
    half, third = SubsetRule(0, 0.5), SubsetRule(0, 0.3)
    assert half.kept(keys) == [hash_unit(0, f"subset:{k}") < 0.5 for k in keys]
    assert half.kept(keys) == SubsetRule(0, 0.5).kept(list(keys))  # a pure function of (seed, key)
    assert all(h or not t for h, t in zip(half.kept(keys), third.kept(keys)))  # 0.3 of the pool lies inside 0.5
    chosen = {seed: {k for k in keys if SubsetRule(seed, 0.5).keeps(k)} for seed in range(4)}
    assert all(0.4 < len(c) / len(keys) < 0.6 for c in chosen.values())
    overlap = len(chosen[0] & chosen[1]) / len(keys)  # independent seeds: about a quarter of the pool in both
    assert 0.15 < overlap < 0.35
    assert chosen[0] != chosen[1]


def test_subset_config_is_typed_and_refuses_a_pool_without_members():
    assert DataConfig.from_dict({}).reference_subset is None
    assert DataConfig.from_dict({"subset": {"pool": ["members", "heldout"], "seed": None}}).reference_subset is None
    cfg = DataConfig.from_dict({"subset": {"pool": ["members", "probe", "heldout"], "fraction": 0.25, "seed": 2}})
    assert cfg.reference_subset.rule() == SubsetRule(2, 0.25)
    with pytest.raises(ConfigError, match=r"^data\.subset\.pool=\['heldout'\]: expected distinct splits"):
        DataConfig.from_dict({"subset": {"pool": ["heldout"], "seed": 0}})
    with pytest.raises(ConfigError, match=r"^data\.subset\.pool=.*: validation is the tuning share"):
        DataConfig.from_dict({"subset": {"pool": ["members", "validation"], "seed": 0}})
    with pytest.raises(ConfigError, match=r"^data\.subset\.fraction=0: expected a number > 0 and <= 1"):
        DataConfig.from_dict({"subset": {"fraction": 0, "seed": 0}})


@pytest.mark.parametrize("world", [1, 2])
def test_subset_stream_reads_each_selected_sample_once_per_epoch_and_resumes_exactly(train_root, world):
    rule = SubsetRule(1, 0.5)
    shards = dataclasses.replace(SplitShards.from_root(train_root, "members"), subset=rule)
    keys = keys_of(train_root, "members")
    selected = {k for k in keys if rule.keeps(k)}
    assert sum(shards.read_lengths) == len(selected) and shards.lengths == SplitShards.from_root(
        train_root, "members").lengths  # on-disk lengths (and index ranges) unchanged
    in_shards = [keys[r.start:r.stop] for r in shards.index_ranges.values()]
    assert [[ks[i] for i in at] for ks, at in zip(in_shards, shards.read_positions)] == [
        [k for k in ks if rule.keeps(k)] for ks in in_shards]  # positions within each shard of what is read

    def stream(rank: int) -> ShardedSplitStream:
        return ShardedSplitStream(shards, lambda img: torch.zeros(1, 2, 2), (1, 2, 2), 8, rank=rank, world=world,
                                  workers=2, seed=0)

    def batches(rank: int, start: int = 0) -> list[dict]:
        s = stream(rank)
        s.set_epoch(1, start)
        return list(make_loader(s))

    read = []
    for rank in range(world):
        whole = batches(rank)
        assert len(whole) == len(stream(rank)) == rank_batches(len(selected), world, 8)  # from the selected samples
        read += [k for b in whole for k, v in zip(b["key"], b["valid"].tolist()) if v]
        resumed = batches(rank, start=5)
        assert [b["key"] for b in resumed] == [b["key"] for b in whole[5:]]
    assert sorted(read) == sorted(selected)  # every selected sample once, nothing else
    assert len(stream(0)) * 8 < shards.num_samples // world  # the unselected samples take no batch slots

    decoded = []  # in-process (no workers): the transform sees every decoded image
    for rank in range(world):
        for _ in ShardedSplitStream(shards, lambda img: decoded.append(1) or torch.zeros(1, 2, 2), (1, 2, 2), 8,
                                    rank=rank, world=world, workers=0, seed=0):
            pass
    assert len(decoded) == len(selected)  # unselected samples are dropped before decoding


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, train_root) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "r3"
    run_train(run_dir, train_root, *REFERENCE)
    return run_dir


@pytest.mark.slow
def test_reference_run_ledger_is_its_subset(reference_run, train_root):
    ledger = load_npz(reference_run / "ledger.npz")
    rule = SubsetRule(3, 0.5)
    for split in ("members", "heldout"):
        chosen = np.array(rule.kept(keys_of(train_root, split)))
        np.testing.assert_array_equal(ledger[split] > 0, chosen, err_msg=split)
    assert (ledger["members"][ledger["members"] > 0] == 2).all()  # the epoch-driving split: once per epoch
    assert (ledger["external"] > 0).all() and (ledger["probe"] > 0).all()  # outside the pool: read as usual
    trace = [line.split("\t") for f in sorted((reference_run / "exposure_log").glob("rank-*.tsv"))
             for line in f.read_text().splitlines()]
    heldout = keys_of(train_root, "heldout")
    assert {k for _, s, _, k in trace if s == "heldout"} == {k for k in heldout if rule.keeps(k)}


@pytest.mark.slow
def test_reference_run_resumes_to_the_same_ledger(tmp_path, train_root, reference_run):
    run_dir = tmp_path / "resumed"
    run_train(run_dir, train_root, *REFERENCE, "train.max_steps=17")
    run_train(run_dir, train_root, *REFERENCE, "resume=latest")
    assert_same_ledger(run_dir, reference_run)


FAKE_SRUN = """#!/usr/bin/env bash
# test double: runs the step here, without srun's options
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""


@pytest.mark.slow
def test_slurm_array_task_trains_its_subset_and_a_resubmitted_task_resumes(tmp_path, train_root):
    from train_helpers import ENV, REPO, TINY

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "55",
           "SLURM_JOB_ID": "56", "REFS_DIR": str(tmp_path / "refs"), "AMINT_REPO": str(REPO),
           "ACCELERATE_CONFIG": "configs/accelerate/single.yaml"}
    command = ["bash", str(REPO / "slurm" / "reference_models.sh"), f"data.root={train_root}", *TINY,
               "train.epochs=2", "train.max_steps=6"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "refs" / "r1"
    ledger = load_npz(run_dir / "ledger.npz")
    chosen = np.array(SubsetRule(1, 0.5).kept(keys_of(train_root, "heldout")))
    assert not (ledger["heldout"] > 0)[~chosen].any() and (ledger["heldout"] > 0).any()  # its subset, seed 1
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming from" in again.stdout + again.stderr, again.stderr[-3000:]
    np.testing.assert_array_equal(load_npz(run_dir / "ledger.npz")["heldout"], ledger["heldout"])


@pytest.mark.slow
def test_two_rank_reference_run_stopped_and_resumed_reads_its_subset_exactly_once_per_epoch(tmp_path, train_root):
    """DDP (2 gloo ranks): the ranks share the selected samples; stopped mid-run and resumed, every selected
    member still entered exactly one optimizer step per epoch, and nothing outside the subset was read."""
    from train_helpers import REPO, free_port

    def ddp() -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--main_process_port", str(free_port())]

    run_dir, common = tmp_path / "ddp", ("train.epochs=2", "data.subset.seed=5", "train.batch_size=16")
    run_train(run_dir, train_root, *common, "train.max_steps=15", launcher=ddp())
    run_train(run_dir, train_root, *common, "resume=latest", launcher=ddp())
    ledger, rule = load_npz(run_dir / "ledger.npz"), SubsetRule(5, 0.5)
    chosen = {s: np.array(rule.kept(keys_of(train_root, s))) for s in ("members", "heldout")}
    assert (ledger["members"][chosen["members"]] == 2).all() and not ledger["members"][~chosen["members"]].any()
    assert (ledger["heldout"] > 0).tolist() == chosen["heldout"].tolist()
