"""EMA weights of the whole audited model (backbone + MINT head) with timm's ``ModelEmaV3``.

The EMA is updated once per optimizer step (never per micro-batch under gradient accumulation) from the
unwrapped model's state dict, with timm's step-based decay (``update(model, step=n)``: the first step copies
the weights, then ``decay``, or timm's warm-up with ``train.ema.warmup``). Every rank keeps its own copy (the
full parameters are on every rank under DDP and ZeRO-2; ZeRO-3 and FSDP2 are refused before any work, see
:func:`refuse_sharded_ema`); rank agreement is checked with every checkpoint. A checkpoint holds it as
``ema.safetensors`` (no pickle), in exactly ``model.safetensors``'s key layout, recorded in the audit trail
with the checkpoint's other files.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from timm.utils.model_ema import ModelEmaV3

from amint_dist.dist import sharded_engine
from amint_dist.train.config import EmaConfig

EMA_CHECKPOINT_FILE = "ema.safetensors"


def refuse_sharded_ema(cfg: EmaConfig, accelerator: Accelerator) -> None:
    """ZeRO-3 and FSDP2 partition the parameters: an EMA of a rank's shard is no EMA of the model. Say so first."""
    engine = sharded_engine(accelerator)
    if cfg.on and engine:
        raise ValueError(f"train.ema.decay={cfg.decay} is not supported under {engine} (partitioned "
                         "parameters); use ZeRO-2 or DDP, or train.ema.decay=null")


def make_ema(cfg: EmaConfig, model: torch.nn.Module, device: torch.device) -> ModelEmaV3 | None:
    """The EMA of ``model`` (the unwrapped, prepared model) on ``device`` or the CPU; None when off."""
    if not cfg.on:
        return None
    where = torch.device("cpu") if cfg.device == "cpu" else device
    return ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, device=where)


def ema_tensors(ema: ModelEmaV3) -> dict[str, torch.Tensor]:
    """The EMA weights on the CPU, keyed like ``model.safetensors``."""
    return {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}


def ema_file_bytes(ema: ModelEmaV3, metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.torch.save(ema_tensors(ema), metadata=metadata)


def load_ema(ema: ModelEmaV3, checkpoint: Path) -> None:
    """Restore the EMA from a (verified) checkpoint; one line when the checkpoint has none."""
    path = checkpoint / EMA_CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint.name} holds no {EMA_CHECKPOINT_FILE}: it was saved with train.ema off; "
                                "resume with train.ema.decay=null, or start a new run")
    ema.module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
