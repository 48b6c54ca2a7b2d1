"""The run directory's safety rules: what training may write into, and one writer at a time.

A floor module like :mod:`amint_dist.io` (plain files and ``fcntl``; nothing from training, audit or data).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"
RUN_MARKER = "config.yaml"  # training writes it first, once: a dir holding it is a run


class RunDirError(ValueError):
    """A run dir that may not be written: somebody's folder, a run started again without resume, or one in use."""


def _is_run(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def check_run_dir(path: Path, resume: str | None) -> None:
    """Refuse a ``run.dir`` training may not write into; reads only.

    Absent, or empty but for the lock file: a new run (refused with ``resume``: nothing to resume). Holding
    ``config.yaml``: a run, continued only with ``resume``. Anything else is somebody's folder: refused.
    """
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run.dir {path} exists and is not a directory")
    if not _is_run(path):
        content = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.exists() else []
        if content:
            listed = ", ".join(content[:5]) + (f" and {len(content) - 5} more" if len(content) > 5 else "")
            raise RunDirError(f"run.dir {path} exists, is not empty and is not a run (no {RUN_MARKER}): {listed}; "
                              "choose a new or empty run.dir")
        if resume:
            raise RunDirError(f"resume={resume}: no checkpoint to resume: {path} holds no run (no {RUN_MARKER})")
    elif not resume:
        raise RunDirError(f"run dir {path} already holds a run; pass resume=latest or another run.dir")


def claim_run_dir(path: Path, resume: str | None, purpose: str = "train") -> RunDirLock:
    """Check ``path`` (:func:`check_run_dir`), create it and take its lock; the check is repeated under the lock.

    A refused folder is left exactly as it was: nothing is created before the check passes. An existing run
    is locked first, so a run in use is refused as such.
    """
    if not _is_run(path):
        check_run_dir(path, resume)
    path.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(path, purpose).acquire()
    try:
        check_run_dir(path, resume)  # another writer may have started (or finished) in between
    except BaseException:
        lock.release()
        raise
    return lock


class RunDirLock:
    """Exclusive, non-blocking claim on a run dir: ``fcntl.flock`` on ``RUN/.lock``.

    ``acquire()`` takes it or raises :class:`RunDirError` naming the holder (pid, host, since when, purpose),
    which the holder writes into the file once it holds the lock, with its command line. As a context manager
    (``with RunDirLock(run, "audit"):``, acquired on entry unless held already) it is released on exit; the
    kernel releases it when the holder dies, so a SIGKILLed run leaves no stale lock. The lock file stays (it
    is not content: :func:`check_run_dir` ignores it). flock is advisory: every writer of this package takes
    it (rank 0 of training, the audit); on a network file system it holds only where the server supports it.
    """

    def __init__(self, run_dir: Path, purpose: str):
        self.path = Path(run_dir) / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"run dir not found: {self.path.parent}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"run dir {self.path.parent} is in use by {self._holder()}") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "purpose": self.purpose, "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _holder(self) -> str:
        """Who holds the lock, as its file says (it may not have written itself in yet)."""
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on host {h['host']} since {h['since']} ({h['purpose']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (not yet recorded in its lock file)"
