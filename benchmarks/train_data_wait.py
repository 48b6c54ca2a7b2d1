"""Data-wait fraction of real short training runs for several loader worker counts, alternated.

Runs ``python launch/train.py`` (the real loop, real streaming reader, real data root) for a few epochs
with ``data.workers`` = each of --workers in turn, --rounds times (A B C, C B A, ...), and reads the
per-epoch ``data_wait_frac`` (time waiting for the member/probe/external batches / micro-step time) and
``samples_per_s`` from each run's metrics.jsonl. Epoch 0 includes worker start-up and the first-step
normalisers; ``steady`` averages the later epochs.

    python benchmarks/train_data_wait.py                          # digits, workers 0 1 2, 3 epochs
    python benchmarks/train_data_wait.py --workers 2 --epochs 4 --threads 2 -- train.batch_size=64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _record import REPO, record, set_threads


def run_training(workers: int, args, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), f"run.dir={run_dir}", f"data.root={args.data_root}",
           f"data.workers={workers}", f"train.epochs={args.epochs}", "audit=false", "train.ckpt_every_epochs=0",
           *args.override]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "wait": [e["data_wait_frac"] for e in epochs],
            "samples_per_s": [e["samples_per_s"] for e in epochs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the training process")
    p.add_argument("--data-root", default=str(REPO / "data" / "digits"))
    p.add_argument("--tmp", default="/tmp/amint_bench_wait")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for the training runs")
    args = p.parse_args()
    set_threads(args.threads)
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for r in range(args.rounds):
        for w in args.workers if r % 2 == 0 else list(reversed(args.workers)):
            runs[w].append(run_training(w, args, Path(args.tmp) / f"w{w}"))
            print(f"round {r} workers={w}: {runs[w][-1]}", flush=True)
    summary = {}
    for w, rs in runs.items():
        steady = [x for run in rs for x in run["wait"][1:]] or [x for run in rs for x in run["wait"]]
        rate = [x for run in rs for x in run["samples_per_s"][1:]] or [x for run in rs for x in run["samples_per_s"]]
        summary[f"workers_{w}"] = {
            "data_wait_frac_steady": round(statistics.median(steady), 4),
            "data_wait_frac_epoch0": round(statistics.median([run["wait"][0] for run in rs]), 4),
            "samples_per_s_steady": round(statistics.median(rate), 1),
            "wall_s": [run["wall_s"] for run in rs],
            "runs": rs,
        }
    default = None
    cfg_workers = None
    for line in (REPO / "configs" / "data" / "digits.yaml").read_text().splitlines():
        if line.startswith("workers:"):
            cfg_workers = int(line.split(":")[1].split("#")[0])
    if cfg_workers in runs:
        default = summary[f"workers_{cfg_workers}"]["data_wait_frac_steady"]
    record("train_data_wait", {
        "threads": args.threads,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "data_root": args.data_root,
        "overrides": args.override,
        "by_workers": summary,
        "default_workers": cfg_workers,
        "data_wait_frac_default_workers": default,
        "target": "< 0.05",
        "met": default is not None and default < 0.05,
    })


if __name__ == "__main__":
    main()
