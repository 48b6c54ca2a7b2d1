"""Helpers for tests that run the real training entry point in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.img_size=16", "model.kwargs.patch_size=4", "model.kwargs.embed_dim=32", "model.kwargs.depth=2",
    "model.kwargs.num_heads=2", "mint.taps=[0,1]", "mint.head.channels=16", "mint.head.hidden=32",
    "data.workers=0", "train.log_every=5", "run.audit=false",
    "mint.balancer=fixed",  # the tiny model's recipe: fixed weights (FAMO, the digits default, has its own tests)
]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(run_dir: Path, data_root: Path, *overrides: str, launcher: list[str] | None = None) -> list[str]:
    """``python launch/train.py`` (or ``launcher + [launch/train.py]``) with the tiny test model."""
    return (launcher or [sys.executable]) + [str(REPO / "launch" / "train.py"), f"run.dir={run_dir}",
                                             f"data.root={data_root}", *TINY, *overrides]


def run_train(run_dir: Path, data_root: Path, *overrides: str, check: bool = True, launcher: list[str] | None = None,
              timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run :func:`train_command` to the end (``env`` added to ENV); raise with its output tail when it fails
    and ``check``."""
    cmd = train_command(run_dir, data_root, *overrides, launcher=launcher)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_quick_audit(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python launch/audit.py`` on ``run_dir`` without the passive head, 20 bootstrap resamples, no loader
    workers; raise with its output tail when it fails."""
    cmd = [sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}", "audit.passive.enabled=false",
           "audit.n_boot=20", "audit.workers=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    if proc.returncode != 0:
        raise AssertionError(f"audit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli_error(config_name: str, main, argv: list[str], capsys) -> str:
    """A ``launch/`` CLI run in-process (``run_cli`` with ``main``); it must exit 2 with exactly one ``error:`` line,
    returned."""
    from amint_dist.cli import run_cli

    capsys.readouterr()  # only what the CLI prints (not the progress bars of a dataset the test prepared)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(str(REPO / "configs"), config_name, main, argv=argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (a ledger), read without pickles."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def assert_same_ledger(run_dir: Path, reference: Path) -> dict[str, np.ndarray]:
    """``run_dir/ledger.npz`` holds exactly the splits and counts of ``reference/ledger.npz``; returns it."""
    final, expected = load_npz(run_dir / "ledger.npz"), load_npz(reference / "ledger.npz")
    assert set(final) == set(expected)
    for split in expected:
        np.testing.assert_array_equal(final[split], expected[split], err_msg=split)
    return final


def free_port() -> int:
    """A TCP port nobody listens on right now (rendezvous, Slurm daemons)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
