"""The compute dtype is read from the prepared engine and checked against train.precision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_distributed import launcher
from train_helpers import ENV, REPO, free_port, run_train

from amint_dist.config import ConfigError
from amint_dist.train.precision import check_compute_dtype, compute_dtype


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Dropout(0.5))


def test_compute_dtype_reads_the_autocast_a_forward_runs_under():
    net = small_net().train()
    assert compute_dtype(net, (3, 2, 2), torch.device("cpu")) == torch.float32
    net.forward = torch.autocast("cpu", dtype=torch.bfloat16)(net.forward)  # as Accelerate patches it
    assert compute_dtype(net, (3, 2, 2), torch.device("cpu")) == torch.bfloat16
    assert net.training  # the mode is restored


def test_bf16_asked_but_fp32_computed_is_refused():
    check_compute_dtype("bf16", torch.bfloat16)
    check_compute_dtype("no", torch.float32)
    with pytest.raises(ConfigError, match="resolved to bf16 but the engine computes in torch.float32"):
        check_compute_dtype("bf16", compute_dtype(small_net(), (3, 2, 2), torch.device("cpu")))


def test_fp32_run_states_fp32(tmp_path, train_root):
    proc = run_train(tmp_path / "run", train_root, "train.precision=no", "train.max_steps=1")
    assert "compute dtype: torch.float32 (train.precision=no -> no)" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed_zero2", "ddp"])
def test_bf16_engine_computes_in_bf16_on_cpu(tmp_path, train_root, engine):
    """The real engine, one process: DeepSpeed's torch_autocast (or Accelerate's autocast) reaches the Linears."""
    proc = run_train(tmp_path / "run", train_root, "train.precision=bf16", "train.max_steps=1",
                     launcher=launcher(engine, "--num_processes", "1"))
    assert "compute dtype: torch.bfloat16 (train.precision=bf16 -> bf16)" in proc.stdout


ENGINE_SCRIPT = """
import sys, torch, deepspeed
from amint_dist.config import ConfigError
from amint_dist.train.precision import check_compute_dtype, compute_dtype
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True,
          "torch_autocast": {"enabled": sys.argv[1] == "on", "dtype": "bfloat16"}}
engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), config=config)
dtype = compute_dtype(engine, (3, 2, 2), torch.device("cpu"))
try:
    check_compute_dtype("bf16", dtype)
    print("accepted", dtype)
except ConfigError as e:
    print("refused:", e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("autocast, said", [
    ("on", "accepted torch.bfloat16"),
    ("off", "refused: train.precision resolved to bf16 but the engine computes in torch.float32"),
])
def test_a_real_deepspeed_engine_without_torch_autocast_is_refused_for_bf16(autocast, said):
    """A real ZeRO-2 engine on CPU, its torch_autocast off: what an older DeepSpeed ignoring the key runs."""
    env = {**ENV, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, autocast], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert said in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
