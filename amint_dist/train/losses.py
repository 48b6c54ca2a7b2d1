"""The aMINT multi-task loss: task CE on trained rows, MINT BCE on members (1) vs external (0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    task: torch.Tensor
    mint: torch.Tensor | None


def task_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the rows in ``mask`` (zero, with gradient, when none)."""
    losses = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    return _masked_mean(losses, mask)


def mint_loss(mint_logit: torch.Tensor, is_member: torch.Tensor, mask: torch.Tensor,
              member_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of the membership logit over the rows in ``mask``; member rows weigh ``member_weight``."""
    losses = F.binary_cross_entropy_with_logits(mint_logit.float(), is_member.float(), reduction="none")
    return _masked_mean(losses, mask, torch.where(is_member, member_weight, 1.0))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = mask.to(values.dtype) * (1.0 if weights is None else weights.to(values.dtype))
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


class AMintLoss:
    """The joint loss for a plain training loop, normalisation included: task CE on the ``task_mask`` rows (default:
    the members), MINT BCE on the ``mint_mask`` rows (default: all) with members labelled 1 and external rows 0.
    The first call fixes the normalisers from its own losses (one process: under several, average them over
    ranks and ``set_norms`` first, as the trainer does)."""

    def __init__(self, task_weight: float = 1.0, mint_weight: float = 1.0, normalize: bool = True,
                 member_weight: float = 1.0):
        self.combine = LossCombiner(task_weight, mint_weight, normalize)
        self.member_weight = member_weight

    def __call__(self, logits: torch.Tensor, mint_logit: torch.Tensor | None, labels: torch.Tensor,
                 is_member: torch.Tensor, task_mask: torch.Tensor | None = None,
                 mint_mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = LossParts(
            task_loss(logits, labels, is_member if task_mask is None else task_mask),
            None if mint_logit is None else mint_loss(
                mint_logit, is_member, torch.ones_like(is_member) if mint_mask is None else mint_mask,
                self.member_weight))
        if self.combine.norms is None:
            self.combine.set_norms(parts.task.item(), 1.0 if parts.mint is None else parts.mint.item())
        return self.combine(parts)


class LossCombiner:
    """``L = w_task * L_task / n_task + w_mint * L_mint / n_mint``; n's = first-step values when normalising."""

    def __init__(self, task_weight: float, mint_weight: float, normalize: bool):
        self.task_weight, self.mint_weight, self.normalize = task_weight, mint_weight, normalize
        self.norms: tuple[float, float] | None = None if normalize else (1.0, 1.0)

    def set_norms(self, task: float, mint: float) -> None:
        """Fix the normalisers (first-step losses, averaged over ranks; restored on resume)."""
        self.norms = (max(task, 1e-8), max(mint, 1e-8))

    def __call__(self, parts: LossParts) -> torch.Tensor:
        if self.norms is None:
            raise RuntimeError("loss normalisers not set: call set_norms with the first step's losses")
        total = self.task_weight * parts.task / self.norms[0]
        if parts.mint is not None:
            total = total + self.mint_weight * parts.mint / self.norms[1]
        return total
