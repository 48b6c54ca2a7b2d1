"""Reference-model attacks on the default recipe: K reference runs (data.subset.seed = 0..K-1) and the audit of
one target run with K = 1, 2, 4, 8 of them; one table of AUC and TPR at 1% / 0.1% FPR (95% bootstrap
intervals) per method on ``seen``, and the wall time of each reference run.

    python benchmarks/reference_attacks.py                              # the full table: K up to 8, 80 epochs
    python benchmarks/reference_attacks.py --ks 1 2 --train train.epochs=10 --work /tmp/refbench   # reduced

The full version trains 9 runs of the default recipe (~5 min each on 2 idle cores, far more on a shared
machine) and audits four times: hours on 2 cores. Runs already finished under --work are reused (delete the
folder for a fresh measurement); the table goes to --work/table.md and one JSON line to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _record import REPO, record

METHODS = ("amint", "loss", "lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "rmia_online",
           "rmia_offline", "amint_lr", "amint_lr_offline", "blind")
METRICS = (("auc", "AUC"), ("tpr_at_1pct_fpr", "TPR@1%FPR"), ("tpr_at_0.1pct_fpr", "TPR@0.1%FPR"))


def train(run_dir: Path, overrides: list[str]) -> float:
    """Train one run (reused when finished); its wall seconds (0 when reused)."""
    if (run_dir / "model.safetensors").is_file():
        return 0.0
    started = time.perf_counter()
    command = [sys.executable, "launch/train.py", f"run.dir={run_dir}", "run.audit=false", *overrides]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def audit(target: Path, references: list[Path], out_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "launch/audit.py", f"run.dir={target}", f"audit.out_dir={out_dir}",
               "audit.passive.enabled=false", f"audit.reference_runs=[{','.join(map(str, references))}]", *overrides]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "report.json").read_text())


def cell(metric: dict) -> str:
    if metric.get("value") is None:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['ci95'][0]:.3f}, {metric['ci95'][1]:.3f}]"


def table(reports: dict[int, dict], protocol: str) -> list[str]:
    lines = ["| K | method | " + " | ".join(name for _, name in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for k, report in reports.items():
        methods = report["protocols"][protocol]["methods"]
        lines += [f"| {k} | {m} | " + " | ".join(cell(methods[m][key]) for key, _ in METRICS) + " |"
                  for m in METHODS if m in methods]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="reference runs per audit")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "reference_bench", help="run dirs and tables")
    parser.add_argument("--train", nargs="*", default=[], help="overrides of every training run (target, references)")
    parser.add_argument("--audit", nargs="*", default=[], help="overrides of the audits")
    parser.add_argument("--protocol", default="seen")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    target_seconds = train(args.work / "target", args.train)
    seconds = [train(args.work / f"r{r}", [*args.train, f"data.subset.seed={r}"]) for r in range(max(args.ks))]
    reports = {k: audit(args.work / "target", [args.work / f"r{r}" for r in range(k)], args.work / f"audit_k{k}",
                        args.audit) for k in args.ks}
    lines = [f"Protocol `{args.protocol}`; training overrides: {' '.join(args.train) or '(default recipe)'}", "",
             *table(reports, args.protocol), "",
             "Wall seconds per reference run (0: reused): " + ", ".join(f"{s:.0f}" for s in seconds)
             + f"; target run {target_seconds:.0f}."]
    (args.work / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    record("reference_attacks", {
        "ks": args.ks, "train_overrides": args.train, "protocol": args.protocol,
        "reference_run_seconds": [round(s, 1) for s in seconds], "target_run_seconds": round(target_seconds, 1),
        "results": {k: {m: {key: r["protocols"][args.protocol]["methods"][m][key] for key, _ in METRICS}
                        for m in METHODS if m in r["protocols"][args.protocol]["methods"]} for k, r in reports.items()},
    })


if __name__ == "__main__":
    main()
