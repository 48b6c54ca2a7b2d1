"""FAMO loss balancing (Liu et al., NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization"), ``mint.balancer=famo``.

Two tasks, i = task CE and MINT BCE, with task-weight logits ``w`` and ``z = softmax(w)``. Each optimizer step
descends ``c * sum_i z_i * log L_i`` with ``c = 1 / sum_i (z_i / L_i)`` (the paper's Algorithm 1): the same
gradient as ``sum_i a_i * L_i`` with the detached weights ``a_i = (z_i / L_i) / sum_j (z_j / L_j)``, which is
what is backpropagated. After the step, ``w`` takes one step of its own Adam (``mint.famo_lr``, weight decay
``mint.famo_weight_decay``) on ``J_z^T delta``, ``delta_i = log L_i(before) - log L_i(after)``: the change of
each log-loss on the SAME batch, re-measured with the updated model (one extra forward without gradients, as
the official code does); a task whose loss fell faster loses weight.

Distributed: ``L_i`` is always the mean over ranks (all-reduced on the device), so ``a``, ``delta`` and hence
``w`` are identical on every rank, and the ranks' averaged gradient is FAMO's gradient of the global batch.
Under gradient accumulation the weights use each micro-batch's losses and ``delta`` is measured on the
step's last micro-batch. ``w`` and its Adam state are plain numbers in ``train_state.json`` (exact on resume).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amint_dist.train.losses import LossParts

EPS = 1e-8  # added to every loss before its log and its division (the official code's)
Reduce = Callable[[torch.Tensor], torch.Tensor]  # the mean of a device tensor over ranks


class Famo:
    """FAMO's task weights: a loss ``__call__`` (a ``LossCombiner`` stand-in) and :meth:`update` after the step."""

    norms = (1.0, 1.0)  # no first-step normalisation: scaling a loss leaves FAMO's direction and delta unchanged

    def __init__(self, task_weight: float, mint_weight: float, lr: float, weight_decay: float, mean: Reduce,
                 device: torch.device):
        """``task_weight`` and ``mint_weight`` give the initial ``z`` (normalised to sum 1); ``mean`` averages a
        tensor over ranks."""
        first = torch.tensor([task_weight, mint_weight], dtype=torch.float32, device=device)
        self.logits = (first / first.sum()).log().requires_grad_()  # softmax(logits) = the initial z
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self.mean = mean
        self._before: torch.Tensor | None = None  # the last micro-batch's losses (mean over ranks)

    def weights(self) -> torch.Tensor:
        """``z = softmax(w)`` (task, MINT)."""
        return torch.softmax(self.logits.detach(), 0)

    def _mean_losses(self, parts: LossParts) -> torch.Tensor:
        if parts.mint is None:
            raise ValueError("mint.balancer=famo needs the MINT loss (mint.mode=off trains one task)")
        return self.mean(torch.stack([parts.task, parts.mint]).detach().float()) + EPS

    def __call__(self, parts: LossParts) -> torch.Tensor:
        """``sum_i a_i * L_i`` with FAMO's detached weights ``a`` (see the module docstring)."""
        self._before = losses = self._mean_losses(parts)
        ratio = self.weights() / losses
        return (ratio / ratio.sum() * torch.stack([parts.task, parts.mint])).sum()

    def update(self, after: LossParts) -> None:
        """One Adam step on ``w`` from the losses of the same micro-batch measured after the optimizer step."""
        if self._before is None:
            raise RuntimeError("Famo.update before any weighted loss")
        delta = self._before.log() - self._mean_losses(after).log()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.logits, 0), self.logits, grad_outputs=delta)
        self.optimizer.zero_grad(set_to_none=True)
        self.logits.grad = grad
        self.optimizer.step()

    def scalars(self) -> dict[str, float]:
        """TensorBoard: the two task weights ``z``."""
        task, mint = self.weights().tolist()
        return {"train/famo_task_weight": task, "train/famo_mint_weight": mint}

    def state_dict(self) -> dict:
        """``w`` and its Adam state as plain numbers (float32 values: exact through JSON)."""
        adam = self.optimizer.state_dict()["state"].get(0, {})
        return {"logits": self.logits.tolist(), "adam": {k: v.tolist() for k, v in adam.items()}}

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(torch.tensor(saved["logits"], dtype=torch.float32))
        state = self.optimizer.state_dict()
        state["state"] = {0: {k: torch.tensor(v, dtype=torch.float32) for k, v in saved["adam"].items()}} \
            if saved["adam"] else {}
        self.optimizer.load_state_dict(state)
