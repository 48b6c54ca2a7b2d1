"""timm train/eval transforms sized from the model config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch.nn as nn
from timm.data import create_transform, resolve_data_config


def data_config_for(backbone: nn.Module, img_size: int, transform_cfg: Mapping[str, Any] | None = None) -> dict:
    """timm data config (mean, std, interpolation, crop_pct) at ``img_size``, with overrides."""
    overrides = dict(transform_cfg or {})
    config = resolve_data_config({"input_size": (3, img_size, img_size), **overrides}, model=backbone)
    return {**config, "input_size": (3, img_size, img_size)}


def make_transform(data_config: Mapping[str, Any], augment: Mapping[str, Any] | None) -> Callable:
    """Eval transform when ``augment`` is empty, else timm's training transform with those options."""
    base = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")}
    if not augment:
        return create_transform(**base, is_training=False)
    base.pop("crop_pct")
    return create_transform(**base, is_training=True, **augment)
