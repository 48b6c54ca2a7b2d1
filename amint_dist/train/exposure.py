"""The one recorder of exposure: every consumed sample counted in the ledger and, optionally, traced."""

from __future__ import annotations

from collections.abc import Mapping

from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.exposure_trace import ExposureTrace


class ExposureRecorder:
    """Updates the rank's :class:`ExposureLedger` and, with ``train.exposure_log``, its :class:`ExposureTrace`."""

    def __init__(self, ledger: ExposureLedger, trace: ExposureTrace | None = None):
        self.ledger, self.trace = ledger, trace

    def record(self, step: int, parts: Mapping[str, dict]) -> None:
        """The valid rows of a micro-step's dataset splits (shifted copies are no samples) for optimizer step ``step``."""
        for split, batch in parts.items():
            if split not in self.ledger.counts:
                continue
            self.ledger.record(split, batch["index"], batch["valid"])
            if self.trace:
                self.trace.record(step, split, batch)

    def sync(self) -> None:
        """Make the trace durable (before a checkpoint that covers it)."""
        if self.trace:
            self.trace.sync()

    def close(self) -> None:
        if self.trace:
            self.trace.close()
