"""Shifted negatives: members (and/or external samples) translated by a few pixels, labelled non-member.

External samples alone teach the head "not these few images"; translated copies of members teach
it that membership means *this exact image*, and translated externals add fresh natural-looking
non-members every step. Whole-pixel shifts with replicated edges keep the images' value
distribution (no noise or blur artifacts the head could key on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def shifted_batch(batch: dict, max_shift: int, generator: torch.Generator) -> dict:
    """A MINT-negatives batch from a batch: shifted images, no task labels, same valid rows."""
    n = len(batch["label"])
    return {
        "image": shifted_copies(batch["image"], max_shift, generator),
        "label": torch.full((n,), -1, dtype=torch.long),
        "index": torch.full((n,), -1, dtype=torch.long),
        "valid": batch["valid"].clone(),
        "key": [""] * n,
        "skipped": [],
    }
