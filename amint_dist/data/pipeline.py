"""Streaming reader: one split of a dataset root as deterministic, rank- and worker-sharded batches.

Per epoch the shard list is permuted from (seed, epoch) identically on every rank, then split by
node (rank) and by DataLoader worker; every (rank, worker) "reader" yields exactly the same
number of batches, so DDP ranks never wait on each other. Short readers are padded with rows
marked ``valid == False``: padding never counts as exposure and carries no loss. Undecodable
samples and shards that end early are skipped, counted by reason and reported in the batch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amint_dist.data.sources import IMAGE_EXTENSIONS
from amint_dist.io import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split as listed by its ``_info.json``."""

    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]

    @classmethod
    def from_root(cls, root: str | Path, split: str) -> SplitShards:
        split_dir = Path(root) / split
        info = read_json(split_dir / "_info.json", what=f"split {split!r} info")
        return cls(split, tuple(str(split_dir / f) for f in info["filenames"]), tuple(info["shard_lengths"]))

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Permutation of shard ids for an epoch: identical on every rank and machine."""
    order = list(range(num_shards))
    random.Random(f"amint:{seed}:{epoch}").shuffle(order)
    return order


def reader_shards(order: list[int], rank: int, world: int, worker: int, workers: int) -> list[int]:
    """Shards of one reader: split by node first, then by worker (disjoint, covering all)."""
    return order[rank::world][worker::workers]


class ShardedSplitStream(IterableDataset):
    """Batches of one split for one rank; use with ``DataLoader(batch_size=None, num_workers=workers)``."""

    def __init__(
        self,
        shards: SplitShards,
        transform: Callable[[Image.Image], torch.Tensor],
        image_shape: tuple[int, int, int],
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
    ):
        readers = world * max(1, workers)
        if len(shards.urls) < readers:
            raise ValueError(
                f"split {shards.split!r} has {len(shards.urls)} shards but {world} ranks x {max(1, workers)} readers "
                f"= {readers} readers need one each; re-prepare with a smaller data.shard_maxcount or use fewer workers"
            )
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.shards, self.transform, self.image_shape = shards, transform, image_shape
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.workers = workers  # DataLoader worker processes; 0 reads in the main process
        self.readers = max(1, workers)  # readers per rank
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` batches of it (already consumed on this rank) are skipped."""
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_reader(self, epoch: int | None = None) -> int:
        """Batches every reader yields this epoch: enough for the fullest reader of any rank."""
        order = epoch_shard_order(len(self.shards.urls), self.seed, self.epoch if epoch is None else epoch)
        fullest = max(
            sum(self.shards.lengths[i] for i in reader_shards(order, r, self.world, w, self.readers))
            for r in range(self.world)
            for w in range(self.readers)
        )
        return math.ceil(fullest / self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.batches_per_reader() * self.readers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        if (info.num_workers if info else 0) != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers but DataLoader has {info.num_workers if info else 0}")
        reader = self.rank * self.readers + worker
        reader_seed = f"amint:{self.seed}:{self.epoch}:{reader}"
        torch.manual_seed(int.from_bytes(reader_seed.encode(), "little") % 2**63)  # reproducible augmentation
        order = epoch_shard_order(len(self.shards.urls), self.seed, self.epoch)
        mine = reader_shards(order, self.rank, self.world, worker, self.readers)
        skips = SkipLog()
        stages = [
            wds.SimpleShardList([self.shards.urls[i] for i in mine]),
            wds.tarfile_to_samples(handler=skips.tar_error),
            _count_per_shard(skips, {self.shards.urls[i]: self.shards.lengths[i] for i in mine}),
        ]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(reader_seed)))
        stages.append(wds.map(lambda s: decode_sample(s, self.transform, skips)))
        samples = iter(wds.DataPipeline(*stages))
        total = self.batches_per_reader()
        skip = (self.start_batch - worker + self.readers - 1) // self.readers  # DataLoader round-robins workers
        for b in range(total):
            batch = self._collate([s for s in (next(samples, None) for _ in range(self.batch_size)) if s], skips)
            if b >= skip:
                yield batch

    def _collate(self, rows: list[dict], skips: SkipLog) -> dict:
        pad = self.batch_size - len(rows)
        image = torch.stack([r["image"] for r in rows]) if rows else torch.zeros(0, *self.image_shape)
        return {
            "image": torch.cat([image, torch.zeros(pad, *self.image_shape, dtype=image.dtype)]),
            "label": torch.tensor([r["label"] for r in rows] + [-1] * pad, dtype=torch.long),
            "index": torch.tensor([r["index"] for r in rows] + [-1] * pad, dtype=torch.long),
            "valid": torch.tensor([True] * len(rows) + [False] * pad),
            "key": [r["key"] for r in rows] + [""] * pad,
            "skipped": skips.drain(),
        }


class SkipLog:
    """Skipped samples of one reader since the last batch: (key or shard, reason) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, what: str, reason: str, count: int = 1) -> None:
        log.warning("skipping %s%s: %s", what, f" ({count} samples)" if count > 1 else "", reason)
        self.items.extend([(what, reason)] * count)

    def tar_error(self, exn: Exception) -> bool:
        """WebDataset handler: note a broken tar and continue with the next one."""
        log.warning("tar read error: %s", exn)
        return True

    def drain(self) -> list[tuple[str, str]]:
        items, self.items = self.items, []
        return items


def _count_per_shard(skips: SkipLog, expected: dict[str, int]):
    """Pipeline stage: after each shard, count samples it should have held but did not deliver."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        seen: Counter = Counter()
        for sample in samples:
            seen[sample.get("__url__")] += 1
            yield sample
        for url, n in expected.items():
            if seen[url] < n:
                skips.add(url, "truncated or unreadable shard", n - seen[url])

    return stage


def decode_sample(sample: dict, transform: Callable, skips: SkipLog) -> dict | None:
    """Decode one raw WebDataset sample to a tensor row, or count it as skipped and return None."""
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        skips.add(key, "no image")
        return None
    try:
        meta = json.loads(sample["json"])
        label = int(sample["cls"])
    except (KeyError, ValueError, TypeError):
        skips.add(key, "missing or bad label/metadata")
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = transform(img.convert("RGB"))
    except Exception as e:  # PIL raises many types for bad image bytes
        skips.add(key, f"undecodable image ({type(e).__name__})")
        return None
    return {"image": image, "label": label, "index": int(meta["index"]), "key": key}


def make_loader(stream: ShardedSplitStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over an already-sharded stream (never pass it through ``accelerator.prepare``)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if stream.workers else None,
    )
