"""Exposure ledger: update cost per optimizer step against a measured default step, and its memory at scale.

Update: ``ExposureLedger.record`` for one step's member, probe and external batches (the loop calls it once
per split per micro-step), on a ledger of --samples samples (ImageNet-1k: 1.28M, split like
configs/data/*.yaml), timed over many steps with random indices. Step time: the median of real
``Trainer.step`` calls of the default configuration (vit_digits, configs/train/default.yaml batch)
measured in this process (see train_throughput.py). Memory: the ledger's arrays (bytes per rank), the
Python allocations of building it (tracemalloc), the transient peak of ``summed`` + ``save`` (the end of
training) and the size of the saved ``ledger.npz`` after a realistic number of epochs.

    python benchmarks/ledger_overhead.py
    python benchmarks/ledger_overhead.py --samples 1281167 --members-batch 128 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from _record import record, set_threads
from amint_dist.records.ledger import ExposureLedger

FRACTIONS = {"members": 0.40, "probe": 0.10, "external": 0.25, "heldout": 0.25}


def split_sizes(samples: int) -> dict[str, int]:
    sizes = {s: int(samples * f) for s, f in FRACTIONS.items()}
    sizes["heldout"] += samples - sum(sizes.values())
    return sizes


def step_batches(sizes: dict[str, int], members_batch: int, gen: torch.Generator) -> dict[str, tuple]:
    """(index, valid) per split for one step, sized like training's streams (probe 'auto', external 1:1)."""
    rows = {"members": members_batch, "probe": max(1, round(members_batch * sizes["probe"] / sizes["members"])),
            "external": members_batch}
    out = {}
    for split, n in rows.items():
        valid = torch.ones(n, dtype=torch.bool)
        valid[-1] = False  # a padding row, as at the end of an epoch (never counted)
        out[split] = (torch.randint(0, sizes[split], (n,), generator=gen), valid)
    return out


def time_updates(ledger: ExposureLedger, batches: list[dict], repeats: int) -> float:
    """Median seconds of one step's updates (record per split), over ``repeats`` blocks of all batches."""
    per_step = []
    for _ in range(repeats):
        t = time.perf_counter()
        for step in batches:
            for split, (index, valid) in step.items():
                ledger.record(split, index, valid)
        per_step.append((time.perf_counter() - t) / len(batches))
    return statistics.median(per_step)


def default_step_seconds(steps: int) -> float:
    """Median wall seconds of the real loop's default micro-step (vit_digits, default batch)."""
    import itertools

    import train_throughput as tt

    cfg = tt.compose_cfg(["model.num_classes=10"])
    accelerator = tt.make_accelerator(cfg.train, cfg.optim)
    sizes = tt.step_sizes(cfg, tt.DIGITS_SIZES)
    shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    inputs = tt.synthetic_batches(sizes, tt.DIGITS_SIZES, shape, 10, 4, torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="amint_ledger_"))
    _, trainer = tt.make_amint_side(cfg, accelerator, inputs, tt.DIGITS_SIZES, tmp, lambda: None)
    steps_in = itertools.cycle(inputs)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        trainer.step(next(steps_in))
        if i >= 2:  # the first steps set the loss normalisers
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory(samples: int, epochs: int, tmp: Path) -> dict:
    sizes = split_sizes(samples)
    tracemalloc.start()
    ledger = ExposureLedger(sizes)
    built, built_peak = tracemalloc.get_traced_memory()
    rng = np.random.default_rng(0)
    for split, c in ledger.counts.items():  # a realistic state: trained splits seen ~epochs times each
        if split != "heldout":
            c += rng.poisson(epochs, size=len(c)).astype(np.int32)
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    # a real reduce returns a new tensor (accelerate clones before all_reduce); copied by NumPy here, whose
    # allocations tracemalloc sees (torch's it does not)
    summed = ledger.summed(lambda t: torch.from_numpy(t.numpy().copy()))
    summed.save(tmp / "ledger.npz")
    _, end_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "samples": samples,
        "split_sizes": sizes,
        "arrays_bytes": sum(c.nbytes for c in ledger.counts.values()),
        "arrays_mb": round(sum(c.nbytes for c in ledger.counts.values()) / 2**20, 2),
        "build_traced_mb": round(built / 2**20, 2),
        "build_traced_peak_mb": round(built_peak / 2**20, 2),
        "end_of_training_transient_peak_mb": round((end_peak - before) / 2**20, 2),
        "npz_mb_after_epochs": round((tmp / "ledger.npz").stat().st_size / 2**20, 2),
        "epochs_simulated": epochs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_281_167, help="dataset size (ImageNet-1k train: 1,281,167)")
    p.add_argument("--members-batch", type=int, nargs="+", default=[32, 128], help="members per step (per rank)")
    p.add_argument("--steps", type=int, default=2000, help="steps of ledger updates per timing block")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--step-steps", type=int, default=15, help="real loop steps timed for the default step time")
    p.add_argument("--epochs", type=int, default=300, help="exposures per sample simulated for the npz size")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads = set_threads(args.threads)
    sizes = split_sizes(args.samples)
    gen = torch.Generator().manual_seed(0)
    updates = {}
    ledger = ExposureLedger(sizes)
    for mb in args.members_batch:
        batches = [step_batches(sizes, mb, gen) for _ in range(args.steps)]
        updates[mb] = time_updates(ledger, batches, args.repeats)
    step = default_step_seconds(args.step_steps)
    fraction = updates[args.members_batch[0]] / step
    with tempfile.TemporaryDirectory() as tmp:
        mem = memory(args.samples, args.epochs, Path(tmp))
    record("ledger_overhead", {
        "threads": threads,
        "update_us_per_step": {str(mb): round(s * 1e6, 2) for mb, s in updates.items()},
        "default_step_ms": round(step * 1e3, 2),
        "default_members_batch": args.members_batch[0],
        "update_fraction_of_default_step": round(fraction, 6),
        "memory": mem,
        "target": "update < 1% of step time; ledger < 10 MB per rank at 1.28M samples",
        "met": fraction < 0.01 and mem["arrays_mb"] < 10 and mem["end_of_training_transient_peak_mb"] < 10,
    })


if __name__ == "__main__":
    main()
