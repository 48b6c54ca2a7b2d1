"""Save on signal: SIGUSR1 (Slurm's pre-time-limit signal) and SIGTERM (preemption, ``scancel``) only set a
flag; at each optimizer-step boundary the ranks agree on it (a MAX all-reduce over a gloo group: no device
sync, no collective in the handler), so every rank checkpoints at the same step and exits cleanly."""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Self

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """Installed (a context manager) around training; :meth:`agreed` is a collective every rank calls together."""

    def __init__(self, world: int):
        self.received = 0  # the last stop signal's number on this rank, 0 for none
        self.agreed_on = 0  # the signal the ranks agreed to stop for
        self._group = dist.new_group(backend="gloo") if world > 1 else None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal (a collective)."""
        if not self.agreed_on:
            flag = torch.tensor([self.received], dtype=torch.int64)
            if self._group is not None:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            self.agreed_on = int(flag)
        return bool(self.agreed_on)

    def name(self) -> str:
        """The agreed signal's name (SIGUSR1, SIGTERM)."""
        return signal.Signals(self.agreed_on).name


class Stopped(Exception):
    """Training stopped on a signal after checkpointing; ``resume=latest`` continues the run."""
