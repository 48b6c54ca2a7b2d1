"""Padding of the streaming reader's epochs on an ImageNet-shaped root: pure arithmetic on shard lengths.

For each total reader count (ranks x ``data.workers`` of the recipe), the fraction of forward rows per epoch
that are padding (rows no sample fills: ``padding / (samples + padding)``), per split training reads and in
all, under three rules:

- ``shards`` (the former rule): whole shards dealt ``order[rank::world][worker::workers]``, every reader
  padded to the fullest reader's batches; fewer shards than readers was refused (``null``);
- ``equal_ranges``: the end-to-end sample sequence cut into equal ranges, one per reader (sizes +-1 sample),
  each reader padded to whole batches (the same batch count for all);
- ``balanced`` (``amint_dist.data.assignment``, what the reader does): equal ranges per rank, cut among the
  rank's readers batch by batch; padding only where a rank's range ends.

No data is read or decoded. The root: ``--keys`` keys (ImageNet-1k train: 1,281,167) split by the project's
key hash (``amint_dist.data.splits``) with the recipe's fractions, each split cut into shards of
``data.shard_maxcount`` samples in index order (as ``prepare_data.py`` does). Batches per rank: the recipe's
global batch over the ranks (``slurm/vit_imagenet.sh`` sets ``train.batch_size = GLOBAL_BATCH / ranks``), the
external and probe batches from it by the training rules (``amint_dist.train.streams.read_batches``).
``headers_only``: samples before a reader's range in its first shard (it starts mid-shard), over the split's
samples: the reader reads their tar headers and seeks over their contents (``amint_dist.data.tar_seek``).

``--seek-check DIR`` also writes one shard of ``data.shard_maxcount`` random 224-px JPEG samples (jpg, cls,
json; ``webdataset.TarWriter``) under DIR and records the bytes this process reads (``rchar``) to get the
shard's samples from its middle and from its last sample on, with the seek and by reading and dropping.

    python benchmarks/reader_balance.py                      # the ViT-B/16 recipe at 8 ... 2,048 readers
    python benchmarks/reader_balance.py --shard-maxcount 1000 --readers 256
    python benchmarks/reader_balance.py --readers 2048 --seek-check /tmp/seek
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from hydra import compose, initialize_config_dir

from _record import REPO, record
from amint_dist.cli import to_dict
from amint_dist.data.assignment import epoch_shard_order, rank_batches, reader_span, shard_pieces
from amint_dist.data.splits import SPLITS, hash_unit, split_of
from amint_dist.data.tar_seek import samples_from
from amint_dist.train.config import JobConfig
from amint_dist.train.streams import read_batches

GOAL = 0.005  # padding fraction of forward rows, at every size


def recipe(overrides: list[str]) -> JobConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return JobConfig.from_dict(to_dict(compose("train", overrides=overrides)))


def split_counts(keys: int, seed: int, fractions: dict[str, float]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for i in range(keys):
        counts[split_of(hash_unit(seed, f"imagenet_{i:07d}"), fractions)] += 1
    return counts


def shard_lengths(n: int, maxcount: int) -> list[int]:
    return [maxcount] * (n // maxcount) + ([n % maxcount] if n % maxcount else [])


def padding_shards(lengths: list[int], world: int, workers: int, batch: int) -> int | None:
    """The former rule's padding rows (None: refused, fewer shards than readers)."""
    readers = world * workers
    if len(lengths) < readers:
        return None
    order = epoch_shard_order(len(lengths), 0, 0)
    fullest = max(sum(lengths[i] for i in order[r::world][w::workers]) for r in range(world) for w in range(workers))
    return readers * math.ceil(fullest / batch) * batch - sum(lengths)


def padding_equal_ranges(n: int, readers: int, batch: int) -> int:
    return readers * math.ceil(math.ceil(n / readers) / batch) * batch - n


def balanced(lengths: list[int], world: int, workers: int, batch: int) -> tuple[int, int]:
    """Padding rows and samples seeked over (headers read) under the balanced rule, from the assignment itself."""
    n, total = sum(lengths), rank_batches(sum(lengths), world, batch)
    order = epoch_shard_order(len(lengths), 0, 0)
    spans = [reader_span(n, r, world, j, workers, batch) for r in range(world) for j in range(workers)]
    assert sum(len(s) for s in spans) == n
    seeked = sum(pieces[0].start for s in spans if (pieces := shard_pieces(lengths, order, s)))
    return world * total * batch - n, seeked


def bytes_read() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])


def seek_check(directory: Path, samples: int) -> dict:
    """Bytes read to get a shard's samples from position k on: with the seek, and reading and dropping k."""
    directory.mkdir(parents=True, exist_ok=True)
    path, rng = str(directory / "shard.tar"), np.random.default_rng(0)
    with wds.TarWriter(path) as sink:
        for i in range(samples):
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(jpeg, "JPEG", quality=85)
            sink.write({"__key__": f"s{i:06d}", "jpg": jpeg.getvalue(), "cls": b"0", "json": b"{}"})
    out = {"shard_bytes": Path(path).stat().st_size}
    for k in (samples // 2, samples - 1):
        start = bytes_read()
        seeked = [s["__key__"] for s in samples_from(path, k, handler=lambda exn: False)]
        middle = bytes_read()
        dropped = [s["__key__"] for s in itertools.islice(wds.tarfile_to_samples()([{"url": path}]), k, None)]
        assert seeked == dropped
        out[f"from_{k}"] = {"seek_bytes": middle - start, "read_and_drop_bytes": bytes_read() - middle}
    return out


def fraction(padding: int | None, samples: int) -> float | None:
    return None if padding is None else round(padding / (samples + padding), 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="vit_b16_imagenet", help="recipe (configs/experiment/)")
    p.add_argument("--keys", type=int, default=1_281_167, help="keys of the source (ImageNet-1k train)")
    p.add_argument("--shard-maxcount", type=int, default=None, help="samples per shard (default: the recipe's)")
    p.add_argument("--global-batch", type=int, default=1024, help="members per optimizer step, all ranks")
    p.add_argument("--seek-check", type=Path, default=None, help="folder for the one-shard seek measurement")
    p.add_argument("--readers", type=int, nargs="+", default=[8, 32, 64, 256, 512, 2048],
                   help="ranks x data.workers")
    args = p.parse_args()

    base = recipe([f"experiment={args.experiment}", "data.root=unused"])
    workers, maxcount = max(1, base.data.workers), args.shard_maxcount or base.data.shard_maxcount
    counts = split_counts(args.keys, base.data.seed, base.data.fractions)
    sizes = []
    for readers in args.readers:
        world = readers // workers
        cfg = recipe([f"experiment={args.experiment}", "data.root=unused",
                      f"train.batch_size={args.global_batch // world}"])
        rows = {"readers": readers, "ranks": world, "splits": {}}
        totals = {"samples": 0, "shards": 0, "equal_ranges": 0, "balanced": 0}
        for split, batch in read_batches(cfg, counts).items():
            if not batch:
                continue
            lengths, n = shard_lengths(counts[split], maxcount), counts[split]
            old, equal = padding_shards(lengths, world, workers, batch), padding_equal_ranges(n, readers, batch)
            new, seeked = balanced(lengths, world, workers, batch)
            rows["splits"][split] = {"samples": n, "shards": len(lengths), "batch_per_rank": batch,
                                     "padding": {"shards": fraction(old, n), "equal_ranges": fraction(equal, n),
                                                 "balanced": fraction(new, n)},
                                     "headers_only": round(seeked / n, 4)}
            totals["samples"] += n
            totals["shards"] = None if old is None or totals["shards"] is None else totals["shards"] + old
            totals["equal_ranges"] += equal
            totals["balanced"] += new
        rows["padding"] = {rule: fraction(totals[rule], totals["samples"])
                           for rule in ("shards", "equal_ranges", "balanced")}
        sizes.append(rows)
    record("reader_balance", {
        "experiment": args.experiment, "keys": args.keys, "shard_maxcount": maxcount, "workers": workers,
        "global_batch": args.global_batch, "counts": counts, "sizes": sizes,
        "target": f"balanced padding < {GOAL} at every size",
        "met": all(s["padding"]["balanced"] < GOAL for s in sizes),
        **({"seek_check": seek_check(args.seek_check, maxcount)} if args.seek_check else {}),
    })


if __name__ == "__main__":
    main()
