"""Shared fixtures. Data: real images (PIL), real tar shards (webdataset.TarWriter), real prepared roots."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

DIGITS_SPLIT_SHARDS = 64  # samples per shard in the shared digits root (members: 13 shards)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (12, 10)) -> bytes:
    """A small real, decodable image whose pixels depend on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def prep_cfg(kind: str, root: Path, **overrides) -> dict:
    """A ``data`` config for ``prepare_dataset`` (the defaults of configs/data/*.yaml, small shards)."""
    cfg = {
        "kind": kind,
        "root": str(root),
        "seed": 0,
        "fractions": {"members": 0.4, "probe": 0.1, "external": 0.25, "heldout": 0.25},
        "shard_maxcount": 16,
        "shard_maxsize": 10**9,
        "prepare_workers": 1,
    }
    cfg.update(overrides)
    return cfg


def write_image_tree(root: Path, classes: int = 3, per_class: int = 20, seed: int = 0) -> dict[str, int]:
    """Class-per-folder JPEG tree, half of each class one folder deeper; returns {expected key: label}."""
    expected = {}
    for c in range(classes):
        for i in range(per_class):
            rel = Path(f"class{c}") / (f"sub{i % 2}" if i % 2 else "") / f"img.{i:03d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(seed * 100_000 + c * 1000 + i))
            key = "__".join(p for p in rel.with_suffix("").as_posix().replace(".", "_").split("/"))
            expected[key] = c
    return expected


def write_wds_source(directory: Path, samples: list[dict], per_shard: int, shuffle_seed: int | None = None,
                     across: bool = False, name: str = "src-%03d.tar") -> str:
    """Write ``samples`` (dicts with __key__ and byte fields) into tar shards; return a brace pattern.

    ``shuffle_seed`` reorders the samples inside each shard (the same keys arriving in another order);
    ``across=True`` shuffles before cutting shards, so samples also move between shards.
    """
    samples = list(samples)
    if shuffle_seed is not None and across:
        random.Random(shuffle_seed).shuffle(samples)
    directory.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(samples) // per_shard)
    for s in range(n_shards):
        chunk = samples[s * per_shard : (s + 1) * per_shard]
        if shuffle_seed is not None and not across:
            random.Random(shuffle_seed + s).shuffle(chunk)
        with wds.TarWriter(str(directory / (name % s))) as sink:
            for sample in chunk:
                sink.write(sample)
    return str(directory / (name.replace("%03d", "{%03d..%03d}" % (0, n_shards - 1))))


def wds_samples(n: int, classes: int = 5, image_field: str = "jpg", label_field: str = "cls") -> list[dict]:
    """``n`` samples with real JPEG bytes, integer labels and a nested (directory) key."""
    return [
        {"__key__": f"train/n{i % classes:02d}_{i:05d}", image_field: image_bytes(i), label_field: str(i % classes).encode()}
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The embedded digits dataset prepared once (2 writer processes, 64 samples per shard). Read only."""
    from amint_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("digits") / "root"
    prepare_dataset(prep_cfg("digits", root, shard_maxcount=DIGITS_SPLIT_SHARDS, prepare_workers=2))
    return root


@pytest.fixture(scope="session")
def train_root(tmp_path_factory) -> Path:
    """Digits prepared like the default config (32 samples per shard: >= 4 shards in every split). Read only."""
    from amint_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("train_digits") / "root"
    prepare_dataset(prep_cfg("digits", root, shard_maxcount=32, prepare_workers=2))
    return root
