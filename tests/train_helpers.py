"""Helpers for tests that run the real training entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.img_size=16", "model.kwargs.patch_size=4", "model.kwargs.embed_dim=32", "model.kwargs.depth=2",
    "model.kwargs.num_heads=2", "mint.taps=[0,1]", "mint.head.channels=16", "mint.head.hidden=32",
    "data.workers=0", "train.log_every=5", "audit=false",
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
