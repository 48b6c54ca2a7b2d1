"""Learning-rate schedule: linear warm-up then cosine decay, a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float) -> float:
    """LR for optimizer step ``step`` (0-based); stateless, so resuming needs only the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
