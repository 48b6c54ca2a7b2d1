"""What the prepared engine really computes in: one no-grad forward of one row, the first Linear's output dtype
read by a hook (Accelerate's autocast under DDP, DeepSpeed's ``torch_autocast`` under ZeRO), checked against
``train.precision``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amint_dist.config import ConfigError

WANTED = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def compute_dtype(model: torch.nn.Module, input_size: Sequence[int], device: torch.device) -> torch.dtype:
    """The dtype ``model``'s first Linear returns in one eval-mode, no-grad forward of a zero row (the mode is
    restored; no parameter, statistic or random state changes)."""
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    hook = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        hook.remove()
        model.train(training)
    return seen[0]


def check_compute_dtype(precision: str, dtype: torch.dtype) -> None:
    """Refuse (one line) an engine that computes in another dtype than ``precision`` (resolved) asks for."""
    if dtype != WANTED[precision]:
        raise ConfigError(f"train.precision resolved to {precision} but the engine computes in {dtype}: under "
                          "DeepSpeed bf16 needs a release that honours the torch_autocast config "
                          "(deepspeed>=0.17.2, see pyproject.toml)")
