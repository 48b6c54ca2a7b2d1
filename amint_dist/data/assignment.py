"""Which samples each reader of a split reads in an epoch: pure arithmetic on shard lengths.

A *reader* is one (rank, DataLoader worker) pair; a rank has ``readers`` of them (its workers, at least one).
Per epoch the shards are permuted from (seed, epoch), identically everywhere, and laid end to end as one
sequence of ``num_samples`` positions. Rank ``r`` takes the contiguous range ``[r*N//world, (r+1)*N//world)``
(sizes differ by at most one sample). Every rank yields the same number of batches,
``ceil(ceil(N / world) / batch)``; the rank's batch ``g`` comes from its reader ``g % readers`` (the order a
DataLoader takes batches from its workers), so reader ``j`` yields ``len(range(j, batches, readers))`` batches
(the readers of a rank differ by at most one batch) and reads the next ``batch`` samples of the rank's range
for each. Only the end of the rank's range comes up short, by at most one batch: that is all the padding.
Every sample is in exactly one reader's range; a reader's range is contiguous, so it reads its shards
sequentially, starting mid-shard (skipping without decoding) and stopping mid-shard where its range does.
No reader count is refused: a reader may read part of one shard, or nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples ``start:stop`` (positions in the shard's order) of shard ``shard``."""

    shard: int
    start: int
    stop: int


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Permutation of shard ids for an epoch: identical on every rank and machine."""
    order = list(range(num_shards))
    random.Random(f"amint:{seed}:{epoch}").shuffle(order)
    return order


def rank_batches(num_samples: int, world: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: enough for the largest rank range."""
    return math.ceil(math.ceil(num_samples / world) / batch_size)


def reader_batches(total_batches: int, reader: int, readers: int) -> int:
    """Batches reader ``reader`` of a rank yields: the rank's batches ``reader, reader + readers, ...``."""
    return len(range(reader, total_batches, readers))


def reader_span(num_samples: int, rank: int, world: int, reader: int, readers: int, batch_size: int) -> range:
    """Positions (in the epoch's sample sequence) that reader ``reader`` of rank ``rank`` reads."""
    first, end = num_samples * rank // world, num_samples * (rank + 1) // world
    total = rank_batches(num_samples, world, batch_size)
    before = total // readers * reader + min(reader, total % readers)  # batches of the readers before it
    start = min(first + before * batch_size, end)
    return range(start, min(start + reader_batches(total, reader, readers) * batch_size, end))


def shard_pieces(lengths: Sequence[int], order: Sequence[int], span: range) -> list[Piece]:
    """The parts of shards, in ``order``, that positions ``span`` of the end-to-end sequence cover."""
    pieces, position = [], 0
    for shard in order:
        n = lengths[shard]
        start, stop = max(span.start, position), min(span.stop, position + n)
        if start < stop:
            pieces.append(Piece(shard, start - position, stop - position))
        position += n
        if position >= span.stop:
            break
    return pieces
