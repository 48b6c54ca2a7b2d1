"""timm train/eval transforms sized from the model config (RGB, or grayscale for 1-channel models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from amint_dist.data.device_transform import worker_augment


def data_config_for(backbone: nn.Module, img_size: int, in_chans: int = 3,
                    transform_cfg: Mapping[str, Any] | None = None) -> dict:
    """timm data config (mean, std, interpolation, crop_pct) at ``img_size`` and ``in_chans``, with overrides;
    a 1-channel model gets the mean of the 3-channel mean and std (unless overridden)."""
    overrides = dict(transform_cfg or {})
    config = resolve_data_config({"input_size": (3, img_size, img_size), **overrides}, model=backbone)
    if in_chans == 1:
        config.update({k: (sum(config[k]) / len(config[k]),) for k in ("mean", "std")
                       if len(config[k]) != 1 and k not in overrides})
    return {**config, "input_size": (in_chans, img_size, img_size)}


class _Grayscale:
    """PIL image -> 8-bit grayscale ("L"), then ``transform`` (a picklable wrapper, for loader workers)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Image.Image):
        return self.transform(image.convert("L"))


def make_transform(data_config: Mapping[str, Any], augment: Mapping[str, Any] | None, uint8: bool = False) -> Callable:
    """Eval transform when ``augment`` is empty, else timm's training transform with those options; images
    are converted to grayscale first for a 1-channel ``input_size``.

    ``uint8`` (``data.device_transform``): the workers' half only, uint8 CHW tensors after the resize/crop (and
    flip); RandAugment, normalisation and random erasing are left to :class:`DeviceTransform`."""
    base = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")}
    if augment:
        base.pop("crop_pct")
    options = worker_augment(augment or {}) if uint8 else dict(augment or {})
    transform = create_transform(**base, is_training=bool(augment), use_prefetcher=uint8, **options)
    return _Grayscale(transform) if base["input_size"][0] == 1 else transform
