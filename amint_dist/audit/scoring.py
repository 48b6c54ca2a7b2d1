"""One evaluation pass per split: per-sample key, index, label, task correctness and every score.

Each rank scores its own shards (no shuffling, eval transform); ``gather_split`` joins the ranks'
rows in sample-index order, so the result does not depend on the number of ranks or workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from amint_dist.audit.baselines import BASELINES
from amint_dist.data.pipeline import ShardedSplitStream, make_loader
from amint_dist.progress import progress

Scored = dict[str, np.ndarray]  # column -> one entry per sample; "key", "index", "label", "correct", methods
ID_COLUMNS = ("key", "index", "label", "correct")
EMPTY = {"index": np.int64, "label": np.int64, "correct": bool}  # dtype of a column with no rows (else float64)


@torch.no_grad()
def score_split(model: nn.Module, stream: ShardedSplitStream, head_names: Sequence[str], device: torch.device,
                autocast: Callable[[], AbstractContextManager], show: str | None = None) -> tuple[Scored, Counter]:
    """Score this rank's share of a split; return its columns and skipped samples per reason.

    ``model`` returns (task logits, MINT logits [B] or [B, len(head_names)] or None). ``show``: the label of a
    progress bar over the batches (rank 0), none when ``None``.
    """
    columns: dict[str, list] = {name: [] for name in (*ID_COLUMNS, *BASELINES, *head_names)}
    skipped: Counter = Counter()
    model.eval()
    with progress(make_loader(stream), desc=show or "", total=len(stream), unit="batch",
                  enabled=show is not None) as bar:
        for batch in bar:
            skipped.update(reason for _, reason in batch["skipped"])
            valid = batch["valid"]
            if not valid.any():
                continue
            labels = batch["label"][valid]
            columns["key"].extend(k for k, v in zip(batch["key"], valid.tolist()) if v)
            columns["index"].append(batch["index"][valid].numpy())
            columns["label"].append(labels.numpy())
            for name, values in score_batch(model, batch["image"][valid], labels, head_names, device,
                                            autocast).items():
                columns[name].append(values)
    return {name: _stack(name, values) for name, values in columns.items()}, skipped


@torch.no_grad()
def score_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, head_names: Sequence[str],
                device: torch.device, autocast: Callable[[], AbstractContextManager]) -> dict[str, np.ndarray]:
    """Every head's member probability for one batch; with ``labels`` also task correctness and the baselines."""
    with autocast():
        logits, mint = model(images.to(device))
    logits = logits.float().cpu()
    out = {}
    if labels is not None:
        out["correct"] = (logits.argmax(1) == labels).numpy()
        out.update({name: fn(logits, labels) for name, fn in BASELINES.items()})
    if head_names:
        probs = torch.sigmoid(mint.double().cpu().reshape(len(images), -1))
        out.update({name: probs[:, i].numpy() for i, name in enumerate(head_names)})
    return out


def _stack(name: str, values: list) -> np.ndarray:
    if name == "key":
        return np.asarray(values, dtype=str)
    return np.concatenate(values) if values else np.zeros(0, EMPTY.get(name, np.float64))


def gather_split(parts: Sequence[Scored], split: str) -> Scored:
    """Join ranks' columns, ordered by sample index; refuse a sample scored twice."""
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(joined["index"], kind="stable")
    joined = {name: column[order] for name, column in joined.items()}
    repeated = joined["index"][1:][np.diff(joined["index"]) == 0]
    if repeated.size:
        raise RuntimeError(f"split {split!r}: sample index {int(repeated[0])} scored more than once")
    return joined


class StackedHeads(nn.Module):
    """Several MINT heads on the same taps: [B, n_heads] logits from one backbone pass."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        fmts = {getattr(h, "input_fmt", "NCHW") for h in heads}
        if len(fmts) != 1:
            raise ValueError(f"stacked heads must read taps in one format, got {sorted(fmts)}")
        self.input_fmt = fmts.pop()
        self.heads = nn.ModuleList(heads)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(taps) for head in self.heads], dim=1)
