"""Accelerate/DeepSpeed glue: CPU fallbacks, the launched world, a shared run dir, rank agreement checks.

``accelerate launch --config_file configs/accelerate/X.yaml`` decides the engine (single process, DDP,
DeepSpeed ZeRO-2/3) and the world; this module makes the same configs work on a machine without CUDA
(gloo, DeepSpeed's CPU accelerator). Training's Accelerator is built in ``amint_dist.train.accelerator``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object


def cpu_only() -> bool:
    """True without CUDA; then point DeepSpeed at its CPU accelerator (before anything imports deepspeed)."""
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return True


cpu_only()  # at import: deepspeed reads DS_ACCELERATOR once, when it is first imported


def under_deepspeed() -> bool:
    """Launched by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def under_fsdp() -> bool:
    """Launched by ``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp2.yaml``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launched_world() -> int:
    """World size the launcher (torchrun / accelerate / srun + accelerate) announced; 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(accelerator: Accelerator | PartialState) -> None:
    """Fail loudly when ranks were launched but Accelerate formed a smaller world (each rank training alone)."""
    if accelerator.num_processes != launched_world():
        raise RuntimeError(f"the launcher started WORLD_SIZE={launched_world()} processes but Accelerate sees "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}); refusing to train "
                           "unsynchronised copies")


def shared_run_dir(accelerator: Accelerator, run_dir: str | None, root: str = "runs") -> Path:
    """The run directory: explicit, else the Slurm job id, else a time stamp chosen on rank 0 and broadcast."""
    if run_dir:
        return Path(run_dir)
    name = [os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return Path(root) / name[0]


@contextmanager
def main_process_holds(state: Accelerator | PartialState,
                       acquire: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Rank 0 calls ``acquire()``, which takes something (the run dir's lock) and returns a context manager that
    releases it after the block; other ranks hold nothing. Whatever ``acquire()`` raises is broadcast: every rank
    raises it together, so none waits in a later collective."""
    held, refusal = None, None
    if state.is_main_process:
        try:
            held = acquire()
        except Exception as e:  # whatever it is, the other ranks must learn of it
            refusal = e
    if state.num_processes > 1:
        shared = [refusal]
        broadcast_object_list(shared, from_process=0)
        refusal = shared[0]
    if refusal is not None:
        raise refusal
    with held or nullcontext():
        yield


def reduce_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (moved to the device for NCCL), back on the CPU."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def mean_over_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of a device tensor over ranks, left on the device (no host sync)."""
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, reduction="mean")


def engine_name(accelerator: Accelerator, model: Any) -> str:
    """``single``, ``ddp``, ``zero<stage>`` or ``fsdp2``, read from the prepared model itself."""
    from torch.distributed.fsdp import FSDPModule

    if hasattr(model, "zero_optimization_stage"):
        return f"zero{model.zero_optimization_stage()}"
    if isinstance(model, FSDPModule):
        return "fsdp2"
    return "ddp" if isinstance(model, torch.nn.parallel.DistributedDataParallel) else "single"


def sharded_engine(accelerator: Accelerator) -> str | None:
    """``DeepSpeed ZeRO-3`` or ``FSDP2`` when the engine partitions the parameters across ranks, else None."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return "FSDP2" if accelerator.state.is_fsdp2 else None


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: free what a no-grad forward left gathered (the root unit keeps its parameters until a backward) and
    register the shards again, as state dicts and loads expect; nothing under other engines."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_parameters(accelerator: Accelerator, model: Any, chunk: int = 64) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter on every rank; ZeRO-3 shards are gathered a chunk at a time, FSDP2's
    (DTensor) one parameter at a time.

    A collective under ZeRO-3 and FSDP2: every rank must iterate it to the end.
    """
    from torch.distributed.tensor import DTensor

    params = list(accelerator.unwrap_model(model).named_parameters())
    if any(isinstance(p, DTensor) for _, p in params):
        for name, p in params:
            yield name, p.full_tensor() if isinstance(p, DTensor) else p
        return
    if not any(hasattr(p, "ds_id") for _, p in params):
        yield from params
        return
    import deepspeed

    for start in range(0, len(params), chunk):
        part = params[start : start + chunk]
        with deepspeed.zero.GatheredParameters([p for _, p in part]):
            yield from part


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int]:
    """sha256 over (name, bytes) of ``named`` tensors in order, and their element count."""
    digest = hashlib.sha256()
    count = 0
    for name, tensor in named:
        t = tensor.detach().cpu().reshape(-1)  # 0-d tensors (scalar buffers) too
        digest.update(name.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
        count += t.numel()
    return digest.hexdigest(), count


def rank_report(accelerator: Accelerator, model: Any, agree: Mapping[str, Any] | None = None) -> dict:
    """This rank's place in the world, a sha256 of the full parameters it would compute with and ``agree``."""
    param_sha256, full = tensors_sha256(full_parameters(accelerator, model))
    params = accelerator.unwrap_model(model).parameters()
    local = sum(_local_numel(p) for p in params)
    return {
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "node_rank": int(os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK") or os.environ.get("SLURM_NODEID") or 0),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "world_size": accelerator.num_processes,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "device": str(accelerator.device),
        "param_numel": full,
        "local_param_numel": local,  # ZeRO-3, FSDP2: this rank's shard only
        "param_sha256": param_sha256,
        **(agree or {}),
    }


def _local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of parameter ``p``: its ZeRO-3 partition, FSDP2 shard, or the whole."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def check_ranks_agree(accelerator: Accelerator, model: Any, agree: Mapping[str, Any] | None = None) -> dict:
    """Gather every rank's report (a collective); raise when ranks hold different parameters or ``agree`` values
    (further state every rank must hold alike, e.g. a digest of the EMA weights)."""
    mine = rank_report(accelerator, model, agree)
    reports = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    summary = {
        "engine": engine_name(accelerator, model),
        "distributed_type": str(accelerator.distributed_type),
        "world_size": accelerator.num_processes,
        "ranks": sorted(reports, key=lambda r: r["rank"]),
    }
    if accelerator.state.deepspeed_plugin is not None:  # less Accelerate's steps_per_print=inf (not JSON)
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        summary["deepspeed_config"] = {k: v for k, v in config.items() if k != "steps_per_print"}
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None:
        summary["fsdp_config"] = {"version": fsdp.fsdp_version, "state_dict_type": str(fsdp.state_dict_type),
                                  "reshard_after_forward": fsdp.reshard_after_forward,
                                  "units": list(fsdp.transformer_cls_names_to_wrap or [])}
    if len({r["param_sha256"] for r in reports}) != 1:
        raise RuntimeError(f"ranks hold different parameters: {[(r['rank'], r['param_sha256'][:12]) for r in reports]}")
    for key in agree or {}:
        if len({repr(r[key]) for r in reports}) != 1:
            raise RuntimeError(f"ranks hold different {key}: {[(r['rank'], r[key]) for r in reports]}")
    return summary
