"""Accelerate/DeepSpeed glue: one Accelerator per run, a run directory shared by every rank."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the GPU supports it, else full precision (CPU autocast is slow)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(train_cfg: Mapping[str, Any]) -> Accelerator:
    """The run's single Accelerator (DeepSpeed/DDP settings come from ``accelerate launch``)."""
    return Accelerator(
        mixed_precision=resolve_precision(str(train_cfg["precision"])),
        gradient_accumulation_steps=int(train_cfg["grad_accum"]),
    )


def shared_run_dir(accelerator: Accelerator, run_dir: str | None, root: str = "runs") -> Path:
    """The run directory: explicit, else the Slurm job id, else a time stamp chosen on rank 0 and broadcast."""
    if run_dir:
        return Path(run_dir)
    name = [os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return Path(root) / name[0]


def reduce_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (moved to the device for NCCL), back on the CPU."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()
