"""Streaming reader: one split of a dataset root as deterministic, rank- and worker-sharded batches.

Per epoch the shards are permuted from (seed, epoch) identically on every rank and laid end to end; every
rank reads an equal contiguous range of that sample sequence, cut among its DataLoader workers ("readers")
batch by batch (``amint_dist.data.assignment``): every sample exactly once per epoch, every rank the same
number of batches (DDP ranks never wait on each other), padding only where a rank's range ends (rows
marked ``valid == False``: padding never counts as exposure and carries no loss). Undecodable samples and
shards that end early are skipped, counted by reason and reported in the batch (an undecodable sample
leaves an invalid row in place, so batch composition never depends on decoding). Augmentation randomness
is seeded per batch from (seed, epoch, reader, batch), so a resumed epoch (``set_epoch(e, start_batch)``)
reads but does not decode the batches it skips and still yields exactly the batches, images included, of
an uninterrupted run. With a subset (``SplitShards.subset``: a reference run) the assignment counts only the
samples it keeps (``read_lengths``), each piece is mapped onto its shard by ``read_positions`` and the samples
it skips are dropped before decoding.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amint_dist.data.assignment import (Piece, epoch_shard_order, rank_batches, reader_batches, reader_span,
                                        shard_pieces)
from amint_dist.data.images import DEFAULT_MAX_PIXELS
from amint_dist.data.samples import SkipLog, decode_sample, seeded_rng
from amint_dist.data.subset import SubsetRule
from amint_dist.data.tar_seek import samples_from
from amint_dist.io import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split as listed by its ``_info.json``."""

    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    keys_file: str | None = None  # keys.txt: key of index i on line i (names the samples a short shard lost)
    subset: SubsetRule | None = None  # reference runs: only the keys it keeps are read (data/subset.py)

    @classmethod
    def from_root(cls, root: str | Path, split: str) -> SplitShards:
        split_dir = Path(root) / split
        info = read_json(split_dir / "_info.json", what=f"split {split!r} info")
        return cls(split, tuple(str(split_dir / f) for f in info["filenames"]), tuple(info["shard_lengths"]),
                   str(split_dir / "keys.txt"))

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @functools.cached_property
    def index_ranges(self) -> dict[str, range]:
        """Sample indices each shard holds (prepare writes a split's samples to its shards in index order)."""
        starts = itertools.accumulate(self.lengths, initial=0)
        return {url: range(start, start + n) for url, start, n in zip(self.urls, starts, self.lengths)}

    @functools.cached_property
    def read_positions(self) -> tuple[tuple[int, ...], ...] | None:
        """Per shard, the positions (within the shard) of the samples ``subset`` keeps, from keys.txt; None
        without a subset (every sample is read)."""
        if self.subset is None:
            return None
        with open(self.keys_file or "", encoding="utf-8") as f:
            kept = self.subset.kept([line.rstrip("\n") for line in f])
        if len(kept) != self.num_samples:
            raise ValueError(f"{self.keys_file}: {len(kept)} keys, but split {self.split!r} holds {self.num_samples}")
        return tuple(tuple(i - r.start for i in r if kept[i]) for r in self.index_ranges.values())

    @property
    def read_lengths(self) -> tuple[int, ...]:
        """Samples read from each shard: all of them, or (with ``subset``) those it keeps."""
        positions = self.read_positions
        return self.lengths if positions is None else tuple(len(p) for p in positions)

    def shard_keys(self, url: str) -> list[str] | None:
        """The keys shard ``url`` should hold, from keys.txt (None when that is unreadable)."""
        indices = self.index_ranges[url]
        try:
            with open(self.keys_file or "", encoding="utf-8") as f:
                keys = [line.rstrip("\n") for line in itertools.islice(f, indices.start, indices.stop)]
        except OSError:
            return None
        return keys if len(keys) == len(indices) else None


class ShardedSplitStream(IterableDataset):
    """Batches of one split for one rank; use with ``DataLoader(batch_size=None, num_workers=workers)``."""

    def __init__(
        self,
        shards: SplitShards,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        image_shape: tuple[int, int, int],
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        num_classes: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """``num_classes``: labels outside [0, num_classes) are skipped ("label out of range"); ``max_pixels``
        (``data.max_pixels``): larger images are skipped before decoding ("image too large"). ``transform`` None
        (``data.decode=device``): nothing is decoded, a batch's ``image`` is a list of the encoded bytes (1-D uint8
        tensors, header-checked; empty for invalid rows)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.shards, self.transform, self.image_shape = shards, transform, image_shape
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.workers = workers  # DataLoader worker processes; 0 reads in the main process
        self.readers = max(1, workers)  # readers per rank
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.num_classes, self.max_pixels = num_classes, max_pixels
        self.epoch, self.start_batch = 0, 0  # set_epoch's; worker processes get them when a loader starts them
        self.endless = False  # True (make_loader(endless=True)): after the selected epoch, the next ones, unasked

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` batches of it (already consumed on this rank) are skipped."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank and in every epoch)."""
        return rank_batches(sum(self.shards.read_lengths), self.world, self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if (info.num_workers if info else 0) != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers but DataLoader has {info.num_workers if info else 0}")
        # The DataLoader takes batches round-robin from its workers, starting at worker 0, and the rank's batch
        # g of an epoch is due from its reader g % readers. The iterator's first batch is batch start_batch of
        # the selected epoch, and an endless stream's next epoch begins len(self) batches of that epoch later:
        # DataLoader worker w plays reader (w + shift) % readers, shift = start_batch - the batches before.
        epoch, start, shift = self.epoch, self.start_batch, self.start_batch
        worker = info.id if info else 0
        while True:
            reader = (worker + shift) % self.readers
            yield from self._epoch_batches(epoch, reader, len(range(reader, start, self.readers)))
            if not self.endless or not len(self):
                return
            epoch, start, shift = epoch + 1, 0, shift - len(self)

    def _epoch_batches(self, epoch: int, reader: int, consumed: int) -> Iterator[dict]:
        """Reader ``reader``'s batches of ``epoch``, its first ``consumed`` read, not decoded."""
        reader_seed = f"amint:{self.seed}:{epoch}:{self.rank * self.readers + reader}"
        read = sum(self.shards.read_lengths)  # with a subset: the samples it keeps
        span = reader_span(read, self.rank, self.world, reader, self.readers, self.batch_size)
        order = epoch_shard_order(len(self.shards.urls), self.seed, epoch)
        skips = SkipLog()
        samples = _piece_samples(self.shards, shard_pieces(self.shards.read_lengths, order, span), skips)
        if self.shuffle:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(reader_seed))(samples)
        for b in range(reader_batches(len(self), reader, self.readers)):
            raw = list(itertools.islice(samples, self.batch_size))
            if b < consumed:
                skips.drain()  # reported when the batch was first delivered
                continue
            with seeded_rng(f"{reader_seed}:{b}"):
                rows = [decode_sample(s, self.transform, skips, self.num_classes, self.shards.index_ranges,
                                      self.max_pixels) for s in raw]
            yield self._collate(rows, skips)

    def _collate(self, rows: list[dict | None], skips: SkipLog) -> dict:
        """Stack rows into a batch of ``batch_size``; undecodable rows (None) and padding are invalid. Encoded
        images (no transform) stay a list: their lengths differ."""
        rows = rows + [None] * (self.batch_size - len(rows))
        if self.transform is None:
            blank = torch.zeros(0, dtype=torch.uint8)
            images: torch.Tensor | list[torch.Tensor] = [r["image"] if r else blank for r in rows]
        else:
            dtype = next((r["image"].dtype for r in rows if r), torch.float32)
            blank = torch.zeros(self.image_shape, dtype=dtype)
            images = torch.stack([r["image"] if r else blank for r in rows])
        return {
            "image": images,
            "label": torch.tensor([r["label"] if r else -1 for r in rows], dtype=torch.long),
            "index": torch.tensor([r["index"] if r else -1 for r in rows], dtype=torch.long),
            "valid": torch.tensor([r is not None for r in rows]),
            "key": [r["key"] if r else "" for r in rows],
            "skipped": skips.drain(),
        }


def _selected(subset: SubsetRule, sample: dict) -> bool:
    """A reference run's subset keeps the sample (an odd key is kept: decoding reports it as a skip)."""
    key = sample.get("__key__")
    return not isinstance(key, str) or subset.keeps(key)


def _piece_samples(shards: SplitShards, pieces: list[Piece], skips: SkipLog) -> Iterator[dict]:
    """The raw samples of ``pieces`` in order: each shard opened at the piece's first sample (the headers before
    it read, nothing decoded) and closed where the piece ends. A piece counts the samples read (with a subset:
    those it keeps, ``read_positions`` mapping it onto the shard, the others dropped undecoded). The samples of a
    piece its shard did not deliver are skipped by key (from keys.txt; the shard's path stands in for each when
    keys.txt is unreadable)."""
    positions, subset = shards.read_positions, shards.subset
    for piece in pieces:
        url = shards.urls[piece.shard]
        first, end = (piece.start, piece.stop) if positions is None else (
            positions[piece.shard][piece.start], positions[piece.shard][piece.stop - 1] + 1)
        seen = set()
        with closing(samples_from(url, first, skips.tar_error)) as tar:
            for sample in itertools.islice(tar, end - first):
                if subset is None or _selected(subset, sample):
                    seen.add(sample.get("__key__"))
                    yield sample
        missing = piece.stop - piece.start - len(seen)
        if missing <= 0:
            continue  # complete: keys.txt is read only for a piece that came up short
        expected = shards.shard_keys(url)
        if expected is None:
            skips.add(url, "truncated or unreadable shard", missing)
            continue
        for key in expected[first:end]:
            if key not in seen and (subset is None or subset.keeps(key)):
                skips.add(key, "truncated or unreadable shard")


ROW_FIELDS = ("label", "index", "valid")  # a batch's small per-row tensors


def _to_wire(batch: dict) -> dict:
    """In a worker: the small per-row tensors as NumPy arrays, which cross to the main process inside the
    pickle. A tensor crosses as a shared-memory segment whose file descriptor is fetched over a fresh
    socket connection (~0.7 ms each on 2 cores): one per batch (the images) instead of four. Encoded images
    (a list) cross pickled too, not as one segment each."""
    images = batch["image"]
    return {**batch, **{k: batch[k].numpy() for k in ROW_FIELDS},
            "image": [i.numpy() for i in images] if isinstance(images, list) else images}


def _from_wire(batch: dict) -> dict:
    """In the main process: the per-row tensors back (same dtypes and values, no copy)."""
    images = batch["image"]
    return {**batch, **{k: torch.from_numpy(batch[k]) for k in ROW_FIELDS},
            "image": [torch.from_numpy(i) for i in images] if isinstance(images, list) else images}


class _Loader(DataLoader):
    """A DataLoader of stream batches whose workers send the per-row fields pickled inline (``_to_wire``)."""

    def __iter__(self):
        batches = super().__iter__()
        return map(_from_wire, batches) if self.num_workers else batches


def make_loader(stream: ShardedSplitStream, pin_memory: bool = False, endless: bool = False) -> DataLoader:
    """A DataLoader over an already-sharded stream (never pass it through ``accelerator.prepare``); call
    ``stream.set_epoch`` before ``iter``.

    ``endless`` (sets ``stream.endless``): one iterator yields the epoch chosen by ``set_epoch`` (from its
    ``start_batch``), then the next epochs whole, the same batches as a fresh loader per epoch. The workers
    read ahead across epoch ends, so the next epoch's first batches (shard opening, shuffle-buffer fill) are
    ready when the consumer gets there, and no worker is started twice (its one iterator never ends: training's
    way, docs/performance.md).
    The consumer counts epochs: ``len(stream)`` batches each.
    """
    stream.endless = endless
    return _Loader(
        stream,
        batch_size=None,
        num_workers=stream.workers,
        collate_fn=_to_wire if stream.workers else None,
        pin_memory=pin_memory,
        prefetch_factor=4 if stream.workers else None,
    )
