"""Balanced reader assignment: the pure arithmetic, real streams with more readers than shards, and a real
2-process gloo training run on a root whose splits have fewer shards than ranks x workers."""

from __future__ import annotations

import io
import itertools
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from amint_dist.data.assignment import (epoch_shard_order, rank_batches, reader_batches, reader_span,
                                        shard_pieces)
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.tar_seek import samples_from
from train_helpers import REPO, free_port, load_npz, run_train

# (samples, ranks, readers per rank, batch): readers > samples, > shards, uneven and exact cases
SIZES = [(784, 1, 1, 16), (719, 2, 3, 16), (784, 20, 1, 16), (100, 7, 4, 3), (5, 4, 2, 4), (64, 2, 2, 16),
         (1000, 3, 8, 1), (0, 2, 2, 4), (1_281_167 // 10, 64, 8, 2)]


def spans(n: int, world: int, readers: int, batch: int) -> dict[tuple[int, int], range]:
    return {(r, j): reader_span(n, r, world, j, readers, batch) for r in range(world) for j in range(readers)}


@pytest.mark.parametrize("n, world, readers, batch", SIZES)
def test_every_position_once_in_balanced_contiguous_reader_ranges(n, world, readers, batch):
    """The readers' ranges are disjoint, cover every position once and follow each other (rank by rank, reader by
    reader); every reader's batch count differs from its rank siblings' by at most one; a reader reads a full
    ``batch`` for each of its batches except at the end of its rank's range, which is short by less than one
    batch in all (the only padding)."""
    got = spans(n, world, readers, batch)
    assert list(itertools.chain.from_iterable(got.values())) == list(range(n))  # in order: contiguous, once
    total = rank_batches(n, world, batch)
    for rank in range(world):
        counts = [reader_batches(total, j, readers) for j in range(readers)]
        assert sum(counts) == total and max(counts) - min(counts) <= 1
        full = [len(got[rank, j]) == counts[j] * batch for j in range(readers)]
        assert all(full[:full.index(False)] if False in full else full)  # short readers only at the rank's end
        padding = total * batch - sum(len(got[rank, j]) for j in range(readers))
        assert 0 <= padding <= batch
    assert world * total * batch - n < world * batch  # padding: under one batch per rank


def test_one_rank_of_one_reader_reads_everything_in_order():
    assert reader_span(719, 0, 1, 0, 1, 16) == range(719) and rank_batches(719, 1, 16) == 45  # last one short


@pytest.mark.parametrize("lengths", [[64] * 11 + [15, 0], [3, 250, 1, 250, 249], [1]])
@pytest.mark.parametrize("world, readers, batch", [(2, 3, 16), (5, 4, 2), (1, 1, 1000), (16, 8, 1)])
def test_shard_pieces_read_each_sample_once_sequentially(lengths, world, readers, batch):
    """Every (shard, position) is read by exactly one reader; a reader's pieces are in the epoch's shard order,
    each a contiguous part of a shard, and only its first piece starts mid-shard and only its last ends early."""
    order = epoch_shard_order(len(lengths), seed=3, epoch=1)
    read = []
    for span in spans(sum(lengths), world, readers, batch).values():
        pieces = shard_pieces(lengths, order, span)
        assert sum(p.stop - p.start for p in pieces) == len(span)
        assert [order.index(p.shard) for p in pieces] == sorted(order.index(p.shard) for p in pieces)
        assert all(p.start == 0 for p in pieces[1:]) and all(p.stop == lengths[p.shard] for p in pieces[:-1])
        read += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
    assert sorted(read) == [(s, i) for s in range(len(lengths)) for i in range(lengths[s])]


def test_the_shard_order_is_a_function_of_seed_and_epoch():
    assert epoch_shard_order(50, 1, 2) == epoch_shard_order(50, 1, 2)
    assert epoch_shard_order(50, 1, 2) != epoch_shard_order(50, 1, 3) != epoch_shard_order(50, 2, 3)
    assert sorted(epoch_shard_order(50, 1, 2)) == list(range(50))


def to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("world, workers", [(20, 0), (8, 2)])
def test_more_readers_than_shards_read_every_sample_once(digits_root, world, workers):
    """The 13 member shards read by 20 ranks x 1 reader and 8 ranks x 2 DataLoader workers (16 readers): the former rule
    refused both. Every rank yields len(stream) batches; the valid rows of all ranks are every sample once,
    keys matching keys.txt."""
    shards = SplitShards.from_root(digits_root, "members")
    keys = (digits_root / "members/keys.txt").read_text().splitlines()
    seen = []
    for rank in range(world):
        stream = ShardedSplitStream(shards, to_tensor, (3, 8, 8), 8, rank=rank, world=world, workers=workers, seed=2)
        stream.set_epoch(1)
        batches = list(make_loader(stream))
        assert len(batches) == len(stream) == rank_batches(len(keys), world, 8)
        for b in batches:
            seen += [(i, k) for i, k, v in zip(b["index"].tolist(), b["key"], b["valid"].tolist()) if v]
    assert sorted(seen) == list(enumerate(keys))


def test_two_ranks_train_on_a_root_with_fewer_shards_than_readers(tmp_path):
    """A real 2-process gloo DDP run (accelerate launch) with data.workers=2 on a root whose splits hold 1-3
    shards, fewer than the 4 readers the former rule demanded: the ranks' consumed member keys (their exposure
    traces) are disjoint and cover the split once per epoch, and the ledger agrees."""
    from amint_dist.data.prepare import prepare_dataset
    from conftest import prep_cfg

    root = tmp_path / "few_shards"
    manifest = prepare_dataset(prep_cfg("digits", root, shard_maxcount=400, prepare_workers=2))
    assert all(len(manifest["splits"][s]["shards"]) < 4 for s in ("members", "probe", "external"))
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs/accelerate/ddp.yaml"), "--main_process_port", str(free_port())]
    run_train(run_dir, root, "data.workers=2", "train.epochs=2", "train.exposure_log=true", launcher=launcher)
    keys = (root / "members/keys.txt").read_text().splitlines()
    traces = sorted((run_dir / "exposure_log").glob("rank-*.tsv"))
    assert len(traces) == 2
    per_rank = [[line.split("\t") for line in t.read_text().splitlines()] for t in traces]
    steps = rank_batches(len(keys), 2, 32)  # optimizer steps per epoch: train.batch_size=32, grad_accum=1
    assert max(int(row[0]) for rows in per_rank for row in rows) == 2 * steps - 1
    for epoch in range(2):
        consumed = [[key for step, split, _, key in rows if split == "members" and int(step) // steps == epoch]
                    for rows in per_rank]
        assert all(consumed) and set(consumed[0]).isdisjoint(consumed[1])
        assert sorted(consumed[0] + consumed[1]) == sorted(keys), epoch
    assert (load_npz(run_dir / "ledger.npz")["members"] == 2).all()


def odd_tar(path: Path) -> None:
    """A tar with what WebDataset's grouping must step over: a directory entry, a meta entry, a file without an
    extension, a member with a long (pax) name, and samples of one to three files with nested keys."""
    def add(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "__meta__", b"meta")
        for i in range(9):
            key = f"d/{'long_' * 30 if i == 4 else ''}s{i:02d}"
            if i == 2:
                add(tar, "d", kind=tarfile.DIRTYPE)
                add(tar, "README", b"no extension")
                add(tar, "__index__/s02.json", b"{}")  # WebDataset skips names under __...__/
            for ext in ("png", "cls", "json")[: 1 + i % 3]:
                add(tar, f"{key}.{ext}", f"{i}:{ext}".encode())


def test_a_tar_read_from_any_sample_is_the_tail_of_the_full_read(tmp_path, digits_root):
    """samples_from(path, k) yields exactly samples k.. of WebDataset's own full read (keys and every field), for
    every k up to past the end, on a prepared shard and on a tar with directories, meta entries and pax names."""
    odd = tmp_path / "odd.tar"
    odd_tar(odd)
    for path in (str(odd), str(digits_root / "members/shard-000001.tar")):
        full = list(wds.tarfile_to_samples()([{"url": path}]))
        assert len(full) == (9 if path == str(odd) else 64)
        for k in range(len(full) + 2):
            assert list(samples_from(path, k, handler=lambda e: False)) == full[k:], (path, k)


@pytest.mark.parametrize("world", [40, 13 * 8])
def test_a_truncated_shard_read_by_several_readers_loses_each_sample_once(digits_root, tmp_path, world):
    """A shard cut mid-way, its samples spread over several readers (40 or 104 ranks of ~20 or ~8 samples): the
    delivered samples are unique, and every other sample is skipped exactly once, by its key."""
    root = tmp_path / "root"
    shutil.copytree(digits_root, root)
    victim = root / "members/shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    shards = SplitShards.from_root(root, "members")
    keys = (root / "members/keys.txt").read_text().splitlines()
    delivered, skipped = [], []
    for rank in range(world):
        stream = ShardedSplitStream(shards, to_tensor, (3, 8, 8), 8, rank=rank, world=world, workers=0, seed=4)
        for b in make_loader(stream):
            delivered += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
            skipped += [what for what, _ in b["skipped"]]
    lost = set(keys) - set(delivered)
    assert len(delivered) == len(set(delivered)) and 20 < len(lost) < 64
    assert sorted(skipped) == sorted(lost)
