"""Running training statistics over a window of micro-steps, reduced across ranks when logged."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from amint_dist.train.losses import LossParts

FIELDS = ("task_loss", "task_correct", "task_rows", "mint_loss", "mint_rows", "member_correct", "member_rows",
          "external_correct", "external_rows", "samples", "data_wait", "step_time", "steps")
MAX_HISTOGRAM_SCORES = 8192


class StepStats:
    """Sums of per-step quantities (one float64 vector, one all-reduce) and recent MINT scores."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64)
        self.scores: dict[str, list[np.ndarray]] = {"members": [], "external": []}

    def add(self, batch: dict, logits: torch.Tensor, mint_logit: torch.Tensor | None, losses: LossParts,
            data_wait: float, step_time: float) -> None:
        task_rows = batch["task_mask"]
        values = {
            "task_loss": losses.task.item() * int(task_rows.sum()),
            "task_correct": int((logits.argmax(-1) == batch["label"])[task_rows].sum()),
            "task_rows": int(task_rows.sum()),
            "samples": int(batch["valid"].sum()),
            "data_wait": data_wait,
            "step_time": step_time,
            "steps": 1,
        }
        if mint_logit is not None:
            predicted = mint_logit > 0
            for name, rows in (("member", batch["is_member"] & batch["mint_mask"]),
                               ("external", batch["is_external"] & batch["mint_mask"])):
                target = name == "member"
                values[f"{name}_correct"] = int((predicted[rows] == target).sum())
                values[f"{name}_rows"] = int(rows.sum())
                kept = self.scores["members" if target else "external"]
                if sum(len(s) for s in kept) < MAX_HISTOGRAM_SCORES:
                    kept.append(torch.sigmoid(mint_logit[rows].float()).cpu().numpy())
            values["mint_rows"] = int(batch["mint_mask"].sum())  # members, external and shifted negatives
            values["mint_loss"] = losses.mint.item() * values["mint_rows"]
        for name, value in values.items():
            self.sums[FIELDS.index(name)] += value

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Rank-summed ratios for logging (call on every rank: it is a collective). Every rank steps the same
        number of times in a window, so the ranks' count is the summed steps over this rank's."""
        s = dict(zip(FIELDS, reduce_sum(self.sums.clone()).tolist()))
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        local_steps = float(self.sums[FIELDS.index("steps")])
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
        return dict(zip(FIELDS, self.sums.tolist()))

    def load_sums(self, sums: Mapping[str, float]) -> None:
        """Restore :meth:`sums_dict` output (fields unknown to this version are ignored)."""
        for name, value in sums.items():
            if name in FIELDS:
                self.sums[FIELDS.index(name)] = float(value)

    def mint_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's recent MINT probabilities for members and for external samples."""
        join = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return join(self.scores["members"]), join(self.scores["external"])
