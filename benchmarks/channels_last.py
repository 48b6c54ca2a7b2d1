"""aMINT training steps of CNN backbones in NCHW vs NHWC (``train.channels_last``), alternated in one process.

Both sides are the real ``Trainer.step`` of train_throughput.py (the default experiment's MINT head on
the ``middle`` taps preset, its batch, synthetic in-memory rows) on the same backbone; one side with
``train.channels_last=false``, the other ``true``. The ratio decides ``train.channels_last: auto`` (docs/performance.md).

    python benchmarks/channels_last.py                                   # resnet18, mobilenetv3, convnext at 64 px
    python benchmarks/channels_last.py --models resnet50 --img-size 128 --rounds 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import train_throughput as tt
from _record import alternate, record, set_threads
from amint_dist.train.accelerator import make_accelerator


def bench(name: str, args) -> dict:
    overrides = [f"model.name={name}", "~model.kwargs", "mint.taps=middle", f"model.img_size={args.img_size}", "model.num_classes=10",
                 f"train.batch_size={args.batch_size}"]
    sides, cfg = {}, None
    for label, flag in (("nchw", "false"), ("nhwc", "true")):
        cfg = tt.compose_cfg([*overrides, f"train.channels_last={flag}"])
        accelerator = make_accelerator(cfg.train, cfg.optim)
        sizes = tt.step_sizes(cfg, tt.DIGITS_SIZES)
        shape = (3, args.img_size, args.img_size)
        steps = tt.synthetic_batches(sizes, tt.DIGITS_SIZES, shape, 10, 4, torch.Generator().manual_seed(0))
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        block, _ = tt.make_amint_side(cfg, accelerator, steps, tt.DIGITS_SIZES, Path(args.tmp) / label, sync)
        block(args.warmup)
        sides[label] = lambda b=block: b(args.steps)
    result = alternate(sides, args.rounds)
    return {"model": name, "img_size": args.img_size, "members_batch": args.batch_size,
            "mint": {"taps": cfg.mint.taps, "head": cfg.mint.head.record()}, "device": str(accelerator.device), **result,
            "ratio_nhwc_over_nchw": result["paired_ratio_to_nchw"]["nhwc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_small_100", "convnext_atto"])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="members per step (+ probe and external rows)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="/tmp/amint_bench_channels_last")
    args = p.parse_args()
    threads = set_threads(args.threads)
    for name in args.models:
        record("channels_last", {"threads": threads, **bench(name, args)})


if __name__ == "__main__":
    main()
