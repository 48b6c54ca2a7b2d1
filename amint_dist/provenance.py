"""Where a run came from: the command line, package versions, git revision, host and time.

A floor module like :mod:`amint_dist.io` (nothing from training, audit or data). The entry points record
their command line here (:func:`record_command`, called by :mod:`amint_dist.cli`); training writes
:func:`collect` to ``RUN/provenance.json`` right after ``config.yaml`` and the audit puts it in report.json.
Nothing here fails a run: a value that cannot be read is ``None`` (the git revision and dirtiness are ``None``
unless this package is loaded from a git checkout of its own repository).
"""

from __future__ import annotations

import datetime
import json
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from amint_dist.io import atomic_write_json

PROVENANCE_NAME = "provenance.json"
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "deepspeed", "webdataset", "hydra-core", "numpy",
            "amint-dist")
_REPO = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) this package was loaded from

_command: dict[str, Any] | None = None


def record_command(entry_point: str, overrides: list[str], flags: list[str] | None = None,
                   sweep: list[str] | None = None) -> None:
    """Remember the command line of what this process runs now, for :func:`collect`: an entry point's overrides
    and flags; in a ``-m`` sweep the job's own overrides, and the whole sweep's as ``sweep``."""
    global _command
    _command = {"entry_point": entry_point, "overrides": list(overrides), "flags": list(flags or []),
                "sweep": None if sweep is None else list(sweep)}


def recorded_command() -> dict[str, Any] | None:
    """What :func:`record_command` stored; ``None`` when no entry point ran (``train()`` called from Python)."""
    return None if _command is None else {k: list(v) if isinstance(v, list) else v for k, v in _command.items()}


def package_versions() -> dict[str, str | None]:
    """Python's version and each of :data:`PACKAGES`' installed version (``None``: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(path: Path = _REPO) -> dict[str, Any]:
    """``{"revision": HEAD's sha, "dirty": bool}`` of the git checkout holding ``path``; both ``None`` outside
    one (or without git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    found = (git("rev-parse", "--show-toplevel", "HEAD") or "").split()
    if len(found) != 2 or Path(found[0]).resolve() != path.resolve():  # not a checkout of this project
        return {"revision": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": found[1], "dirty": None if status is None else bool(status.strip())}


def collect() -> dict[str, Any]:
    """This process's provenance: command (or ``None``), argv, versions, git, host, UTC time."""
    return {
        "command": recorded_command(),
        "argv": list(sys.argv),
        "versions": package_versions(),
        "git": git_state(),
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_provenance(run_dir: str | Path, resumed_at_step: int | None = None,
                     changes: dict[str, list] | None = None) -> dict[str, Any]:
    """Write ``run_dir/provenance.json`` (atomically; rank 0 only): this start's :func:`collect`. A resumed run
    keeps the first start's record and appends this one to its ``resumes`` list (with the step it resumed at and
    ``changes``: ``{key: [config.yaml's value, this start's]}`` of the config keys a resume may change)."""
    path = Path(run_dir) / PROVENANCE_NAME
    record = collect()
    if resumed_at_step is not None:
        try:
            first = json.loads(path.read_text())
        except (OSError, ValueError):
            first = None
        resume = {**record, "step": resumed_at_step, "config_changes": changes or {}}
        if isinstance(first, dict):
            record = {**first, "resumes": [*first.get("resumes", []), resume]}
        else:
            record = {**record, "resumes": [], "note": f"{PROVENANCE_NAME} of the first start was missing"}
    atomic_write_json(path, record)
    return record
