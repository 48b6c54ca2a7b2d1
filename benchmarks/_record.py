"""Shared by every benchmark: fixed thread count, machine/git facts, A/B alternation, one JSON line per result.

Each benchmark prints one JSON line per result and appends it to ``benchmarks/results.jsonl`` with the
command that made it, the git revision (short hash + dirty flag) and the machine (CPUs, model, torch,
load average at start and end: this machine is shared, a ratio measured under load is still a ratio).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results.jsonl"
_LOAD_AT_START = os.getloadavg()


def set_threads(n: int | None) -> int:
    """Fix torch's intra-op thread count (and one inter-op thread); return it. None = the CPU count."""
    import torch

    n = int(n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only possible once per process)
        pass
    return n


def git_revision() -> str:
    """``<short hash>`` or ``<short hash>-dirty`` of the repository (uncommitted changes count as dirty)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{rev}-dirty" if git("status", "--porcelain", "--untracked-files=no") else rev


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in _LOAD_AT_START],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def record(benchmark: str, result: Mapping[str, Any], path: Path = RESULTS) -> dict:
    """Print ``result`` (+ command, revision, machine) as one JSON line and append it to ``path``."""
    line = {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "git": git_revision(),
        "machine": machine(),
        **result,
    }
    text = json.dumps(line, sort_keys=False)
    print(text, flush=True)
    with open(path, "a") as f:
        f.write(text + "\n")
    return line


def cpu_seconds() -> float:
    """CPU time of this process (all threads, ns resolution) and of its children that have exited (DataLoader
    workers, once joined; os.times counts those in clock ticks, 10 ms)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def alternate(sides: Mapping[str, Callable[[], int]], rounds: int) -> dict[str, Any]:
    """Run the sides in turn, ``rounds`` times (A B, then B A, ...: noise and drift hit both alike).

    Each side is a callable that runs one block of work to completion (synchronising any device) and
    returns the samples it processed. Per side this returns:

    - ``samples_per_s``: median over blocks of samples / wall seconds; ``rates``: every block's;
    - ``paired_ratio_to_<first>``: median over rounds of (its rate / the first side's rate that round),
      robust to load that changes between rounds;
    - ``best_ratio_to_<first>``: ratio of the fastest blocks (other processes only ever slow a block);
    - ``cpu_ratio_to_<first>``: the same ratio in samples per CPU-second (this process + its exited
      children, e.g. DataLoader workers), which other processes barely move: the best estimate of
      unloaded speed, and the per-core efficiency when a side uses several processes.
    """
    names = list(sides)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), cpu_seconds()
            samples = sides[name]()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            rates[name].append(samples / wall)
            cpu_rates[name].append(samples / max(cpu, 1e-9))
    base = names[0]
    out: dict[str, Any] = {"rounds": rounds, "samples_per_s": {}, "best_samples_per_s": {},
                           "samples_per_cpu_s": {}, "rates": {}, "paired_ratio_to_" + base: {},
                           "best_ratio_to_" + base: {}, "cpu_ratio_to_" + base: {}}
    for n in names:
        out["samples_per_s"][n] = round(statistics.median(rates[n]), 2)
        out["best_samples_per_s"][n] = round(max(rates[n]), 2)
        out["samples_per_cpu_s"][n] = round(statistics.median(cpu_rates[n]), 2)
        out["rates"][n] = [round(x, 2) for x in rates[n]]
        if n != base:
            ratios = [a / b for a, b in zip(rates[n], rates[base])]
            out["paired_ratio_to_" + base][n] = round(statistics.median(ratios), 4)
            out["best_ratio_to_" + base][n] = round(max(rates[n]) / max(rates[base]), 4)
            cpu_ratios = [a / b for a, b in zip(cpu_rates[n], cpu_rates[base])]
            out["cpu_ratio_to_" + base][n] = round(statistics.median(cpu_ratios), 4)
    return out


def verdict(result: Mapping[str, Any], base: str, side: str, minimum: float, name: str) -> dict[str, Any]:
    """A target on ``alternate``'s ratio of ``side`` to ``base``: ``ratio_<name>``, ``cpu_ratio_<name>``, target, met."""
    ratio = result[f"paired_ratio_to_{base}"][side]
    return {f"ratio_{name}": ratio, f"cpu_ratio_{name}": result[f"cpu_ratio_to_{base}"][side],
            "target": f">= {minimum:.2f}", "met": ratio >= minimum}
