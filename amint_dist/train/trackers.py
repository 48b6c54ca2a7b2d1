"""Optional experiment trackers beside TensorBoard, through Accelerate (``train.log_with``).

Accelerate's own trackers (``accelerator.init_trackers`` / ``log`` / ``end_training``) receive the same scalars
the run writes to ``RUN/tb`` at the same steps (``Monitor.forward``); the resolved config is their run
configuration. Local trackers (tensorboard, aim, dvclive) write under ``RUN/trackers``; hosted ones take their
usual environment (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI=file:...``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import filter_trackers, get_available_trackers
from accelerate.utils import LoggerType

from amint_dist.config import leaves
from amint_dist.tb import Monitor


def tracker_problem(names: Sequence[str]) -> str | None:
    """Why ``train.log_with`` cannot be honoured here (an unknown name, a tracker not installed), else None."""
    known = [t for t in LoggerType.list() if t != "all"]
    unknown = [n for n in names if n not in known]
    if unknown:
        return f"unknown tracker {unknown[0]!r}; Accelerate's trackers: {', '.join(known)}"
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    return f"{missing[0]} is not installed here (pip install {missing[0]})" if missing else None


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``a.b.c: value`` with lists and None as strings: what every tracker's run configuration accepts."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in leaves(config)}


def start_trackers(accelerator: Accelerator, names: Sequence[str], run_dir: Path, config: Mapping[str, Any],
                   monitor: Monitor) -> None:
    """Start Accelerate's ``names`` trackers (on the main process) and forward ``monitor``'s scalars to them."""
    if not names:
        return
    accelerator.project_configuration.logging_dir = str(run_dir / "trackers")
    accelerator.log_with = filter_trackers(list(names), accelerator.logging_dir)
    accelerator.init_trackers(run_dir.name, config=flat_config(config))
    monitor.forward = accelerator.log
