"""One sample's intake in the streaming reader: decode and check it (nothing in it is trusted), count what is
skipped and why, and seed the augmentation of a batch deterministically."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from amint_dist.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageRefused, check_header, decode_image

log = logging.getLogger(__name__)
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # what sources.sanitize_key produces: never a path


class SkipLog:
    """Skipped samples of one reader since the last batch: (key or shard, reason) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, what: str, reason: str, count: int = 1) -> None:
        log.warning("skipping %s%s: %s", what, f" ({count} samples)" if count > 1 else "", reason)
        self.items.extend([(what, reason)] * count)

    def tar_error(self, exn: Exception) -> bool:
        """WebDataset handler: note a broken tar and continue with the next one."""
        log.warning("tar read error: %s", exn)
        return True

    def drain(self) -> list[tuple[str, str]]:
        items, self.items = self.items, []
        return items


def decode_sample(sample: dict, transform: Callable | None, skips: SkipLog, num_classes: int | None = None,
                  index_ranges: dict[str, range] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict | None:
    """Decode one raw WebDataset sample to a tensor row, or count it as skipped and return None.

    Nothing in a sample is trusted: a key outside the prepared charset (e.g. a path), a label outside
    [0, num_classes), an index outside its shard's range or an image of more than ``max_pixels`` is a skip,
    not a crash, a wrong ledger entry or a huge allocation. ``transform`` None (``data.decode=device``): the
    image's header is checked and its encoded bytes are the row's image, a 1-D uint8 tensor.
    """
    key = sample.get("__key__", "?")
    if not isinstance(key, str) or not SAFE_KEY.fullmatch(key):
        skips.add(repr(key)[:200], "unsafe key")
        return None
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        skips.add(key, "no image")
        return None
    try:
        index = int(json.loads(sample["json"])["index"])
        label = int(sample["cls"])
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError):
        skips.add(key, "missing or bad label/metadata")
        return None
    if num_classes is not None and not 0 <= label < num_classes:
        skips.add(key, "label out of range")
        return None
    if index_ranges is not None and index not in index_ranges.get(sample.get("__url__"), range(0)):
        skips.add(key, "index outside its shard")
        return None
    payload = sample[ext]
    try:
        rgb = decode_image(payload, max_pixels) if transform else check_header(payload, max_pixels)
    except ImageRefused as e:
        skips.add(key, e.reason)
        return None
    image = transform(rgb) if transform else torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return {"image": image, "label": label, "index": index, "key": key}  # a transform bug is no data error


@contextmanager
def seeded_rng(seed: str) -> Iterator[None]:
    """Run the block with Python's, NumPy's and torch's (CPU) global RNGs seeded from ``seed``; restore them after.

    timm transforms draw from all three; restoring keeps a ``workers=0`` reader from perturbing the
    training process's own random streams.
    """
    n = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")
    saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(n)
    np.random.seed(n % 2**32)
    torch.random.default_generator.manual_seed(n % 2**63)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.default_generator.set_state(saved[2])
