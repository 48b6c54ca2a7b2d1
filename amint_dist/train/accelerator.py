"""The run's Accelerator: precision (``train.precision`` vs Accelerate's own setting), DeepSpeed's config filled
from the Hydra config (which owns batch size, accumulation, clipping and precision), CPU fallbacks."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from amint_dist.config import ConfigError, leaves
from amint_dist.dist import check_world, cpu_only, launched_world, under_deepspeed, under_fsdp
from amint_dist.train.config import OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed config keys the Hydra config owns (train.batch_size, train.grad_accum, optim.clip_grad, train.precision)
DS_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "torch_autocast")


def launcher_precision() -> str | None:
    """The mixed precision ``accelerate launch`` was given (``--mixed_precision`` or the accelerate config file,
    exported as ACCELERATE_MIXED_PRECISION); None when unset or ``no``, the launcher's default."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return None if value == "no" else value


def resolve_precision(precision: str) -> str:
    """The run's mixed precision from ``train.precision``: ``auto`` takes Accelerate's setting (launcher flag or
    config file) when there is one, else bf16 where the GPU supports it, else full precision (CPU autocast is
    slow); an explicit value wins, and one that contradicts Accelerate's setting is refused."""
    accelerate = launcher_precision()
    if precision == "auto":
        if accelerate:
            return accelerate
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if accelerate and accelerate != precision:
        raise ConfigError(f"train.precision={precision!r}: accelerate launch set mixed_precision {accelerate} "
                          "(--mixed_precision or the accelerate config); pass train.precision=auto to take it, or the "
                          "same value")
    return precision


def make_accelerator(train_cfg: TrainConfig, optim_cfg: OptimConfig) -> Accelerator:
    """The run's single Accelerator (its process group times out after ``train.dist_timeout_s``); refuses a world
    smaller than the launcher started."""
    precision = resolve_precision(train_cfg.precision)
    kwargs: dict[str, Any] = {}
    no_cuda = cpu_only()
    group = {"timeout": timedelta(seconds=train_cfg.dist_timeout_s)}
    if under_deepspeed():
        kwargs["deepspeed_plugin"] = deepspeed_plugin(deepspeed_config(train_cfg, optim_cfg, precision))
        if no_cuda:  # Accelerate picks no backend on CPU unless told: every rank would think it is alone
            group["backend"] = "gloo"
    elif under_fsdp():
        kwargs["fsdp_plugin"] = fsdp2_plugin()
        kwargs["cpu"] = no_cuda  # without CUDA: a gloo world first, made FSDP by fsdp_on_cpu
    elif no_cuda and launched_world() > 1:
        kwargs["cpu"] = True  # Accelerate's multi-CPU DDP over gloo
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=train_cfg.grad_accum,
                              kwargs_handlers=[InitProcessGroupKwargs(**group)], **kwargs)
    if under_fsdp() and no_cuda:
        fsdp_on_cpu(accelerator, kwargs["fsdp_plugin"])
    check_world(accelerator)
    return accelerator


def fsdp2_plugin() -> FullyShardedDataParallelPlugin:
    """The launcher's FSDP plugin (its FSDP_* environment, from configs/accelerate/fsdp2.yaml); FSDP1 is refused."""
    version = os.environ.get("FSDP_VERSION", "1")  # the launcher's default; read first (FSDP1's plugin needs a GPU)
    if version != "2":
        raise ConfigError(f"fsdp_version {version}: only FSDP2 is supported (configs/accelerate/fsdp2.yaml)")
    return FullyShardedDataParallelPlugin()


def fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """FSDP2 over gloo on a machine without CUDA. Accelerate selects FSDP only on accelerator devices (its state
    keeps MULTI_CPU and silently drops the plugin), while ``fully_shard`` itself shards, gathers and
    reduce-scatters CPU tensors over gloo; so the CPU world Accelerate formed gets the FSDP type and the
    launcher's plugin, and Accelerate's own FSDP2 paths (prepare, clipping, save/load_state, full state dict)
    run as on GPUs (``PartialState`` holds the type too: every later ``AcceleratorState`` copies it from there, as
    Accelerate's own FSDP set-up writes it)."""
    if accelerator.num_processes < 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(f"FSDP on a machine without CUDA needs a gloo world of >= 2 processes, not "
                          f"{accelerator.num_processes} ({accelerator.distributed_type}); launch with --num_processes 2")
    PartialState().distributed_type = DistributedType.FSDP  # as Accelerate does: every later state copies it
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def deepspeed_config_path() -> Path:
    """The JSON named by the accelerate config (relative paths: from the working dir, else the repo)."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if name == "none":
        raise ValueError("DeepSpeed launch without deepspeed_config_file: use configs/accelerate/deepspeed_zero*.yaml")
    path = Path(name)
    return path if path.is_absolute() or path.exists() else REPO / path


def deepspeed_config(train_cfg: TrainConfig, optim_cfg: OptimConfig, precision: str,
                     path: Path | None = None) -> dict:
    """The DeepSpeed config: the JSON's ZeRO settings plus the numbers the Hydra config owns; no ``auto``.

    ``train_micro_batch_size_per_gpu`` counts member rows (``train.batch_size``): a micro-batch forward also
    carries probe and external rows, but DeepSpeed uses the number only for ``train_batch_size`` bookkeeping
    and throughput logs; the loss is normalised by the loop. Clipping is DeepSpeed's (``engine.step``), since
    ``accelerator.clip_grad_norm_`` does nothing under DeepSpeed. bf16 is DeepSpeed's ``torch_autocast``:
    fp32 weights (as under DDP), bf16 matmuls, so checkpoints and the final weights stay fp32.
    """
    path = path or deepspeed_config_path()
    cfg = json.loads(Path(path).read_text())
    autos = [key for key, value in leaves(cfg) if value == "auto"]
    if autos:
        raise ValueError(f"{path}: 'auto' needs a HF model config; give numbers for {', '.join(autos)}")
    owned = [k for k in DS_OWNED_KEYS if k in cfg]
    if owned:
        raise ValueError(f"{path} sets {', '.join(owned)}: these come from train.batch_size, train.grad_accum, "
                         "optim.clip_grad and train.precision; remove them from the JSON")
    if precision == "fp16":
        raise ValueError("train.precision=fp16 under DeepSpeed is not supported here: use bf16 or no")
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ValueError(f"{path}: ZeRO-3 needs stage3_gather_16bit_weights_on_model_save: true "
                             "(model.safetensors is consolidated from the shards)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg.update({
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": optim_cfg.clip_grad,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
    })
    return cfg


def deepspeed_plugin(config: dict) -> DeepSpeedPlugin:
    """Plugin from a complete config; no ``zero.Init`` (timm builds the model; DeepSpeed partitions it)."""
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)

