"""``data.decode=device``: the loader workers ship encoded image bytes; the training step decodes them and does
timm's random resized crop and flip on the batch's device, before :class:`DeviceTransform`'s half.

JPEGs (by their magic bytes) are decoded together with ``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG
on CUDA, libjpeg-turbo on CPU (PIL's decoder: the same pixels). Other formats (PNG, ...) are decoded one by one
by PIL on the CPU, as the workers would (every format they read), and moved. Grayscale and CMYK JPEGs come out RGB (grey for a
1-channel model, as PIL's ``convert("L")``). When the batched decode fails, the JPEGs are decoded one by one: a
sample that still fails becomes an invalid row, a skip counted and logged like the workers' (``SkipLog``), so
the exposure ledger never counts it. The crop's parameters are those of the timm transform the workers would
run (``make_transform(..., uint8=True)``), drawn per sample with timm's own ``get_params`` from the caller's
seeded RNGs, in the workers' order (crop, interpolation when random, flip).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomHorizontalFlip
from torchvision.transforms.v2 import functional as F

from amint_dist.config import ConfigError
from amint_dist.data.images import ImageRefused, decode_image, undecodable
from amint_dist.data.samples import SkipLog
from amint_dist.data.transforms import make_transform

JPEG_MAGIC = [0xFF, 0xD8, 0xFF]


class DeviceDecode:
    """A reader batch of encoded images (``batch["image"]``: a list of 1-D uint8 tensors) -> the same batch with a
    uint8 (N, C, H, W) crop batch on ``device``, its undecodable rows invalid and listed in ``skipped``."""

    def __init__(self, data_config: Mapping[str, Any], augment: Mapping[str, Any] | None, device: torch.device):
        """The crop and flip of the workers' timm transform for ``augment``; ConfigError (one line) when that
        transform holds a step that has no device version here (colour jitter, vertical flip, eval resize...)."""
        worker = make_transform(data_config, augment, uint8=True)
        steps = list(getattr(getattr(worker, "transform", worker), "transforms", [worker]))
        crop, flips = steps[0], [s for s in steps[1:] if isinstance(s, RandomHorizontalFlip)]
        other = [s for s in steps[1:] if not isinstance(s, (RandomHorizontalFlip, MaybePILToTensor))]
        if not isinstance(crop, RandomResizedCropAndInterpolation) or other:
            culprit = str(other[0] if isinstance(crop, RandomResizedCropAndInterpolation) else crop).replace("\n", " ")
            raise ConfigError(f"data.augment: with data.decode=device the workers' {culprit} has no device version: "
                              "the step does timm's random resized crop and a horizontal flip only (training options, "
                              "color_jitter: null), or use data.decode=worker")
        self.crop, self.hflip = crop, flips[0].p if flips else 0.0
        self.channels = int(data_config["input_size"][0])
        self.mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> dict:
        """``batch`` decoded and cropped; call it inside the batch's seeded RNGs (the crops draw from them)."""
        valid, skips = batch["valid"].clone(), SkipLog()
        decoded = self.decode(batch["image"], valid.tolist())
        blank = torch.zeros((self.channels, *self.crop.size), dtype=torch.uint8, device=self.device)
        crops = []
        for row, image in enumerate(decoded):
            if isinstance(image, str):
                skips.add(batch["key"][row], image)
                valid[row] = False
            crops.append(self.crop_and_flip(image) if isinstance(image, torch.Tensor) else blank)
        return {**batch, "image": torch.stack(crops), "valid": valid, "skipped": list(batch["skipped"]) + skips.drain()}

    def decode(self, payloads: list[torch.Tensor], valid: list[bool]) -> list[torch.Tensor | str | None]:
        """Per row: the decoded uint8 (C, H, W) image on the device, the skip reason that refused it, or None
        (an invalid row: padding or a sample the workers skipped)."""
        out: list[torch.Tensor | str | None] = [None] * len(payloads)
        jpegs = [row for row, ok in enumerate(valid) if ok and payloads[row][:3].tolist() == JPEG_MAGIC]
        try:
            images = decode_jpeg([payloads[row] for row in jpegs], mode=self.mode, device=self.device) if jpegs else []
        except RuntimeError:  # one bad JPEG fails the whole call: find it
            images = [self._jpeg(payloads[row]) for row in jpegs]
        for row, image in zip(jpegs, images):
            out[row] = image
        for row, ok in enumerate(valid):
            if ok and out[row] is None:
                out[row] = self._other(payloads[row])
        return out

    def _jpeg(self, payload: torch.Tensor) -> torch.Tensor | str:
        try:
            return decode_jpeg(payload, mode=self.mode, device=self.device)
        except RuntimeError as e:  # torchvision's error for bad JPEG bytes
            return undecodable(e)

    def _other(self, payload: torch.Tensor) -> torch.Tensor | str:
        """A non-JPEG (PNG, ...) decoded by PIL on the CPU, exactly as the workers would (their size check done)."""
        try:
            image = decode_image(payload.numpy().tobytes(), 0)
        except ImageRefused as e:
            return e.reason
        return F.pil_to_tensor(image.convert("L") if self.channels == 1 else image).to(self.device)

    def crop_and_flip(self, image: torch.Tensor) -> torch.Tensor:
        """timm's RandomResizedCropAndInterpolation, then the horizontal flip, on one decoded image."""
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(image, self.crop.scale, self.crop.ratio)
        mode = self.crop.interpolation
        if isinstance(mode, (tuple, list)):  # timm's interpolation="random"
            mode = random.choice(mode)
        out = F.resized_crop(image, i, j, h, w, list(self.crop.size), interpolation=mode, antialias=True)
        if self.hflip and torch.rand(1) < self.hflip:  # torchvision RandomHorizontalFlip's draw
            out = F.horizontal_flip(out)
        return out
