"""Per-sample signals of one model on one split, for the reference-model attacks and the blind baseline.

- ``phi``: the logit-scaled true-class confidence log(p / (1 - p)) (LiRA's signal), computed from the logits as
  z_y - logsumexp(z_i, i != y): exact where p rounds to 1 or 0 in floats.
- ``prob``: the true-class softmax probability (RMIA's signal).
- ``mint``: the raw MINT logit (aMINT-LR's signal), NaN for a model without a MINT head.
- ``pixels`` (on request): the input image average-pooled to ``PIXEL_GRID`` x ``PIXEL_GRID`` per channel (the
  blind baseline's features; the model plays no part in them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amint_dist.audit.scoring import Scored, gather_split
from amint_dist.data.pipeline import ShardedSplitStream, make_loader

PIXEL_GRID = 4  # few features: the blind baseline is fitted on a calibration share of a few dozen samples
Gather = Callable[[list], list]


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) per row, stably: z_y - logsumexp over the other classes (float64)."""
    z = logits.double()
    true = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


@torch.no_grad()
def split_signals(model: nn.Module, stream: ShardedSplitStream, device: torch.device,
                  autocast: Callable[[], AbstractContextManager], gather: Gather, pixels: bool = False) -> Scored:
    """Every rank scores its shards; the gathered columns (key, index, phi, prob, mint[, pixels]) by index."""
    columns: dict[str, list] = {"key": [], "index": [], "phi": [], "prob": [], "mint": [],
                                **({"pixels": []} if pixels else {})}
    model.eval()
    for batch in make_loader(stream):
        valid = batch["valid"]
        if not valid.any():
            continue
        images, labels = batch["image"][valid], batch["label"][valid]
        with autocast():
            logits, mint = model(images.to(device))
        logits = logits.float().cpu()
        columns["key"].extend(k for k, v in zip(batch["key"], valid.tolist()) if v)
        columns["index"].append(batch["index"][valid].numpy())
        columns["phi"].append(logit_confidence(logits, labels).numpy())
        columns["prob"].append(torch.softmax(logits.double(), 1).gather(1, labels[:, None]).squeeze(1).numpy())
        columns["mint"].append(np.full(len(labels), np.nan) if mint is None else mint.double().cpu().reshape(-1).numpy())
        if pixels:
            columns["pixels"].append(F.adaptive_avg_pool2d(images.double(), PIXEL_GRID).flatten(1).numpy())
    width = {"pixels": (0, stream.image_shape[0] * PIXEL_GRID**2)}
    mine = {name: np.asarray(values, str) if name == "key" else
            np.concatenate(values) if values else np.zeros(width.get(name, (0,)), np.int64 if name == "index" else float)
            for name, values in columns.items()}
    return gather_split(gather([mine]), stream.shards.split)


def model_signals(model: nn.Module, stream_of: Callable[[str], ShardedSplitStream], splits: list[str],
                  device: torch.device, autocast: Callable[[], AbstractContextManager], gather: Gather,
                  pixels: bool = False) -> dict[str, Scored]:
    """:func:`split_signals` of every split in ``splits`` (``stream_of(split)``: its evaluation stream)."""
    return {split: split_signals(model, stream_of(split), device, autocast, gather, pixels) for split in splits}
