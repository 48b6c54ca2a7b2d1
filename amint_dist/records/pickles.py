"""Vet a checkpoint's pickles before an engine opens them.

Accelerate reads optimizer and RNG states with ``torch.load(weights_only=True)`` but skips (with a log line)
a file that fails; DeepSpeed reads its model and optimizer states with ``weights_only=False``, which runs
whatever a pickle asks. Before either engine opens a checkpoint, every pickle-based file in it is opened here
with torch's weights-only unpickler, which builds tensors, containers, numbers and an allowlist of plain
engine types and calls nothing else: a planted pickle is refused with its name and never executed, even when
the trail that records it was rewritten along with it (an unsigned run).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays and dtypes of Accelerate's RNG states

PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def engine_safe_globals() -> list:
    """The types a checkpoint of our engines may hold besides tensors: Accelerate's RNG-state numpy types and
    DeepSpeed's ZeRO optimizer bookkeeping (an enum, a named tuple, the loss-scaler's plain attributes)."""
    allowed = list(TORCH_SAFE_GLOBALS)
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed: its checkpoints cannot be resumed anyway
        return allowed
    return allowed + [LossScaler, ZeroStageEnum, fragment_address]


def unsafe_pickle_problems(root: Path, names: Iterable[str]) -> list[str]:
    """The files among ``names`` (relative to ``root``) the weights-only unpickler refuses, one line each."""
    pickled = [n for n in names if n.endswith(PICKLED_SUFFIXES)]
    if not pickled:
        return []
    problems = []
    with torch.serialization.safe_globals(engine_safe_globals()):
        for name in pickled:
            try:  # mmap: tensors are mapped, not read; a non-zip (hand-made) pickle is refused outright
                torch.load(root / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any failure to load safely is a refusal, named below
                problems.append(f"{root / name} is not a weights-only pickle ({_reason(e)}): refusing to load it")
    return problems


def _reason(error: Exception) -> str:
    """The line of torch's long message that names what was refused (e.g. ``Unsupported global: ...``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "Unsupported" in line), lines[0])[:200]
