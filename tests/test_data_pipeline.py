"""The streaming reader: rank/worker sharding, epoch order, resume, equal lengths, damaged shards."""

import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch

from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from train_helpers import free_port

SHAPE = (3, 8, 8)


def ToTensor():  # noqa: N802 (torchvision's name, without importing torchvision)
    return to_tensor


def to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> float CHW tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

    root, out, port, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stream = ShardedSplitStream(SplitShards.from_root(root, "members"), to_tensor, (3, 8, 8), 16,
                                rank=dist.get_rank(), world=dist.get_world_size(), workers=2, seed=3)
    loader = make_loader(stream)
    result = {"len": [], "epochs": []}
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        result["len"].append(len(stream))
        result["epochs"].append([b["index"].tolist() for b in loader])
    stream.set_epoch(1, start_batch=5)
    result["resumed"] = [b["index"].tolist() for b in loader]
    counts = [None, None]
    dist.all_gather_object(counts, [len(e) for e in result["epochs"]])
    result["all_counts"] = counts
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


def indices(batches) -> list[int]:
    return [i for b in batches for i in b if i >= 0]


def run_stream(shards, *, epoch=0, start_batch=0, transform=None, **kw) -> list[dict]:
    """All batches of one epoch (from ``start_batch``) through make_loader."""
    stream = ShardedSplitStream(shards, transform or ToTensor(), SHAPE, kw.pop("batch_size", 16), **kw)
    stream.set_epoch(epoch, start_batch)
    return list(make_loader(stream))


@pytest.fixture(scope="module")
def members(digits_root) -> SplitShards:
    return SplitShards.from_root(digits_root, "members")


def test_two_ranks_two_workers_read_disjoint_complete_subsets(digits_root, members, tmp_path):
    """Two real gloo ranks x 2 DataLoader workers: disjoint valid indices whose union is the whole split,
    len(stream) batches on both ranks, a new order each epoch, identical to another run of the same
    (seed, epoch), and a resumed epoch (start_batch=5) is exactly the tail of the full one."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(digits_root), str(tmp_path), str(port), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    lengths = ranks[0]["len"]
    assert ranks[1]["len"] == lengths and ranks[0]["all_counts"] == ranks[1]["all_counts"] == [lengths, lengths]
    for epoch in (0, 1):
        assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch]) == lengths[epoch]
        per_rank = [indices(r["epochs"][epoch]) for r in ranks]
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(members.num_samples))
        assert all(len(b) == 16 for r in ranks for b in r["epochs"][epoch])
    for r in ranks:
        assert r["epochs"][0] != r["epochs"][1]
        assert r["resumed"] == r["epochs"][1][5:]

    for rank in (0, 1):  # a separate run (this process, no process group) of the same (seed, epoch)
        again = run_stream(members, epoch=1, rank=rank, world=2, workers=2, seed=3)
        assert [b["index"].tolist() for b in again] == ranks[rank]["epochs"][1]


def test_batches_carry_keys_labels_and_indices(digits_root, members):
    """Every valid row's key is keys.txt[index] and its label the stored class; padding rows are
    invalid with index/label -1 and key ''; one rank yields len(stream) full-size batches."""
    keys = (digits_root / "members/keys.txt").read_text().splitlines()
    from sklearn.datasets import load_digits

    target = load_digits().target
    batches = run_stream(members, workers=2, seed=0)
    stream = ShardedSplitStream(members, ToTensor(), SHAPE, 16, workers=2)
    assert len(batches) == len(stream)
    seen = []
    for b in batches:
        assert b["image"].shape == (16, *SHAPE) and b["label"].shape == b["index"].shape == b["valid"].shape == (16,)
        for key, index, label, valid in zip(b["key"], b["index"].tolist(), b["label"].tolist(), b["valid"].tolist()):
            if valid:
                assert key == keys[index] and label == target[int(key.split("_")[1])]
                seen.append(index)
            else:
                assert (key, index, label) == ("", -1, -1)
        assert b["skipped"] == []
    assert sorted(seen) == list(range(len(keys)))


@pytest.mark.parametrize("start_batch", [1, 2, 7, 31])
def test_resume_yields_the_tail_of_the_epoch(members, start_batch):
    """set_epoch(e, start_batch=k) yields exactly batches k.. of the uninterrupted epoch (2 workers,
    any k, odd ones included), with identical images."""
    full = run_stream(members, epoch=2, workers=2, seed=1, transform=Augment())
    tail = run_stream(members, epoch=2, start_batch=start_batch, workers=2, seed=1, transform=Augment())
    assert len(full) == 49 and len(tail) == 49 - start_batch  # 784 samples / 16: readers of 25 and 24 batches
    for a, b in zip(full[start_batch:], tail):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


class Augment:
    """A transform drawing from Python's, NumPy's and torch's global RNGs (as timm augmentations do)."""

    def __call__(self, img):
        return ToTensor()(img) + random.random() + float(np.random.rand()) + torch.rand(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_is_reproducible_and_leaves_caller_rngs_alone(members, workers):
    """Random augmentation depends only on (seed, epoch, reader, batch), not on the caller's RNG state,
    and iterating in the main process does not disturb the caller's random streams."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = run_stream(members, workers=workers, seed=5, transform=Augment())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    second = run_stream(members, workers=workers, seed=5, transform=Augment())
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
    if workers == 0:  # iterate the stream itself: DataLoader's iterator draws its own base seed
        random.seed(2), np.random.seed(2), torch.manual_seed(2)
        expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        random.seed(2), np.random.seed(2), torch.manual_seed(2)
        direct = list(ShardedSplitStream(members, to_tensor, SHAPE, 16, workers=0, seed=5))
        assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
        assert len(direct) == len(first)
    other_epoch = run_stream(members, epoch=1, workers=workers, seed=5, transform=Augment())
    assert not torch.equal(first[0]["image"], other_epoch[0]["image"])


def test_loader_with_other_worker_count_is_refused(members):
    """A DataLoader whose worker count differs from the stream's would duplicate or drop shards."""
    stream = ShardedSplitStream(members, ToTensor(), SHAPE, 16, workers=2)
    with pytest.raises(RuntimeError, match="built for 2 workers"):
        next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)))


def damaged_copy(digits_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(digits_root, root)
    return root, SplitShards.from_root(root, "members")


def skipped_entries(batches) -> list[tuple[str, str]]:
    return [tuple(s) for b in batches for s in b["skipped"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_counted_not_fatal(digits_root, tmp_path, workers):
    """A shard cut in half: the epoch completes with full length, every lost sample is reported as skipped by
    its key (the shard's shortfall named from keys.txt, or a sample cut mid-way), all other samples arrive."""
    root, shards = damaged_copy(digits_root, tmp_path)
    victim = root / "members/shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    batches = run_stream(shards, workers=workers, seed=0)
    assert len(batches) == len(ShardedSplitStream(shards, ToTensor(), SHAPE, 16, workers=workers))
    got = indices(b["index"].tolist() for b in batches)
    assert len(got) == len(set(got))
    lost = shards.num_samples - len(got)
    assert 20 < lost < 64
    skipped = skipped_entries(batches)
    assert len(skipped) == lost
    lost_keys = {line for i, line in enumerate((root / "members/keys.txt").read_text().splitlines()) if i not in set(got)}
    assert sorted(what for what, _ in skipped) == sorted(lost_keys)
    assert Counter(reason for _, reason in skipped)["truncated or unreadable shard"] >= lost - 1


def test_garbage_image_is_an_invalid_row_and_a_skip(digits_root, tmp_path):
    """One sample's image bytes replaced by garbage: its row is invalid, the skip names its key, nothing else lost."""
    root, shards = damaged_copy(digits_root, tmp_path)
    victim = root / "members/shard-000005.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[10 * 3][0].name.split(".")[0]
    with tarfile.open(victim, "w") as tar:
        for m, data in members:
            if m.name == f"{bad_key}.png":
                data = b"\x89PNG but not really" * 3
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    batches = run_stream(shards, workers=2, seed=0)
    got = indices(b["index"].tolist() for b in batches)
    assert len(got) == shards.num_samples - 1
    skipped = skipped_entries(batches)
    assert len(skipped) == 1 and skipped[0][0] == bad_key and skipped[0][1].startswith("undecodable image")
    assert bad_key not in {k for b in batches for k in b["key"]}


@pytest.mark.parametrize("workers", [0, 2])
def test_endless_loader_yields_epoch_after_epoch(members, workers):
    """make_loader(endless=True): one iterator yields the set_epoch epoch from its start_batch (a resume),
    then the next epochs whole: exactly the batches, images included, of a fresh loader per epoch."""
    stream = ShardedSplitStream(members, ToTensor(), SHAPE, 16, workers=workers, seed=1)
    stream.set_epoch(2, 5)
    batches = iter(make_loader(stream, endless=True))
    for epoch, start in ((2, 5), (3, 0), (4, 0)):
        expected = run_stream(members, epoch=epoch, start_batch=start, workers=workers, seed=1)
        got = [next(batches) for _ in expected]
        assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in expected], (epoch, start)
        assert all(torch.equal(g["image"], e["image"]) for g, e in zip(got, expected))
