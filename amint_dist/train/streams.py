"""Training's split streams: rows per micro-step of every split read, the dataset fit check, the streams.

A reference run (``data.subset``) reads every pool split as task + MINT positives, only the samples its subset
keeps; its ``train.batch_size`` positive rows are shared among the pool splits in proportion to what each keeps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from amint_dist.config import ConfigError
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards
from amint_dist.data.transforms import make_transform
from amint_dist.train.config import JobConfig


def positive_splits(cfg: JobConfig) -> tuple[str, ...]:
    """Splits read as task + MINT positives: members, or a reference run's pool."""
    return tuple(cfg.data.reference_subset.pool) if cfg.data.reference_subset else ("members",)


def split_shards(cfg: JobConfig, split: str) -> SplitShards:
    """The shards of ``split`` as training reads them (a reference run's pool splits: its subset only)."""
    shards = SplitShards.from_root(cfg.data.root, split)
    subset = cfg.data.reference_subset
    return dataclasses.replace(shards, subset=subset.rule()) if subset and split in subset.pool else shards


def read_counts(cfg: JobConfig, counts: Mapping[str, int]) -> dict[str, int]:
    """Samples training reads per split an epoch: the prepared counts, a reference run's pool splits' subsets."""
    pool = cfg.data.reference_subset.pool if cfg.data.reference_subset else ()
    return {split: sum(split_shards(cfg, split).read_lengths) if split in pool else n for split, n in counts.items()}


def read_batches(cfg: JobConfig, counts: Mapping[str, int]) -> dict[str, int]:
    """Rows per rank per micro-step of every split training reads (0: not read); ``counts``: :func:`read_counts`."""
    batch, probe = cfg.train.batch_size, cfg.train.probe_batch_size
    positives = positive_splits(cfg)
    read = sum(counts[s] for s in positives)
    sizes = {"members": batch,
             "external": max(1, round(batch * cfg.mint.external_ratio)) if cfg.mint.on else 0,  # no MINT: unread
             "probe": max(1, round(batch * counts["probe"] / max(1, counts["members"]))) if probe == "auto" else probe}
    sizes.update({s: max(1, round(batch * counts[s] / max(1, read))) for s in positives})  # members alone: batch
    return {split: n if counts.get(split) else 0 for split, n in sizes.items()}


def reader_layout(streams: Mapping[str, ShardedSplitStream]) -> dict:
    """Readers per rank and every split's rows per rank and micro-step: beside the world size, what decides which
    samples a rank's first batches of an epoch hold (``TrainState.layout``)."""
    return {"readers": streams["members"].readers, "batch_sizes": {s: st.batch_size for s, st in streams.items()}}


def check_dataset_fit(cfg: JobConfig, manifest: Mapping[str, Any], world: int) -> None:
    """What the config asks of the dataset root must be possible: batches no larger than their split, at least
    ``grad_accum`` member batches per rank and epoch (any shard count suits any number of readers)."""
    counts = read_counts(cfg, manifest["counts"])
    for split, n in read_batches(cfg, counts).items():
        if not n:
            continue
        key = {"members": cfg.train.key("batch_size"), "probe": cfg.train.key("probe_batch_size"),
               "external": cfg.mint.key("external_ratio"), "heldout": cfg.train.key("batch_size")}[split]
        if n * world > counts[split] and (split != "probe" or cfg.train.probe_batch_size != "auto"):
            raise ConfigError(f"{key}: {n} {split} rows per rank x {world} rank(s) is more than "
                              f"the {split} split holds ({counts[split]} samples)")
    per_rank = math.ceil(counts["members"] / (world * read_batches(cfg, counts)["members"])) if counts["members"] else 0
    if counts["members"] and cfg.train.grad_accum > per_rank:
        raise ConfigError(f"{cfg.train.key('grad_accum')}: an epoch has about {per_rank} member batches per rank, "
                          "fewer than one optimizer step needs")


def make_streams(cfg: JobConfig, manifest: Mapping[str, Any], data_config: Mapping[str, Any], rank: int,
                 world: int) -> dict[str, ShardedSplitStream]:
    """Member, probe and external streams for this rank (the splits :func:`read_batches` reads)."""
    counts = read_counts(cfg, manifest["counts"])
    needed = ["members"] + (["external"] if cfg.mint.on else [])
    empty = [split for split in needed if not counts[split]]
    if empty:
        raise ValueError(f"split {empty[0]!r} of {cfg.data.root} is empty: training needs members"
                         + (" and external MINT negatives" if cfg.mint.on else ""))
    image_shape = tuple(data_config["input_size"])
    uint8 = cfg.data.device_transform  # data.decode=device: no transform, the workers ship the encoded bytes
    transform = None if cfg.data.decode == "device" else make_transform(data_config, cfg.data.augment, uint8=uint8)
    return {
        split: ShardedSplitStream(
            split_shards(cfg, split), transform, image_shape, n, rank=rank, world=world,
            workers=cfg.data.workers, seed=cfg.train.seed, shuffle=True, shuffle_buffer=cfg.data.shuffle_buffer,
            num_classes=int(manifest["num_classes"]), max_pixels=cfg.data.max_pixels,
        )
        for split, n in read_batches(cfg, counts).items()
        if n > 0
    }
