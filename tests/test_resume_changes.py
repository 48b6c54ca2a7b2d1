"""Resume with other overrides: recipe changes refused, allowed ones recorded; another reader layout (data.workers)
mid-epoch resumes from the epoch boundary, so the members' ledger stays that of the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from train_helpers import load_npz, run_train

COMMON = ("train.epochs=2", "optim.warmup_epochs=0.5", "train.exposure_log=true")
STOP = "train.max_steps=31"  # mid second epoch: 25 optimizer steps an epoch (784 members, batch 32)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_root) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_train(run_dir, train_root, *COMMON)
    return run_dir


def traced_counts(run_dir: Path, split: str, size: int) -> np.ndarray:
    """Per-sample counts of ``split`` in the run's exposure trace (what the steps consumed)."""
    counts = np.zeros(size, dtype=np.int64)
    for f in (run_dir / "exposure_log").glob("rank-*.tsv"):
        for index, n in Counter(int(line.split("\t")[2]) for line in f.read_text().splitlines()
                                if line.split("\t")[1] == split).items():
            counts[index] = n
    return counts


def assert_exact_ledger(run_dir: Path, reference: Path) -> None:
    """Every member counted as in ``reference`` (each once an epoch); every split's ledger is what was consumed."""
    ledger = load_npz(run_dir / "ledger.npz")
    np.testing.assert_array_equal(ledger["members"], load_npz(reference / "ledger.npz")["members"])
    for split, counts in ledger.items():
        np.testing.assert_array_equal(counts, traced_counts(run_dir, split, len(counts)), err_msg=split)


def test_mid_epoch_resume_with_other_workers_resumes_from_the_epoch_boundary(tmp_path, train_root, uninterrupted):
    run_dir = tmp_path / "workers"
    run_train(run_dir, train_root, *COMMON, "train.ckpt_every_epochs=1", STOP)
    bare = Path(shutil.copytree(run_dir, tmp_path / "bare"))  # the same run without its epoch-boundary checkpoint
    shutil.rmtree(bare / "checkpoints" / "step-00000025")
    proc = run_train(bare, train_root, *COMMON, "data.workers=2", "resume=latest", check=False)
    assert last_error(proc) == ("error: resume with readers per rank 1 -> 2: step-00000031 is mid-epoch and no "
                                "epoch-boundary checkpoint is kept; resume with --num_processes 1 and data.workers "
                                "giving 1 reader(s) per rank")
    proc = run_train(run_dir, train_root, *COMMON, "train.ckpt_every_epochs=1", "data.workers=2", "resume=latest")
    assert "resumed step-00000025 (readers per rank 1, batch sizes" in proc.stdout, proc.stdout[-2000:]
    assert_exact_ledger(run_dir, uninterrupted)
    resume = [e for e in map(json.loads, (run_dir / "audit_trail.jsonl").read_text().splitlines())
              if e["kind"] == "resume"][-1]
    assert resume["checkpoint"] == "step-00000025" and resume["from_layout"]["readers"] == 1
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    layout = json.loads((latest / "train_state.json").read_text())["layout"]
    assert layout == {"readers": 2, "batch_sizes": {"members": 32, "probe": 7, "external": 32}}


def last_error(proc) -> str:
    """The one ``error:`` line a refused start ends with (exit 2)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


def test_a_changed_recipe_is_refused_naming_every_key_and_allowed_changes_are_recorded(tmp_path, train_root):
    """Stopped after 2 steps: a resume changing recipe keys is refused in one line naming each with both values;
    one changing only allowed keys continues and ends bit for bit as the run that went straight to 4 steps
    (train.max_steps moves the run's end, not its LR schedule), with config.yaml as written by the first start
    and the changes in provenance.json and the trail's resume entry."""
    common = ("train.epochs=2", "optim.warmup_epochs=0")  # no warm-up: every step's LR is the cosine's
    run_train(tmp_path / "straight", train_root, *common, "train.max_steps=4")
    run_dir = tmp_path / "resumed"
    run_train(run_dir, train_root, *common, "train.max_steps=2")
    config = (run_dir / "config.yaml").read_bytes()
    proc = run_train(run_dir, train_root, *common, "train.max_steps=4", "mint.weight=5", "train.epochs=3",
                     "+data.augment.hflip=0.5", "resume=latest", check=False)
    assert last_error(proc).startswith("error: resume=latest: data.augment.hflip=None -> 0.5, mint.weight=3.0 -> 5.0, "
                                       f"train.epochs=2 -> 3 differ from {run_dir / 'config.yaml'}, the record of "
                                       "what this run trained: resume with its values, or start a new run.dir")
    allowed = ("train.max_steps=4", "train.log_every=1", "train.keep_checkpoints=1", "train.dist_timeout_s=600")
    run_train(run_dir, train_root, *common, *allowed, "resume=latest")
    assert (run_dir / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (run_dir / "config.yaml").read_bytes() == config
    changes = {"train.max_steps": [2, 4], "train.log_every": [5, 1], "train.keep_checkpoints": [2, 1],
               "train.dist_timeout_s": [1800, 600]}
    assert json.loads((run_dir / "provenance.json").read_text())["resumes"][-1]["config_changes"] == changes
    resume = [e for e in map(json.loads, (run_dir / "audit_trail.jsonl").read_text().splitlines())
              if e["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["config_changes"] == changes
