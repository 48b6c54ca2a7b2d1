"""Near-member negatives: members (and/or external samples) translated by a few pixels, and members perturbed
(rotated, zoomed, translated by a fraction of a pixel, noised), labelled non-member.

External samples alone teach the head "not these few images"; translated copies of members teach
it that membership means *this exact image*, and translated externals add fresh natural-looking
non-members every step. Whole-pixel shifts with replicated edges keep the images' value
distribution (no noise or blur artifacts the head could key on); the perturbations
(``mint.member_perturb``) resample bilinearly or add noise, on request.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from amint_dist.models.config import PerturbConfig


def negatives_generator(seed: int, step: int, batch_in_epoch: int, rank: int) -> torch.Generator:
    """The copies' random draws at one position of one rank: a resumed run draws what the uninterrupted one did."""
    return torch.Generator().manual_seed(hash((seed, step, batch_in_epoch, rank)))


def shifted_copies(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by a random non-zero (dy, dx) with |dy|, |dx| <= ``max_shift``."""
    n, _, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    offsets = torch.randint(-s, s + 1, (n, 2), generator=generator)
    zero = (offsets == 0).all(dim=1)
    offsets[zero, 1] = torch.where(torch.rand(int(zero.sum()), generator=generator) < 0.5, -s, s)
    return torch.stack([padded[i, :, s + dy : s + dy + h, s + dx : s + dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def perturbed_copies(images: torch.Tensor, perturb: PerturbConfig, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated, zoomed and translated by a fraction of a pixel (one bilinear resampling, replicated
    edges), then noised, as ``perturb`` sets. Each drawn rotation, zoom and offset has a random sign and a size
    between half its maximum and the maximum: no copy is left unperturbed by a near-zero draw."""
    n, _, h, w = images.shape
    if perturb.rotate_deg or perturb.scale or perturb.subpixel:
        angle, zoom, dy, dx = _signed_sizes((4, n), generator)
        angle = angle * math.radians(perturb.rotate_deg)
        zoom = 1 + zoom * perturb.scale
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        # output -> input coordinates, normalised to [-1, 1] per axis (hence the h / w factors)
        theta = torch.stack([torch.stack([cos, -sin * h / w, 2 * dx * perturb.subpixel / w], 1),
                             torch.stack([sin * w / h, cos, 2 * dy * perturb.subpixel / h], 1)], 1)
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if perturb.noise:
        images = images + perturb.noise * torch.randn(images.shape, generator=generator).to(images)
    return images


def _signed_sizes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, -1/2] u [1/2, 1] (float64)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    return torch.where(u < 0, -1.0, 1.0) * (0.5 + u.abs() / 2)


def shifted_batch(batch: dict, max_shift: int, generator: torch.Generator, perturb: PerturbConfig | None = None) -> dict:
    """A MINT-negatives batch from a batch: images shifted (``max_shift`` > 0) and perturbed (``perturb``, when on),
    no task labels, same valid rows."""
    n = len(batch["label"])
    images = shifted_copies(batch["image"], max_shift, generator) if max_shift else batch["image"]
    return {
        "image": perturbed_copies(images, perturb, generator) if perturb is not None and perturb.on else images,
        "label": torch.full((n,), -1, dtype=torch.long),
        "index": torch.full((n,), -1, dtype=torch.long),
        "valid": batch["valid"].clone(),
        "key": [""] * n,
        "skipped": [],
    }
