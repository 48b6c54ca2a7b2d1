"""The aMINT multi-task loss: task CE on trained rows, MINT BCE on members (1) vs external (0), optionally focal and
with hard negatives weighted up."""

from __future__ import annotations

import math
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


def mint_loss(mint_logit: torch.Tensor, is_member: torch.Tensor, mask: torch.Tensor, member_weight: float = 1.0,
              focal_gamma: float = 0.0, hard_fraction: float = 0.0, hard_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of the membership logit, weighted mean over the rows in ``mask``: member rows weigh
    ``member_weight``, the hard negatives (:func:`hard_negative_weights`) ``hard_weight``, the others 1.
    ``focal_gamma`` > 0: each row's BCE times (1 - p_true)^gamma (focal loss; p_true = exp(-BCE))."""
    logit = mint_logit.float()
    losses = F.binary_cross_entropy_with_logits(logit, is_member.float(), reduction="none")
    if focal_gamma:
        losses = (-torch.expm1(-losses)).clamp(min=1e-12) ** focal_gamma * losses  # clamp: no inf gradient at 0
    weights = torch.where(is_member, member_weight, 1.0)
    if hard_fraction and hard_weight != 1.0:
        weights = weights * hard_negative_weights(logit, mask & ~is_member, hard_fraction, hard_weight)
    return _masked_mean(losses, mask, weights)


@torch.no_grad()
def hard_negative_weights(logit: torch.Tensor, negatives: torch.Tensor, fraction: float, weight: float) -> torch.Tensor:
    """``weight`` on the top ceil(``fraction`` x count) of the ``negatives`` rows by ``logit`` (ties: the earlier
    row), 1 on every other row; no host sync, no gradient."""
    scores = logit.detach().float().masked_fill(~negatives, -math.inf)
    order = scores.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    top = torch.ceil(negatives.sum(dtype=torch.float64) * fraction - 1e-6)  # 10 x 0.3 is 3.0000000000000004
    return torch.where(negatives & (rank < top), weight, 1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = mask.to(values.dtype) * (1.0 if weights is None else weights.to(values.dtype))
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


class AMintLoss:
    """The joint loss for a plain training loop, normalisation included: task CE on the ``task_mask`` rows (default:
    the members), MINT BCE on the ``mint_mask`` rows (default: all) with members labelled 1 and external rows 0.
    The first call fixes the normalisers from its own losses (one process: under several, average them over
    ranks and ``set_norms`` first, as the trainer does)."""

    def __init__(self, task_weight: float = 1.0, mint_weight: float = 1.0, normalize: bool = True,
                 member_weight: float = 1.0, focal_gamma: float = 0.0, hard_fraction: float = 0.0,
                 hard_weight: float = 1.0):
        self.combine = LossCombiner(task_weight, mint_weight, normalize)
        self.mint_options = {"member_weight": member_weight, "focal_gamma": focal_gamma,
                             "hard_fraction": hard_fraction, "hard_weight": hard_weight}

    def __call__(self, logits: torch.Tensor, mint_logit: torch.Tensor | None, labels: torch.Tensor,
                 is_member: torch.Tensor, task_mask: torch.Tensor | None = None,
                 mint_mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = LossParts(
            task_loss(logits, labels, is_member if task_mask is None else task_mask),
            None if mint_logit is None else mint_loss(
                mint_logit, is_member, torch.ones_like(is_member) if mint_mask is None else mint_mask,
                **self.mint_options))
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
