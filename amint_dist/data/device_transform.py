"""Device-side half of ``data.device_transform``: uint8 batches in, augmented and normalised float batches out.

The loader workers only decode, crop and flip (timm's ``use_prefetcher`` transform: uint8 CHW tensors, a
quarter of float32's bytes); the training step runs the rest on the batch where the model is, as timm's
``PrefetchLoader`` does: RandAugment (torchvision v2, per sample), conversion to float, normalisation with the
model's mean/std, random erasing (timm's ``RandomErasing`` on the normalised batch). Random parameters are
drawn from Python's and torch's RNGs seeded per batch, so a seed gives the same batch again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from amint_dist.data.samples import seeded_rng

RAND_AUGMENT_BINS = 11  # timm's magnitude scale: m0..m10, m10 the strongest (timm's _LEVEL_DENOM = 10)
MOVED_OPTIONS = ("auto_augment", "re_prob", "re_mode", "re_count", "re_num_splits")  # done here, not in workers


def rand_augment_options(auto_augment: str | None) -> dict[str, int] | None:
    """torchvision ``RandAugment`` arguments (num_ops, magnitude) of a timm ``rand-m<M>[-n<N>]...`` string;
    None for no RandAugment. Anything else (AutoAugment policies, AugMix, m > 10) raises ValueError. timm's
    magnitude noise (``mstd``) and op weighting (``inc``, ``w``) have no torchvision equivalent and are ignored."""
    if not auto_augment:
        return None
    parts = auto_augment.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{auto_augment!r}: only RandAugment ('rand-m<M>...') runs on the device")
    options = {"num_ops": 2, "magnitude": 10}  # timm's defaults
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        if match and match[1] in ("m", "n"):
            options["magnitude" if match[1] == "m" else "num_ops"] = int(float(match[2]))
    if not 0 <= options["magnitude"] < RAND_AUGMENT_BINS:
        raise ValueError(f"{auto_augment!r}: magnitude must be 0..{RAND_AUGMENT_BINS - 1}")
    return options


def worker_augment(augment: Mapping[str, Any]) -> dict[str, Any]:
    """The ``augment`` options the workers keep (crop, flip; colour jitter only where timm would apply it).
    With RandAugment on, timm disables colour jitter, so the workers must not apply it either."""
    kept = {k: v for k, v in augment.items() if k not in MOVED_OPTIONS}
    if augment.get("auto_augment") and not augment.get("force_color_jitter"):
        kept["color_jitter"] = None
    return kept


class DeviceTransform:
    """uint8 image batch (N, C, H, W) -> float32 normalised batch on ``device``, augmented when ``augment`` holds
    timm's RandAugment / random-erasing options (the ones :data:`MOVED_OPTIONS` names). ``decode``
    (``data.decode=device``, a ``DeviceDecode``): reader batches of encoded images are decoded and cropped by it
    first (:meth:`apply`)."""

    def __init__(self, data_config: Mapping[str, Any], augment: Mapping[str, Any] | None, device: torch.device,
                 decode: Callable[[dict], dict] | None = None):
        augment, self.decode = dict(augment or {}), decode
        self.device = torch.device(device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(data_config["mean"], device=self.device).view(shape)
        self.std = torch.tensor(data_config["std"], device=self.device).view(shape)
        rand = rand_augment_options(augment.get("auto_augment"))
        fill = [round(255 * m) for m in data_config["mean"]]  # timm fills RandAugment's empty pixels with the mean
        self.rand_augment = v2.RandAugment(**rand, num_magnitude_bins=RAND_AUGMENT_BINS, fill=fill) if rand else None
        re_prob = float(augment.get("re_prob", 0.0))
        self.erasing = RandomErasing(re_prob, mode=augment.get("re_mode", "const"), max_count=augment.get("re_count", 1),
                                     num_splits=augment.get("re_num_splits", 0), device=str(self.device)) if re_prob else None

    @property
    def augments(self) -> bool:
        return self.rand_augment is not None or self.erasing is not None

    def apply(self, batch: dict, seed: str) -> dict:
        """A reader batch with its images transformed (decoded and cropped first with ``decode``: rows that fail
        to decode become invalid, their skips added to the batch's)."""
        if self.decode is not None:
            with _seeded(f"{seed}:crop", self.device):
                batch = self.decode(batch)
        return {**batch, "image": self(batch["image"], seed)}

    def __call__(self, images: torch.Tensor, seed: str) -> torch.Tensor:
        """The batch's float32 images, its random parameters drawn from ``seed`` (same seed, same batch)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"device transform expects uint8 images, got {images.dtype}")
        images = images.to(self.device, non_blocking=True)
        with _seeded(seed, self.device):
            if self.rand_augment is not None:  # one draw of ops and magnitudes per sample, as in the workers
                images = torch.stack([self.rand_augment(image) for image in images])
            out = images.float().div_(255).sub_(self.mean).div_(self.std)  # ToTensor + Normalize's arithmetic
            if self.erasing is not None:
                out = self.erasing(out)
        return out


@contextmanager
def _seeded(seed: str, device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU RNGs (and the CUDA device's) seeded from ``seed``, restored after."""
    if device.type != "cuda":
        with seeded_rng(seed):
            yield
        return
    with torch.random.fork_rng(devices=[device]), seeded_rng(seed):
        torch.cuda.manual_seed(torch.initial_seed())
        yield
