"""Data-wait fraction of real short training runs for several loader worker counts, alternated.

Runs ``python launch/train.py`` (the real loop, real streaming reader, real data root) for a few epochs
with ``data.workers`` = each of --workers in turn, --rounds times (A B C, C B A, ...), and reads the
per-epoch ``data_wait_frac`` (time waiting for the member/probe/external batches / micro-step time) and
``samples_per_s`` from each run's metrics.jsonl. Epoch 0 includes worker start-up and the first-step
normalisers; ``steady`` averages the later epochs.

    python benchmarks/train_data_wait.py                          # digits, workers 0 1 2, 3 epochs
    python benchmarks/train_data_wait.py --workers 2 --epochs 4 --threads 2 -- train.batch_size=64
    python benchmarks/train_data_wait.py --workers 2 --ref-before 8865112   # before/after a change, alternated

``--ref-before REF`` also runs the code of git revision REF (``git archive`` into --tmp, imported first through
PYTHONPATH), alternating with the working tree: a before/after comparison under the same machine load.
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

from omegaconf import OmegaConf

from _record import REPO, record, set_threads


def export_revision(ref: str, tmp: Path) -> Path:
    """The tree of git revision ``ref`` under ``tmp`` (git archive: the repository itself is not touched)."""
    rev = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    out = tmp / f"rev-{rev}"
    if not (out / "launch" / "train.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run_training(workers: int, args, run_dir: Path, code: Path = REPO) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(code / "launch" / "train.py"), f"run.dir={run_dir}", f"data.root={args.data_root}",
           f"data.workers={workers}", f"train.epochs={args.epochs}", "run.audit=false", "train.ckpt_every_epochs=0",
           *args.override]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    if code != REPO:  # that revision's amint_dist before the installed (editable) one
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "wait": [e["data_wait_frac"] for e in epochs],
            "samples_per_s": [e["samples_per_s"] for e in epochs]}


def summarise(runs: list[dict]) -> dict:
    steady = [x for run in runs for x in run["wait"][1:]] or [x for run in runs for x in run["wait"]]
    rate = [x for run in runs for x in run["samples_per_s"][1:]] or [x for run in runs for x in run["samples_per_s"]]
    return {
        "data_wait_frac_steady": round(statistics.median(steady), 4),
        "data_wait_frac_epoch0": round(statistics.median([run["wait"][0] for run in runs]), 4),
        "samples_per_s_steady": round(statistics.median(rate), 1),
        "wall_s": [run["wall_s"] for run in runs],
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process")
    p.add_argument("--data-root", default=str(REPO / "data" / "digits"))
    p.add_argument("--ref-before", default=None, help="also run git revision REF, alternated (before/after)")
    p.add_argument("--tmp", default="/tmp/amint_bench_wait")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for the training runs")
    args = p.parse_args()
    set_threads(args.threads)
    tmp = Path(args.tmp)
    code = {"now": REPO}
    if args.ref_before:
        code["before"] = export_revision(args.ref_before, tmp)
    sides = [(v, w) for w in args.workers for v in code]
    runs: dict[tuple[str, int], list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for v, w in sides if r % 2 == 0 else list(reversed(sides)):
            runs[v, w].append(run_training(w, args, tmp / f"{v}-w{w}", code[v]))
            print(f"round {r} {v} workers={w}: {runs[v, w][-1]}", flush=True)
    by_workers = {f"workers_{w}": summarise(runs["now", w]) for w in args.workers}
    default_workers = int(OmegaConf.load(REPO / "configs" / "data" / "digits.yaml")["workers"])
    default = by_workers.get(f"workers_{default_workers}", {}).get("data_wait_frac_steady")
    result = {
        "threads": args.threads,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "data_root": args.data_root,
        "overrides": args.override,
        "by_workers": by_workers,
        "default_workers": default_workers,
        "data_wait_frac_default_workers": default,
        "target": "< 0.05",
        "met": default is not None and default < 0.05,
    }
    if args.ref_before:
        result["before"] = {"ref": code["before"].name.removeprefix("rev-"),
                            "by_workers": {f"workers_{w}": summarise(runs["before", w]) for w in args.workers}}
    record("train_data_wait", result)


if __name__ == "__main__":
    main()
