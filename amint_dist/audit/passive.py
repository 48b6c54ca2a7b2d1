"""Passive MINT, the paper's baseline: a fresh head of the audited head's kind, trained on the
frozen audited model's taps to tell members (1) from external samples (0).

Short and deterministic: fixed seed for the head's initialisation, dropout and the shard and
sample shuffles; the two classes weigh equally in the loss whatever their sizes. Under several
ranks every rank trains on its own shards and gradients are averaged (one all-reduce per step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from amint_dist.data.pipeline import ShardedSplitStream, make_loader
from amint_dist.models import AuditableModel, build_auditable_model
from amint_dist.train.losses import mint_loss

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def fresh_head(model_config: Mapping[str, Any], seed: int) -> nn.Module:
    """A newly initialised MINT head configured like the audited model's (same kind, taps, sizes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_auditable_model(model_config["model"], {**model_config["mint"], "mode": "passive"}).mint_head


def train_passive(audited: AuditableModel, head: nn.Module, members: ShardedSplitStream,
                  external: ShardedSplitStream, epochs: int, lr: float, seed: int, device: torch.device,
                  autocast: Callable[[], AbstractContextManager], reduce_sum: ReduceSum, world: int) -> list[dict]:
    """Train ``head`` in place on ``audited``'s frozen taps; return per-epoch loss and accuracies (all ranks)."""
    audited.backbone.requires_grad_(False)
    model = AuditableModel(audited.backbone, head, audited.taps, "passive").to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    params = [p for p in head.parameters() if p.requires_grad]
    history = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            members.set_epoch(epoch)
            external.set_epoch(epoch)
            model.backbone.eval()
            head.train()
            sums = torch.zeros(5, dtype=torch.float64)  # loss * steps, member hits, members, external hits, external
            for pos, neg in zip(make_loader(members), make_loader(external)):
                images = torch.cat([pos["image"][pos["valid"]], neg["image"][neg["valid"]]]).to(device)
                n_pos = int(pos["valid"].sum())
                is_member = (torch.arange(len(images)) < n_pos).to(device)
                optimizer.zero_grad(set_to_none=False)
                if len(images) > 1:  # a padding-only batch still joins the gradient all-reduce
                    with autocast():
                        _, logit = model(images)
                    loss = 0.5 * (mint_loss(logit, is_member, is_member) + mint_loss(logit, is_member, ~is_member))
                    loss.backward()
                    hits = ((logit.detach() > 0) == is_member).cpu()
                    member_rows = is_member.cpu()
                    sums += torch.tensor([loss.item(), hits[member_rows].sum().item(), n_pos,
                                          hits[~member_rows].sum().item(), len(images) - n_pos], dtype=torch.float64)
                if world > 1:
                    _average_gradients(params, reduce_sum, world)
                optimizer.step()
            history.append(_epoch_summary(epoch, reduce_sum(sums)))
    return history


def _average_gradients(params: list[nn.Parameter], reduce_sum: ReduceSum, world: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = reduce_sum(torch.cat([g.reshape(-1) for g in grads]).cpu()) / world
    torch.nn.utils.vector_to_parameters(flat.to(params[0].device), grads)
    for p, g in zip(params, grads):
        p.grad = g


def _epoch_summary(epoch: int, sums: torch.Tensor) -> dict:
    loss, member_hits, members, external_hits, external = sums.tolist()
    steps_note = max(members + external, 1)
    return {
        "epoch": epoch,
        "loss_sum": loss,
        "member_accuracy": member_hits / members if members else float("nan"),
        "external_accuracy": external_hits / external if external else float("nan"),
        "samples": int(steps_note),
    }
