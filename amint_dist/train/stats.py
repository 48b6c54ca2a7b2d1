"""Running training statistics over a window of micro-steps, reduced across ranks when logged."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from amint_dist.train.losses import LossParts

FIELDS = ("task_loss", "task_correct", "task_rows", "mint_loss", "mint_rows", "member_correct", "member_rows",
          "external_correct", "external_rows", "samples", "data_wait", "step_time", "steps")
DEVICE_FIELDS = FIELDS[:10]  # summed on the device where the batch is: no host sync per micro-step
MAX_HISTOGRAM_SCORES = 8192  # MINT rows kept for the window's score histograms (counted before masking)


def step_sums(batch: dict, logits: torch.Tensor, mint_logit: torch.Tensor | None, losses: LossParts) -> torch.Tensor:
    """One micro-step's :data:`DEVICE_FIELDS`, a float64 vector on the logits' device (no ``.item()``)."""
    task_rows, mint_rows = batch["task_mask"], batch["mint_mask"]
    n_task = task_rows.sum()
    zero = n_task.new_zeros(())
    values = {"task_loss": losses.task.detach().double() * n_task,
              "task_correct": ((logits.argmax(-1) == batch["label"]) & task_rows).sum(),
              "task_rows": n_task, "samples": batch["valid"].sum().to(n_task.device)}  # ``valid`` stays on the host
    if mint_logit is not None:
        predicted = mint_logit > 0
        for name, rows in (("member", batch["is_member"] & mint_rows), ("external", batch["is_external"] & mint_rows)):
            values[f"{name}_correct"] = ((predicted == (name == "member")) & rows).sum()
            values[f"{name}_rows"] = rows.sum()
        values["mint_rows"] = mint_rows.sum()  # members, external and shifted negatives
        values["mint_loss"] = losses.mint.detach().double() * values["mint_rows"]
    return torch.stack([values.get(name, zero).double() for name in DEVICE_FIELDS])


class StepStats:
    """Sums of per-step quantities (device sums, host timings; one float64 vector, one all-reduce, when logged)
    and recent MINT scores (kept on the device until read)."""

    def __init__(self) -> None:
        self.device_sums = torch.zeros(len(DEVICE_FIELDS), dtype=torch.float64)
        self.host_sums = torch.zeros(len(FIELDS) - len(DEVICE_FIELDS), dtype=torch.float64)  # data_wait, step_time, steps
        self.scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (probabilities, members, external)
        self._score_rows = 0

    def add(self, batch: dict, logits: torch.Tensor, mint_logit: torch.Tensor | None, losses: LossParts,
            data_wait: float, step_time: float) -> None:
        """One micro-step; no host sync (the sums stay where ``logits`` are)."""
        sums = step_sums(batch, logits, mint_logit, losses)
        self.device_sums = self.device_sums.to(sums.device) + sums
        self.host_sums += torch.tensor([data_wait, step_time, 1.0], dtype=torch.float64)
        if mint_logit is not None and self._score_rows < MAX_HISTOGRAM_SCORES:
            mint_rows = batch["mint_mask"]
            self.scores.append((torch.sigmoid(mint_logit.detach().float()), batch["is_member"] & mint_rows,
                                batch["is_external"] & mint_rows))
            self._score_rows += len(mint_logit)

    def vector(self) -> torch.Tensor:
        """Every field's sum in :data:`FIELDS` order, float64 on the CPU (a host sync on a GPU)."""
        return torch.cat([self.device_sums.cpu(), self.host_sums])

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Rank-summed ratios for logging (call on every rank: it is a collective). Every rank steps the same
        number of times in a window, so the ranks' count is the summed steps over this rank's."""
        mine = self.vector()
        s = dict(zip(FIELDS, reduce_sum(mine.clone()).tolist()))
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        local_steps = float(mine[FIELDS.index("steps")])
        world = s["steps"] / local_steps if local_steps else 1.0
        out = {
            "train/task_loss": ratio(s["task_loss"], s["task_rows"]),
            "train/task_acc": ratio(s["task_correct"], s["task_rows"]),
            "train/samples_per_s": ratio(s["samples"], s["step_time"] / world) if s["step_time"] else float("nan"),
            "train/data_wait_frac": ratio(s["data_wait"], s["step_time"]),
        }
        if s["member_rows"] or s["external_rows"]:
            out.update({
                "train/mint_loss": ratio(s["mint_loss"], s["mint_rows"]),
                "train/mint_acc_members": ratio(s["member_correct"], s["member_rows"]),
                "train/mint_acc_external": ratio(s["external_correct"], s["external_rows"]),
            })
        return out

    def sums_dict(self) -> dict[str, float]:
        """The sums by field name (saved per rank with a checkpoint)."""
        return dict(zip(FIELDS, self.vector().tolist()))

    def load_sums(self, sums: Mapping[str, float]) -> None:
        """Restore :meth:`sums_dict` output (fields unknown to this version are ignored)."""
        known = [float(sums.get(name, 0.0)) for name in FIELDS]
        self.device_sums = torch.tensor(known[:len(DEVICE_FIELDS)], dtype=torch.float64)
        self.host_sums = torch.tensor(known[len(DEVICE_FIELDS):], dtype=torch.float64)

    def mint_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's recent MINT probabilities for members and for external samples (a host sync)."""
        join = lambda xs: torch.cat(xs).cpu().numpy() if xs else np.zeros(0)  # noqa: E731
        return (join([p[members] for p, members, _ in self.scores]),
                join([p[external] for p, _, external in self.scores]))
