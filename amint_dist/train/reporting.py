"""Training statistics and skipped samples, gathered over ranks: TensorBoard windows, epoch lines, skip budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from accelerate.utils import gather_object

from amint_dist.records.ledger import ExposureLedger
from amint_dist.tb import Monitor
from amint_dist.train.batches import skipped_entries
from amint_dist.train.losses import LossParts
from amint_dist.train.skips import SkipBudget
from amint_dist.train.state import TrainState
from amint_dist.train.stats import StepStats

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class Reporter:
    """This rank's running statistics (a logging window and the epoch) and skips not yet merged; the merges
    are collectives: every rank calls :meth:`log_window`, :meth:`end_epoch` and :meth:`merge_skips` together."""

    def __init__(self, monitor: Monitor, skip_budget: SkipBudget, reduce_sum: ReduceSum, world: int):
        self.monitor, self.skip_budget, self.reduce_sum, self.world = monitor, skip_budget, reduce_sum, world
        self.window, self.epoch_stats = StepStats(), StepStats()
        self.pending_skips: list[tuple[str, str]] = []  # this rank's skipped samples not yet merged

    def add(self, batch: dict, logits: torch.Tensor, mint_logit: torch.Tensor | None, losses: LossParts,
            data_wait: float, step_time: float) -> None:
        """One micro-step's statistics into the window and the epoch."""
        for stats in (self.window, self.epoch_stats):
            stats.add(batch, logits, mint_logit, losses, data_wait=data_wait, step_time=step_time)

    def note_skips(self, parts: Mapping[str, dict]) -> None:
        """The samples this rank's readers skipped since their previous batches (merged at the next log)."""
        self.pending_skips.extend(skipped_entries(parts))

    def log_window(self, state: TrainState, ledger: ExposureLedger, lr: float,
                   local: Mapping[str, float] | None = None) -> dict[str, float]:
        """TensorBoard points of the window since the last, with ``local`` scalars of this rank (rank 0's are
        the ones written); returns the rank-summed summary."""
        self.merge_skips(state, ledger)
        summary = self.window.reduce(self.reduce_sum)
        summary["train/lr"] = lr
        summary.update(local or {})
        self.monitor.scalars(summary, state.step)
        members, external = self.window.mint_scores()
        self.monitor.histogram("train/mint_score_members", members, state.step)
        self.monitor.histogram("train/mint_score_external", external, state.step)
        self.window = StepStats()
        return summary

    def end_epoch(self, state: TrainState, ledger: ExposureLedger, lr: float) -> None:
        """The epoch's metrics.jsonl line (after merging its skips, judged against the budget)."""
        summary = self.epoch_stats.reduce(self.reduce_sum)
        self.merge_skips(state, ledger, epoch_end=True)
        self.monitor.epoch_line({"epoch": state.epoch, "step": state.step, "lr": lr,
                                 **{k.split("/", 1)[1]: round(v, 6) for k, v in summary.items()},
                                 "skipped": dict(state.skipped), "skipped_keys": state.epoch_skipped,
                                 "exposures_this_rank": ledger.total()})
        self.epoch_stats = StepStats()

    def merge_skips(self, state: TrainState, ledger: ExposureLedger, epoch_end: bool = False) -> None:
        """Gather every rank's new skips into the shared state (counts, this epoch's keys) and TensorBoard; every
        rank stops together when ``data.max_skip_fraction`` is exceeded."""
        mine = (self.pending_skips, sum(ledger.total().values()))
        gathered = gather_object([mine]) if self.world > 1 else [mine]
        self.pending_skips = []
        entries = [(str(what), str(reason)) for skips, _ in gathered for what, reason in skips]
        state.add_skips(entries)
        skipped = sum(state.skipped.values())
        read = skipped + sum(consumed for _, consumed in gathered)
        if entries:
            self.monitor.scalars({**{f"data/skipped/{r}": n for r, n in state.skipped.items()},
                                  "data/skipped_fraction": skipped / max(read, 1)}, state.step)
        self.skip_budget.check(state.skipped, read, epoch_end, state.epoch_skipped)

    def rank_state(self) -> dict:
        """This rank's sums, saved with a checkpoint."""
        return {"world_size": self.world, "window": self.window.sums_dict(), "epoch": self.epoch_stats.sums_dict()}

    def load_rank_state(self, saved: dict) -> None:
        """Continue this rank's sums from a checkpoint of the same world size (else start afresh)."""
        if saved.get("world_size") == self.world:
            self.window.load_sums(saved["window"])
            self.epoch_stats.load_sums(saved["epoch"])
