"""Streaming reader vs the raw decode limit: images/s, per core, alternated A/B/A/B in one process.

Reader: ``ShardedSplitStream`` + ``make_loader`` (seeded shard order, tar reading, shuffle buffer, decode,
timm eval transform, collation with keys and indices) over one split, for one epoch. Raw limit: the same
tar files read with ``tarfile`` in the same shard order, each image decoded with PIL and put through the
same transform, rows stacked into batches of the same size: no pipeline, no shuffle, no metadata.
Both run in this process (``workers=0``: one core each), so their ratio is the per-core efficiency of
the reader. ``--workers`` adds reader runs with DataLoader worker processes, through one endless loader as
training reads (workers persist and read ahead across epochs): absolute images/s, per core = images/s /
workers, no CPU-time figures (the CPU time of live worker processes is not counted).

    python benchmarks/data_throughput.py                       # generated JPEG root + data/digits
    python benchmarks/data_throughput.py --roots jpeg --n 5000 --rounds 6 --workers 1 2

Roots: ``jpeg`` = a generated imagefolder source of --n JPEGs (--size px, 10 classes) prepared with
``prepare_dataset`` into a temp dir (kept and reused under --tmp); ``digits`` = data/digits (8x8 PNGs,
as prepared by whichever version first wrote it); ``digits_fresh`` = the digits prepared now, under --tmp.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _record import REPO, alternate, record, set_threads, verdict
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, epoch_shard_order, make_loader
from amint_dist.data.prepare import load_manifest, prepare_dataset
from amint_dist.data.sources import IMAGE_EXTENSIONS
from amint_dist.data.transforms import data_config_for, make_transform
from amint_dist.models.backbone import create_backbone


def natural_ish_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with smooth structure (upsampled low-resolution noise), closer to photos than white noise."""
    low = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generated_root(tmp: Path, n: int, size: int, maxcount: int) -> Path:
    """Prepared root of ``n`` generated JPEGs (reused when it exists with the same parameters)."""
    root = tmp / f"jpeg_n{n}_s{size}_c{maxcount}"
    if (root / "splits.json").is_file():
        return root
    source = tmp / f"jpeg_src_n{n}_s{size}"
    if not (source / "done").is_file():
        rng = np.random.default_rng(0)
        for i in range(n):
            d = source / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"img{i:07d}.jpg").write_bytes(natural_ish_jpeg(rng, size))
        (source / "done").write_text("ok")
    prepare_dataset({"kind": "imagefolder", "source": str(source), "root": str(root), "seed": 0,
                     "fractions": {"members": 0.4, "probe": 0.1, "external": 0.25, "heldout": 0.25},
                     "shard_maxcount": maxcount, "shard_maxsize": 10**9, "prepare_workers": 2})
    return root


def fresh_digits_root(tmp: Path) -> Path:
    """The digits root as the current prepare code writes it (configs/data/digits.yaml settings)."""
    root = tmp / "digits_fresh"
    if not (root / "splits.json").is_file():
        prepare_dataset({"kind": "digits", "root": str(root), "seed": 0,
                         "fractions": {"members": 0.40, "probe": 0.10, "external": 0.25, "heldout": 0.25},
                         "shard_maxcount": 32, "shard_maxsize": 10**9, "prepare_workers": 2})
    return root


def pax_headers(url: str) -> int:
    """Tar members carrying a pax extended header (roots prepared before 818ce3c have one per member)."""
    with tarfile.open(url, "r:") as tar:
        return sum(1 for m in tar if m.pax_headers)


def raw_epoch(urls: list[str], order: list[int], transform, batch_size: int) -> int:
    """Decode every image of the shards (in ``order``) with tarfile + PIL + transform; stack batches."""
    rows, n = [], 0
    for i in order:
        with tarfile.open(urls[i], "r:") as tar:
            for member in tar:
                ext = member.name.rsplit(".", 1)[-1]
                if ext not in IMAGE_EXTENSIONS:
                    continue
                data = tar.extractfile(member).read()
                with Image.open(io.BytesIO(data)) as img:
                    rows.append(transform(img.convert("RGB")))
                if len(rows) == batch_size:
                    torch.stack(rows)
                    n, rows = n + len(rows), []
    if rows:
        torch.stack(rows)
        n += len(rows)
    return n


class EndlessReader:
    """``reps`` epochs per call from one ``make_loader(endless=True)`` iterator (the training loop's way)."""

    def __init__(self, stream: ShardedSplitStream, reps: int):
        self.stream, self.reps, self.epoch = stream, reps, 0
        stream.set_epoch(0)
        self.batches = iter(make_loader(stream, endless=True))

    def __call__(self) -> int:
        rows = 0
        for _ in range(self.reps):
            rows += sum(int(next(self.batches)["valid"].sum()) for _ in range(len(self.stream)))
            self.epoch += 1
        return rows


def image_format(url: str) -> str:
    with tarfile.open(url, "r:") as tar:
        return next(m.name.rsplit(".", 1)[-1] for m in tar if m.name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)


def reader_epoch(stream: ShardedSplitStream) -> int:
    stream.set_epoch(0)
    return sum(int(b["valid"].sum()) for b in make_loader(stream))


def bench_root(name: str, root: Path, args) -> dict:
    manifest = load_manifest(root)
    shards = SplitShards.from_root(root, args.split)
    img_size = args.img_size or (32 if name == "digits" else args.size)
    transform_cfg = {"crop_pct": 1.0, "interpolation": "bilinear"} if name == "digits" else {}
    backbone = create_backbone("vit_tiny_patch16_224", num_classes=10, img_size=img_size,
                               kwargs={"patch_size": 4, "embed_dim": 96, "depth": 1, "num_heads": 3})
    data_config = data_config_for(backbone, img_size, transform_cfg=transform_cfg)
    transform = make_transform(data_config, None)
    shape = tuple(data_config["input_size"])
    order = epoch_shard_order(len(shards.urls), 0, 0)

    def stream(workers: int) -> ShardedSplitStream:
        return ShardedSplitStream(shards, transform, shape, args.batch_size, workers=workers, seed=0,
                                  shuffle_buffer=args.shuffle_buffer)

    reps = max(1, -(-args.min_block // shards.num_samples))  # epochs per timed block (small roots: several)
    sides = {"raw": lambda: sum(raw_epoch(list(shards.urls), order, transform, args.batch_size) for _ in range(reps)),
             "reader_w0": lambda s=stream(0): sum(reader_epoch(s) for _ in range(reps))}
    for w in args.workers:
        if w > 0:  # one endless loader, as training reads: workers persist and read ahead across epochs
            sides[f"reader_w{w}"] = EndlessReader(stream(w), reps)
    for side in sides.values():  # warm-up: page cache, imports, worker start paths
        side()
    result = alternate(sides, args.rounds)
    for key in ("samples_per_cpu_s", "cpu_ratio_to_raw"):  # persistent workers' CPU time is not counted
        result[key] = {k: (v if k in ("raw", "reader_w0") else None) for k, v in result[key].items()}
    per_core = {k: round(v / max(1, int(k.split("_w")[1]) if "_w" in k else 1), 2)
                for k, v in result["samples_per_s"].items()}
    return {
        "root": name,
        "root_path": str(root),
        "split": args.split,
        "samples": shards.num_samples,
        "shards": len(shards.urls),
        "image_format": image_format(shards.urls[0]),
        "pax_headers_in_first_shard": pax_headers(shards.urls[0]),
        "source": manifest["source"],
        "transform": {k: data_config[k] for k in ("input_size", "interpolation", "crop_pct")},
        "batch_size": args.batch_size,
        "shuffle_buffer": args.shuffle_buffer,
        "epochs_per_block": reps,
        **result,
        "images_per_s_per_core": per_core,
        **verdict(result, "raw", "reader_w0", 0.85, "reader_over_raw_per_core"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", default=["jpeg", "digits"], choices=["jpeg", "digits", "digits_fresh"])
    p.add_argument("--digits-root", default=str(REPO / "data" / "digits"))
    p.add_argument("--n", type=int, default=5000, help="generated JPEGs")
    p.add_argument("--size", type=int, default=64, help="generated JPEG side (px)")
    p.add_argument("--shard-maxcount", type=int, default=100)
    p.add_argument("--img-size", type=int, default=None, help="transform output (default: 32 digits, --size jpeg)")
    p.add_argument("--split", default="members")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="*", default=[], help="extra reader runs with these worker counts")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--min-block", type=int, default=4000, help="samples per timed block at least (whole epochs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (DataLoader workers use 1)")
    p.add_argument("--tmp", default="/tmp/amint_bench_data")
    args = p.parse_args()
    threads = set_threads(args.threads)
    for name in args.roots:
        if name == "jpeg":
            started = time.perf_counter()
            root = generated_root(Path(args.tmp), args.n, args.size, args.shard_maxcount)
            print(f"generated root {root} ready in {time.perf_counter() - started:.1f}s", flush=True)
        elif name == "digits_fresh":
            root = fresh_digits_root(Path(args.tmp))
        else:
            root = Path(args.digits_root)
        record("data_throughput", {"threads": threads, **bench_root(name, root, args)})


if __name__ == "__main__":
    main()
