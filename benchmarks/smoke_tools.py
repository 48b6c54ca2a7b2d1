"""Helpers of benchmarks/gpu_smoke.sh: write a class-per-folder tree of real JPEGs; summarise a training run.

    python benchmarks/smoke_tools.py images DIR --count 2000 --size 224 --classes 10
    python benchmarks/smoke_tools.py summary RUN_DIR LOG --name vit_l16_ckpt_on --results OUT.jsonl [--fact KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from _record import record
from PIL import Image


def write_images(root: Path, count: int, size: int, classes: int) -> None:
    """``count`` random-texture JPEGs (quality 90), ``size`` x ``size``, dealt round-robin into ``classes`` folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)  # smooth: JPEG-like sizes
        image = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def last_scalar(tb_dir: Path, tag: str) -> float | None:
    """The last value of a TensorBoard scalar, None when it was never written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)[-1].value if tag in events.Tags()["scalars"] else None


def summary(run_dir: Path, log: Path) -> dict:
    """What a short training run showed: the compute dtype it asserted, peak memory, last samples/s."""
    text = log.read_text(errors="replace")
    dtype = re.search(r"compute dtype: (\S+)", text)
    return {"compute_dtype": dtype[1] if dtype else None,
            "peak_memory_gib": last_scalar(run_dir / "tb", "train/peak_memory_gib"),
            "samples_per_s": last_scalar(run_dir / "tb", "train/samples_per_s"),
            "grad_norm": last_scalar(run_dir / "tb", "train/grad_norm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    images = sub.add_parser("images")
    images.add_argument("dir", type=Path)
    images.add_argument("--count", type=int, default=2000)
    images.add_argument("--size", type=int, default=224)
    images.add_argument("--classes", type=int, default=10)
    run = sub.add_parser("summary")
    run.add_argument("run_dir", type=Path)
    run.add_argument("log", type=Path)
    run.add_argument("--name", required=True)
    run.add_argument("--results", type=Path, required=True)
    run.add_argument("--fact", action="append", default=[], help="KEY=VALUE recorded with the summary")
    args = p.parse_args()
    if args.command == "images":
        write_images(args.dir, args.count, args.size, args.classes)
    else:
        facts = dict(fact.split("=", 1) for fact in args.fact)
        record("gpu_smoke_run", {"name": args.name, **facts, **summary(args.run_dir, args.log)}, args.results)


if __name__ == "__main__":
    main()
