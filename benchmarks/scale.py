"""ImageNet scale without ImageNet: prepare-data and the exposure ledger at N = 1.28M tiny samples.

1. Source: N digits-like 8x8 grayscale PNGs (sklearn's digits, each with its own seeded pixel noise so
   every image differs) written as WebDataset source shards (``--source-shard`` per tar, like ImageNet's
   train-*.tar), in parallel. Timed, but not part of the prepare figure.
2. Prepare: ``prepare_dataset`` with ``kind: wds`` (scan + hash split + parallel shard writing, the
   ImageNet path) in a fresh child process: wall time, peak RSS of the main process and of the largest
   worker (``getrusage``), samples/s. ``--tracemalloc`` adds the main process's peak Python allocation
   (slower; a separate measurement).
3. Ledger: an ``ExposureLedger`` of the prepared splits, --epochs epochs of ``record`` over every trained
   sample in batches of --batch (time per epoch), the arrays' bytes, ``summed`` + ``save`` time and the
   npz size.

    python benchmarks/scale.py                      # N = 1,281,167 (ImageNet-1k train)
    python benchmarks/scale.py --n 128000           # a smaller N; the JSON carries an extrapolation

Costs on 2 shared cores (see docs/performance.md): a few minutes and ~7 GB of disk under --tmp for the
full N (removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _record import record

IMAGENET_TRAIN = 1_281_167


def _source_shard(job: tuple[str, int, int, int]) -> int:
    """Write source tar ``path`` with samples [start, stop): PNG + cls, keys like ImageNet's."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    path, start, stop, seed = job
    digits = load_digits()
    images, labels = digits.images, digits.target
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for i in range(start, stop):
            rng = np.random.default_rng((seed, i))
            base = images[i % len(images)] * (255.0 / 16.0)
            pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            sink.write({"__key__": f"n{labels[i % len(labels)]:02d}/img_{i:07d}", "png": buf.getvalue(),
                        "cls": str(int(labels[i % len(labels)])).encode()})
    return stop - start


def make_source(directory: Path, n: int, per_shard: int, workers: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    shards = -(-n // per_shard)
    jobs = [(str(directory / f"train-{s:06d}.tar"), s * per_shard, min(n, (s + 1) * per_shard), 0) for s in range(shards)]
    with mp.get_context("fork").Pool(workers) as pool:
        assert sum(pool.imap_unordered(_source_shard, jobs)) == n
    return str(directory / f"train-{{{0:06d}..{shards - 1:06d}}}.tar")


def _prepare_child(cfg_json: str, use_tracemalloc: bool) -> None:
    """Run in a fresh process: prepare the root, print wall time and peak memory as JSON."""
    from amint_dist.data.prepare import prepare_dataset

    cfg = json.loads(cfg_json)
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    started = time.perf_counter()
    manifest = prepare_dataset(cfg)
    wall = time.perf_counter() - started
    out = {
        "wall_s": round(wall, 1),
        "counts": manifest["counts"],
        "total": manifest["total"],
        "shards": {s: len(m["shards"]) for s, m in manifest["splits"].items()},
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    if use_tracemalloc:
        out["tracemalloc_peak_main_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    print("RESULT " + json.dumps(out), flush=True)


def prepare(pattern: str, root: Path, args) -> dict:
    cfg = {"kind": "wds", "source": pattern, "root": str(root), "seed": 0,
           "fractions": {"members": 0.40, "probe": 0.10, "external": 0.25, "heldout": 0.25},
           "image_field": "png", "label_field": "cls", "num_classes": 10,
           "shard_maxcount": args.shard_maxcount, "shard_maxsize": 10**9, "prepare_workers": args.workers}
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, __file__, "--_prepare-child", json.dumps(cfg)] + (["--tracemalloc"] if args.tracemalloc else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def ledger_at_scale(root: Path, epochs: int, batch: int, tmp: Path) -> dict:
    import torch

    from amint_dist.data.prepare import load_manifest
    from amint_dist.records.ledger import ExposureLedger

    counts = {s: int(n) for s, n in load_manifest(root)["counts"].items()}
    ledger = ExposureLedger(counts)
    rng = np.random.default_rng(0)
    epoch_s = []
    for _ in range(epochs):
        started = time.perf_counter()
        for split in ("members", "probe", "external"):
            order = torch.from_numpy(rng.permutation(counts[split]))
            for b in range(0, len(order), batch):
                index = order[b:b + batch]
                ledger.record(split, index, torch.ones(len(index), dtype=torch.bool))
        epoch_s.append(time.perf_counter() - started)
    trained = sum(counts[s] for s in ("members", "probe", "external"))
    assert sum(ledger.total().values()) == trained * epochs
    started = time.perf_counter()
    ledger.summed(lambda t: t).save(tmp / "ledger.npz")
    save_s = time.perf_counter() - started
    steps_per_epoch = -(-counts["members"] // batch)
    return {
        "samples": sum(counts.values()),
        "arrays_mb": round(sum(c.nbytes for c in ledger.counts.values()) / 2**20, 2),
        "update_s_per_epoch": round(float(np.median(epoch_s)), 3),
        "update_us_per_step": round(float(np.median(epoch_s)) / steps_per_epoch * 1e6, 2),
        "batch": batch,
        "epochs": epochs,
        "summed_and_save_s": round(save_s, 3),
        "npz_mb": round((tmp / "ledger.npz").stat().st_size / 2**20, 2),
    }


def main() -> None:
    if "--_prepare-child" in sys.argv:
        i = sys.argv.index("--_prepare-child")
        _prepare_child(sys.argv[i + 1], "--tracemalloc" in sys.argv)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=IMAGENET_TRAIN, help="samples (default: ImageNet-1k train)")
    p.add_argument("--source-shard", type=int, default=1000, help="samples per source tar")
    p.add_argument("--shard-maxcount", type=int, default=1000, help="data.shard_maxcount of the prepared root")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data.prepare_workers")
    p.add_argument("--epochs", type=int, default=3, help="ledger epochs simulated")
    p.add_argument("--batch", type=int, default=128, help="members per ledger update step")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--tmp", default="/tmp/amint_bench_scale")
    p.add_argument("--keep", action="store_true", help="keep the generated source and root")
    args = p.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    source_dir, root = tmp / f"source_n{args.n}", tmp / f"root_n{args.n}"
    started = time.perf_counter()
    if not (source_dir / "done").is_file():
        shutil.rmtree(source_dir, ignore_errors=True)
        make_source(source_dir, args.n, args.source_shard, args.workers)
        (source_dir / "done").write_text("ok")
    pattern = str(source_dir / f"train-{{{0:06d}..{-(-args.n // args.source_shard) - 1:06d}}}.tar")
    source_s = time.perf_counter() - started
    print(f"source of {args.n} samples ready in {source_s:.1f}s", flush=True)
    prep = prepare(pattern, root, args)
    print(f"prepared in {prep['wall_s']}s", flush=True)
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    ledger = ledger_at_scale(root, args.epochs, args.batch, tmp)
    scale_to = IMAGENET_TRAIN / args.n
    result = {
        "n": args.n,
        "workers": args.workers,
        "source_generation_s": round(source_s, 1),
        "prepare": {**prep, "samples_per_s": round(args.n / prep["wall_s"], 1), "root_disk_mb": round(disk / 2**20, 1)},
        "ledger": ledger,
        "targets": {"ledger_mb_per_rank": "< 10 at 1.28M samples"},
        "met": ledger["arrays_mb"] * scale_to < 10,
    }
    if args.n != IMAGENET_TRAIN:
        result["extrapolated_to_1_28M"] = {
            "label": f"EXTRAPOLATED linearly from n={args.n} (x{scale_to:.2f}), not measured",
            "prepare_wall_s": round(prep["wall_s"] * scale_to, 1),
            "ledger_arrays_mb": round(ledger["arrays_mb"] * scale_to, 2),
            "root_disk_mb": round(disk / 2**20 * scale_to, 1),
        }
    record("scale", result)
    if not args.keep:
        shutil.rmtree(source_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
