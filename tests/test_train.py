"""Training: run directory contract, exact exposure ledger, resume, TensorBoard, MINT modes."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train_helpers import REPO, TINY, assert_same_ledger, cli_error, load_npz, run_train

EPOCHS = 2
COMMON = (f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", "train.exposure_log=true")


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory, train_root) -> Path:
    """Two epochs of the tiny model with the per-sample exposure trace on."""
    run_dir = tmp_path_factory.mktemp("runs") / "traced"
    run_train(run_dir, train_root, *COMMON)
    return run_dir


def read_trace(run_dir: Path) -> list[tuple[int, str, int, str]]:
    rows = []
    for f in sorted((run_dir / "exposure_log").glob("rank-*.tsv")):
        for line in f.read_text().splitlines():
            step, split, index, key = line.split("\t")
            rows.append((int(step), split, int(index), key))
    return rows


def test_run_dir_holds_every_artifact(traced_run):
    for name in ("config.yaml", "model.safetensors", "model_config.json", "ledger.npz", "metrics.jsonl"):
        assert (traced_run / name).is_file(), name
    latest = (traced_run / "checkpoints" / "latest").read_text().strip()
    assert (traced_run / "checkpoints" / latest / "train_state.json").is_file()
    lines = [json.loads(x) for x in (traced_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(EPOCHS))
    assert all(0.0 <= x["mint_acc_members"] <= 1.0 and x["task_loss"] > 0 for x in lines)
    config = json.loads((traced_run / "model_config.json").read_text())
    weights = safetensors.torch.load_file(traced_run / "model.safetensors")
    assert any(k.startswith("mint_head.") for k in weights) and any(k.startswith("backbone.") for k in weights)
    assert config["taps"] == [0, 1] and config["dataset"]["num_classes"] == 10


def test_ledger_equals_the_samples_the_loop_consumed(traced_run, train_root):
    trace = read_trace(traced_run)
    ledger = load_npz(traced_run / "ledger.npz")
    for split, counts in ledger.items():
        keys = (train_root / split / "keys.txt").read_text().split()
        assert counts.shape == (len(keys),)
        consumed = Counter(i for _, s, i, _ in trace if s == split)
        expected = np.zeros(len(keys), dtype=np.int64)
        for i, n in consumed.items():
            expected[i] = n
        np.testing.assert_array_equal(counts, expected, err_msg=split)
        assert all(keys[i] == k for _, s, i, k in trace if s == split), f"{split}: trace key != keys.txt[index]"
    # every member entered exactly one optimizer step per epoch; heldout never
    assert (ledger["members"] == EPOCHS).all()
    assert ledger["heldout"].sum() == 0 and ledger["external"].sum() > 0 and ledger["probe"].sum() > 0


def test_tensorboard_events_read_back(traced_run):
    events = EventAccumulator(str(traced_run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/task_loss", "train/task_acc", "train/mint_loss", "train/mint_acc_members",
                "train/mint_acc_external", "train/lr", "train/samples_per_s", "train/data_wait_frac"):
        assert tag in scalars, tag
    assert {"train/mint_score_members", "train/mint_score_external"} <= set(events.Tags()["histograms"])
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert max(lrs) > lrs[-1] > 0  # warm-up then cosine decay
    waits = [e.value for e in events.Scalars("train/data_wait_frac")]
    assert all(0.0 <= w <= 1.0 for w in waits)
    peaks = [e.value for e in events.Scalars("train/peak_memory_gib")]  # peak RSS on CPU: never falls
    assert 0.05 < peaks[0] <= peaks[-1] < 64 and peaks == sorted(peaks)
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(norms) == len(lrs) and all(math.isfinite(n) and n > 0 for n in norms)


def test_interrupted_run_resumes_to_the_same_ledger(tmp_path, train_root, traced_run):
    run_dir = tmp_path / "resumed"
    run_train(run_dir, train_root, *COMMON, "train.max_steps=31")
    first = load_npz(run_dir / "ledger.npz")
    n = len(first["members"])  # epoch 0: every member once (last batch padded), then 31 - ceil(n/32) full batches
    assert first["members"].sum() == n + (31 - math.ceil(n / 32)) * 32
    again = run_train(run_dir, train_root, *COMMON, check=False)
    assert again.returncode == 2 and "resume=latest" in again.stderr  # a second start needs resume
    run_train(run_dir, train_root, *COMMON, "resume=latest")
    assert_same_ledger(run_dir, traced_run)
    assert sorted(read_trace(run_dir)) == sorted(read_trace(traced_run))


@pytest.mark.parametrize("mode", ["off", "passive"])
def test_other_mint_modes_train(tmp_path, train_root, mode):
    run_dir = tmp_path / mode
    run_train(run_dir, train_root, f"mint.mode={mode}", "train.max_steps=4")
    weights = safetensors.torch.load_file(run_dir / "model.safetensors")
    assert any(k.startswith("mint_head.") for k in weights) == (mode == "passive")
    ledger = load_npz(run_dir / "ledger.npz")
    assert ledger["members"].sum() == 4 * 32


def test_grayscale_model_reads_grayscale_in_training_and_audit(tmp_path, train_root):
    """model.in_chans=1 end to end: 1-channel inputs (images converted to L, one mean/std) in training, in
    model_config.json and in the audit's reader."""
    from amint_dist.audit.run import audit_config, run_audit

    run_dir = tmp_path / "gray"
    run_train(run_dir, train_root, "model.in_chans=1", "train.max_steps=2")
    model_config = json.loads((run_dir / "model_config.json").read_text())
    assert model_config["model"]["in_chans"] == 1
    assert model_config["data_config"]["input_size"][0] == 1 and len(model_config["data_config"]["mean"]) == 1
    cfg = audit_config(REPO / "configs", run_dir)
    cfg["audit"].update({"protocols": ["seen"], "workers": 0, "n_boot": 20,
                         "passive": {**cfg["audit"]["passive"], "enabled": False}})
    report = json.loads((run_audit(cfg).parent / "report.json").read_text())
    assert report["scored"]["members"]["n"] > 0


@pytest.mark.parametrize("overrides, culprit", [
    (["mint.head.kind=transformer"], "transformer"),
    (["model.name=vit_nonexistent_patch99"], "vit_nonexistent_patch99"),
    (["mint.taps=[0,7]"], "7"),
    (["train.epoch=3"], "epoch"),
    (["resume=latest"], "no checkpoint"),
])
def test_bad_input_is_one_line_error(tmp_path, train_root, capsys, overrides, culprit):
    error = train_cli_error(tmp_path, train_root, overrides, capsys)
    assert culprit in error


def test_empty_external_split_is_refused(tmp_path, capsys):
    from amint_dist.data.prepare import prepare_dataset
    from conftest import prep_cfg

    root = tmp_path / "no_external"
    prepare_dataset(prep_cfg("digits", root, fractions={"members": 0.6, "probe": 0.1, "heldout": 0.3},
                             shard_maxcount=64))
    error = train_cli_error(tmp_path, root, ["train.max_steps=1"], capsys)
    assert "'external'" in error and "empty" in error


def train_cli_error(tmp_path: Path, data_root: Path, overrides: list[str], capsys) -> str:
    """Run launch/train.py's CLI in-process; it must exit 2 with exactly one ``error:`` line."""
    from amint_dist.train.loop import train

    argv = [f"run.dir={tmp_path / 'bad'}", f"data.root={data_root}", *TINY, *overrides]
    return cli_error("train", train, argv, capsys)


@pytest.mark.parametrize("accum", [1, 3])
def test_endless_loaders_with_workers_read_what_fresh_loaders_read_and_resume_exactly(tmp_path, train_root, accum):
    """data.workers=2: each split's loader is one endless iterator whose workers persist and read ahead across
    epoch ends. Every step reads exactly the member and external batches a fresh loader of its epoch yields (with grad_accum=3 an
    epoch's last batches short of a whole group are skipped, as before), and a run stopped mid-epoch and
    resumed consumes the same samples in the same order."""
    import torch

    from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader

    common = (*COMMON, "data.workers=2", f"train.grad_accum={accum}")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train(full, train_root, *common)

    def fresh(split: str, batch: int, epochs: range, whole_groups: bool = False) -> list[int]:
        stream = ShardedSplitStream(SplitShards.from_root(train_root, split), lambda img: torch.zeros(3, 2, 2),
                                    (3, 2, 2), batch, workers=2, seed=0)
        valid = []
        for epoch in epochs:
            stream.set_epoch(epoch)
            batches = list(make_loader(stream))
            for b in batches[:len(batches) // accum * accum] if whole_groups else batches:
                valid += [i for i, v in zip(b["index"].tolist(), b["valid"].tolist()) if v]
        return valid

    trace = read_trace(full)
    consumed = {s: [i for _, split, i, _ in trace if split == s] for s in ("members", "external")}
    assert consumed["members"] == fresh("members", 32, range(EPOCHS), whole_groups=True)
    assert consumed["external"] == fresh("external", 32, range(2 * EPOCHS))[:len(consumed["external"])]

    run_train(resumed, train_root, *common, f"train.max_steps={31 // accum}")
    run_train(resumed, train_root, *common, "resume=latest")
    assert read_trace(resumed) == trace


def test_compiled_model_trains_checkpoints_and_resumes_like_eager(tmp_path, train_root, traced_run):
    """train.compile=true (nn.Module.compile, in place): stopped mid-run and resumed, it consumes the eager run's
    samples in the same order and ends with the same weight names and (up to kernel rounding) values."""
    import torch

    run_dir = tmp_path / "compiled"
    run_train(run_dir, train_root, *COMMON, "train.compile=true", "train.max_steps=31")
    run_train(run_dir, train_root, *COMMON, "train.compile=true", "resume=latest")
    assert read_trace(run_dir) == read_trace(traced_run)
    compiled = safetensors.torch.load_file(run_dir / "model.safetensors")
    eager = safetensors.torch.load_file(traced_run / "model.safetensors")
    assert sorted(compiled) == sorted(eager)  # no "_orig_mod." prefixes: the audit loads it as it is
    flat = {run: torch.cat([w[k].flatten() for k in sorted(w)]) for run, w in (("compiled", compiled), ("eager", eager))}
    # Adam turns inductor's rounding into ~0.5% apart after 52 steps (not 0: the compiled kernels did run);
    # 52 steps move these weights by far more than 2%
    assert 0 < ((flat["compiled"] - flat["eager"]).norm() / flat["eager"].norm()).item() < 0.02
