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
from amint_dist.models import AuditableModel, model_from_record
from amint_dist.progress import progress
from amint_dist.train.losses import mint_loss

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def fresh_head(model_config: Mapping[str, Any], seed: int) -> nn.Module:
    """A newly initialised MINT head configured like the audited model's (same kind, taps, sizes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_from_record(model_config, mode="passive").mint_head


def train_passive(audited: AuditableModel, head: nn.Module, members: ShardedSplitStream,
                  external: ShardedSplitStream, epochs: int, lr: float, seed: int, device: torch.device,
                  autocast: Callable[[], AbstractContextManager], reduce_sum: ReduceSum, world: int,
                  show: bool = False) -> list[dict]:
    """Train ``head`` in place on ``audited``'s frozen taps; return per-epoch loss and accuracies (all ranks).
    ``show``: a progress bar over the epochs (rank 0)."""
    audited.backbone.requires_grad_(False)
    model = AuditableModel(audited.backbone, head, audited.taps, "passive").to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    params = [p for p in head.parameters() if p.requires_grad]
    history = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with progress(range(epochs), desc="audit: passive head", unit="epoch", enabled=show) as bar:
            for epoch in bar:
                members.set_epoch(epoch)
                external.set_epoch(epoch)
                model.backbone.eval()
                head.train()
                sums = torch.zeros(6, dtype=torch.float64)  # loss, steps, member hits, members, external hits, external
                for pos, neg in zip(make_loader(members), make_loader(external)):
                    images = torch.cat([pos["image"][pos["valid"]], neg["image"][neg["valid"]]]).to(device)
                    is_member = (torch.arange(len(images)) < int(pos["valid"].sum())).to(device)
                    optimizer.zero_grad(set_to_none=True)
                    stepped = len(images) > 1  # a padding-only batch still joins the gradient all-reduce
                    if stepped:
                        with autocast():
                            _, logit = model(images)
                        loss = 0.5 * (mint_loss(logit, is_member, is_member) + mint_loss(logit, is_member, ~is_member))
                        loss.backward()
                        sums += _batch_sums(loss, logit, is_member)
                    if world > 1:
                        _average_gradients(params, reduce_sum, world)
                    if stepped or world > 1:  # every rank steps with the same averaged gradients
                        optimizer.step()
                history.append(_epoch_summary(epoch, reduce_sum(sums)))
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
    if world > 1:
        _average_buffers(head, reduce_sum, world)  # e.g. BatchNorm statistics: one head on every rank
    return history


def _batch_sums(loss: torch.Tensor, logit: torch.Tensor, is_member: torch.Tensor) -> torch.Tensor:
    hits = ((logit.detach() > 0) == is_member).cpu()
    member = is_member.cpu()
    return torch.tensor([loss.item(), 1, hits[member].sum(), member.sum(), hits[~member].sum(), (~member).sum()],
                        dtype=torch.float64)


def _average_gradients(params: list[nn.Parameter], reduce_sum: ReduceSum, world: int) -> None:
    """Replace every gradient by its mean over ranks (missing gradients count as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = reduce_sum(torch.nn.utils.parameters_to_vector(grads).cpu()) / world
    torch.nn.utils.vector_to_parameters(flat.to(params[0].device), grads)
    for p, g in zip(params, grads):
        p.grad = g


@torch.no_grad()
def _average_buffers(module: nn.Module, reduce_sum: ReduceSum, world: int) -> None:
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(reduce_sum(buffer.cpu()).to(buffer.device) / world)


def _epoch_summary(epoch: int, sums: torch.Tensor) -> dict:
    loss, steps, member_hits, members, external_hits, external = sums.tolist()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"epoch": epoch, "loss": ratio(loss, steps), "member_accuracy": ratio(member_hits, members),
            "external_accuracy": ratio(external_hits, external), "members": int(members), "external": int(external)}
