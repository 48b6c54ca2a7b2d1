"""Crash safety: SIGKILL a 2-process DDP run at several points (during a checkpoint write in epoch 0, mid-step in
epoch 1, during the final checkpoint write), resume each time, and compare with the uninterrupted run.

Every claim is read back from the files the runs wrote (docs/reliability.md maps each guarantee to its test).
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import safetensors.torch
from reliability_helpers import EPOCHS, metrics, scalars
from test_distributed import launcher, start
from test_train import read_trace
from train_helpers import assert_same_ledger, load_npz, run_train, train_command

from amint_dist.io import sha256_file
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TRAIL_NAME
from amint_dist.records.verification import verify_run
from amint_dist.train.checkpoint import latest_checkpoint

COMMON = (f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", "optim.lr=3e-3", "mint.head.dropout=0",
          "train.ckpt_every_steps=4", "train.keep_checkpoints=0", "train.exposure_log=true")
TIMING = {"data_wait_frac", "samples_per_s"}  # the only metrics a replay may change


class Launched:
    """A training launch whose ranks can be frozen (SIGSTOP) to look at the run dir, then killed."""

    def __init__(self, cmd: list[str], log: Path):
        self.proc, self.log = start(cmd, log), log
        deadline = time.monotonic() + 120
        while len(self.ranks()) < 2 and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.rank_procs = self.ranks()

    def ranks(self) -> list[psutil.Process]:
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "train.py" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # a short-lived child
                continue
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        for p in self.rank_procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                continue

    def freeze(self, stop: bool = True) -> None:
        self.signal(signal.SIGSTOP if stop else signal.SIGCONT)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.kill()
        psutil.wait_procs(self.rank_procs, timeout=30)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def kill_when(self, ready, timeout: float = 240):
        """Freeze the ranks as soon as ``ready()`` returns something, re-check it frozen, then SIGKILL; return it."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if ready():
                self.freeze()
                found = ready()
                if found:
                    self.kill()
                    return found
                self.freeze(False)
            time.sleep(0.002)
        raise AssertionError(f"no kill point reached (alive={self.alive()}):\n{self.log.read_text()[-3000:]}")


def partial_checkpoint(run_dir: Path, steps: range):
    """A checkpoint being written (hidden partial dir with files in it) at one of ``steps``."""
    try:
        for p in (run_dir / "checkpoints").glob(".step-*.partial"):
            step = int(p.name.split("-")[1].split(".")[0])
            contents = sorted(f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file())
            if step in steps and contents:
                return p, contents
    except OSError:  # renamed while listed
        return None
    return None


def between_checkpoints(run_dir: Path, after_step: int):
    """Mid-step: ``latest`` is past ``after_step`` in epoch >= 1 and no checkpoint is being written."""
    pointer = run_dir / "checkpoints" / "latest"
    try:
        state = json.loads((run_dir / "checkpoints" / pointer.read_text().strip() / "train_state.json").read_text())
    except (OSError, ValueError):
        return None
    if state["epoch"] >= 1 and state["step"] > after_step and not list((run_dir / "checkpoints").glob(".step-*")):
        return state
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_root) -> Path:
    """The uninterrupted 2-process DDP run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, train_root, *COMMON, launcher=launcher("ddp"))
    return run_dir


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, train_root, reference) -> tuple[Path, dict]:
    """The same run killed three times (during a checkpoint write in epoch 0, mid-step in epoch 1, during the
    final checkpoint write), each time resumed with ``resume=latest``; what was seen at each kill."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    total = json.loads((latest_checkpoint(reference) / "train_state.json").read_text())["step"]
    seen: dict = {}
    logs = run_dir.parent

    def launch(name: str, *extra: str) -> Launched:
        return Launched(train_command(run_dir, train_root, *COMMON, *extra, launcher=launcher("ddp")), logs / name)

    first = launch("a.log")
    seen["a"] = first.kill_when(lambda: partial_checkpoint(run_dir, range(8, 13)))
    seen["a_latest"] = latest_checkpoint(run_dir).name
    second = launch("b.log", "resume=latest")
    seen["b"] = second.kill_when(lambda: between_checkpoints(run_dir, after_step=15))
    seen["b_metrics"] = (run_dir / "metrics.jsonl").read_text()
    seen["b_latest"] = latest_checkpoint(run_dir).name
    third = launch("c.log", "resume=latest")
    seen["c"] = third.kill_when(lambda: partial_checkpoint(run_dir, range(total, total + 1)))
    seen["c_latest"] = latest_checkpoint(run_dir).name
    seen["logs"] = {n: (logs / n).read_text() for n in ("b.log", "c.log")}
    run_train(run_dir, train_root, *COMMON, "resume=latest", launcher=launcher("ddp"))
    seen["total"] = total
    return run_dir, seen


@pytest.mark.slow
def test_kills_land_where_intended_and_resume_takes_the_last_complete_checkpoint(crashed):
    run_dir, seen = crashed
    partial, contents = seen["a"]
    assert partial.exists() is False  # removed by the resumed run, never renamed into place
    step_a = int(partial.name.split("-")[1].split(".")[0])
    assert contents and int(seen["a_latest"].split("-")[1]) < step_a  # latest never named the half-written one
    assert f"resuming from {run_dir / 'checkpoints' / seen['a_latest']}" in seen["logs"]["b.log"]
    assert seen["b"]["epoch"] >= 1 and f"resuming from {run_dir / 'checkpoints' / seen['b_latest']}" in seen["logs"]["c.log"]
    final_partial, _ = seen["c"]
    assert final_partial.name == f".step-{seen['total']:08d}.partial" and seen["c_latest"] < f"step-{seen['total']:08d}"
    leftovers = [*(run_dir / "checkpoints").glob(".*"), *run_dir.glob(".*.tmp")]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_killed_run_ends_with_the_uninterrupted_ledger_weights_and_metrics(crashed, reference):
    run_dir, seen = crashed
    assert_same_ledger(run_dir, reference)
    ours, theirs = (safetensors.torch.load_file(d / "model.safetensors") for d in (run_dir, reference))
    for name in theirs:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    # metrics.jsonl: one line per epoch, the pre-crash line kept byte for byte, the rest equal to the reference's
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(x)["epoch"] for x in lines] == list(range(EPOCHS))
    assert seen["b_metrics"] and lines[0] == seen["b_metrics"].splitlines(keepends=True)[0]
    for got, want in zip(metrics(run_dir), metrics(reference)):
        assert set(got) == set(want)
        for k in set(want) - TIMING:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    # TensorBoard: the killed attempts' post-checkpoint points are purged, every step appears once
    for tag in ("train/task_loss", "train/mint_loss", "train/lr"):
        got, want = scalars(run_dir, tag), scalars(reference, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4, err_msg=tag)


@pytest.mark.slow
def test_killed_run_exposure_trace_equals_its_ledger_and_the_uninterrupted_trace(crashed, reference):
    """The trace is synced before every checkpoint: no step before the one resumed from is lost in a buffer."""
    run_dir, _ = crashed
    trace = read_trace(run_dir)
    ledger = load_npz(run_dir / "ledger.npz")
    assert Counter((split, index) for _, split, index, _ in trace) == {
        (split, i): int(n) for split, counts in ledger.items() for i, n in enumerate(counts) if n}
    assert trace == read_trace(reference)


@pytest.mark.slow
def test_killed_run_has_an_intact_audit_trail(crashed, train_root):
    run_dir, _ = crashed
    integrity = verify_run(run_dir, sha256_file(train_root / "splits.json"), Verifier())
    assert (integrity["status"], integrity["problems"]) == ("unsigned", [])  # intact, but no key signed it
    kinds = [json.loads(x)["kind"] for x in (run_dir / TRAIL_NAME).read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("resume") == 3 and kinds[-1] == "final"
