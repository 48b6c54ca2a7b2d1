"""Where an aMINT step spends its time beyond a plain step: torch.profiler, op by op (a profile, not a benchmark).

Builds both sides exactly as train_throughput.py does, prints each side's CPU time per step (thread time:
other processes on a shared machine barely move it), then the operators sorted by how much more self time
per step the aMINT side spends on them than the plain side.

    python benchmarks/profile_step.py                    # vit_digits, 1 thread
    python benchmarks/profile_step.py --model vit_small --steps 3
    python benchmarks/profile_step.py --before           # the code before the performance work
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import train_throughput as tt
from _record import set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_digits", choices=list(tt.MODELS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=30, help="operators listed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small-img-size", type=int, default=64)
    p.add_argument("--before", action="store_true", help="default AdamW kernels and plain pooling in the head")
    p.add_argument("override", nargs="*")
    args = p.parse_args()
    set_threads(args.threads)
    overrides, num_classes, split_sizes = tt.MODELS[args.model]
    overrides = [*overrides, f"model.num_classes={num_classes}", *args.override]
    if args.model == "vit_small":
        overrides += [f"model.img_size={args.small_img_size}", f"train.batch_size={tt.CPU_BATCH['vit_small']}"]
    cfg = tt.compose_cfg(overrides)
    accelerator = tt.make_accelerator(cfg.train, cfg.optim)
    sizes = tt.step_sizes(cfg, split_sizes)
    shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    steps = tt.synthetic_batches(sizes, split_sizes, shape, num_classes, 4, torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="amint_profile_"))
    amint, _ = tt.make_amint_side(cfg, accelerator, steps, split_sizes, tmp, lambda: None, before=args.before)
    plain = tt.make_plain_side(cfg, accelerator, steps, lambda: None, before=args.before)
    amint(2), plain(2)
    for name, side in (("amint", amint), ("plain", plain)):
        t = time.thread_time()
        side(args.steps)
        print(f"{name}: {(time.thread_time() - t) / args.steps * 1e3:.1f} ms CPU per step")

    def ops(side) -> dict[str, tuple[float, float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side(args.steps)
        return {e.key: (e.self_cpu_time_total / 1e3 / args.steps, e.count / args.steps) for e in prof.key_averages()}

    a, b = ops(amint), ops(plain)
    zero = (0.0, 0.0)
    keys = sorted(set(a) | set(b), key=lambda k: -(a.get(k, zero)[0] - b.get(k, zero)[0]))
    print(f"{'operator (self time per step)':58s} {'aMINT ms':>9s} {'plain ms':>9s} {'extra':>7s} {'calls':>6s} {'calls':>6s}")
    for k in keys[:args.rows]:
        x, y = a.get(k, zero), b.get(k, zero)
        print(f"{k[:58]:58s} {x[0]:9.2f} {y[0]:9.2f} {x[0] - y[0]:7.2f} {x[1]:6.0f} {y[1]:6.0f}")
    print(f"{'total':58s} {sum(v[0] for v in a.values()):9.2f} {sum(v[0] for v in b.values()):9.2f}")


if __name__ == "__main__":
    main()
